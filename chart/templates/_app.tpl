{{/* env and envFrom of the app and migration containers: tunables from the ConfigMap, secrets as files. */}}
{{- define "catalog.appEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "catalog.fullname" . }}
env:
  - name: PROMETHEUS_MULTIPROC_DIR
    value: /tmp/metrics
  - name: CATALOG_API_KEYS_DIR
    value: /var/run/secrets/catalog/api-keys
  - name: CATALOG_DATABASE_PASSWORD_FILE
    value: /var/run/secrets/catalog/database/password
  {{- if include "catalog.redis.secretName" . }}
  - name: CATALOG_REDIS_PASSWORD_FILE
    value: /var/run/secrets/catalog/redis/password
  {{- end }}
  {{- if .Values.tracing.enabled }}
  {{- /* Which pod a span comes from (each gunicorn worker adds its own service.instance.id). */}}
  - name: K8S_POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: OTEL_RESOURCE_ATTRIBUTES
    value: {{ list (printf "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=%s,k8s.deployment.name=%s" .Release.Namespace (include "catalog.fullname" .)) (include "catalog.tracing.extraAttributes" .) | compact | join "," | quote }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{- define "catalog.tracing.extraAttributes" -}}
{{- $pairs := list }}
{{- range $name, $value := .Values.tracing.resourceAttributes }}
{{- $pairs = append $pairs (printf "%s=%s" $name $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end -}}

{{- define "catalog.appVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: metrics
  mountPath: /tmp/metrics
- name: api-keys
  mountPath: /var/run/secrets/catalog/api-keys
  readOnly: true
{{- if include "catalog.redis.secretName" . }}
- name: redis-password
  mountPath: /var/run/secrets/catalog/redis
  readOnly: true
{{- end }}
- name: database-password
  mountPath: /var/run/secrets/catalog/database
  readOnly: true
{{- end -}}

{{/* The migration init container needs the database only: no API keys, no Redis password. */}}
{{- define "catalog.migrateEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "catalog.fullname" . }}
env:
  - name: PROMETHEUS_MULTIPROC_DIR
    value: /tmp/metrics
  - name: CATALOG_DATABASE_PASSWORD_FILE
    value: /var/run/secrets/catalog/database/password
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{- define "catalog.migrateVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: metrics
  mountPath: /tmp/metrics
- name: database-password
  mountPath: /var/run/secrets/catalog/database
  readOnly: true
{{- end -}}
