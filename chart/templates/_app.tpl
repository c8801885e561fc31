{{/* env and envFrom of the app and migration containers: tunables from the ConfigMap, secrets as files. */}}
{{- define "catalog.appEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "catalog.fullname" . }}
  {{- with .Values.extraEnvFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
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
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
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
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The migration init container needs the database only: no API keys, no Redis password. It connects as the
owner role (the tables it creates are the owner's; the app role only gets DML on them). */}}
{{- define "catalog.migrateEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "catalog.fullname" . }}
  {{- with .Values.extraEnvFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
env:
  - name: PROMETHEUS_MULTIPROC_DIR
    value: /tmp/metrics
  - name: CATALOG_DATABASE_URL
    value: {{ include "catalog.database.urlFor" (dict "ctx" . "owner" true) | quote }}
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
- name: {{ ternary "database-owner-password" "database-password" (ne (include "catalog.database.ownerSecretKey" .) "") }}
  mountPath: /var/run/secrets/catalog/database
  readOnly: true
{{- end -}}

{{/* The app's tunables (the contract's environment variables); its checksum rolls the pods when one changes. */}}
{{- define "catalog.config.data" -}}
PORT: "8080"
WEB_CONCURRENCY: {{ .Values.config.webConcurrency | quote }}
CATALOG_THREADS: {{ .Values.config.threads | quote }}
CATALOG_CACHE_TTL_SECONDS: {{ .Values.config.cacheTtlSeconds | quote }}
CATALOG_API_KEY_HEADER: {{ .Values.config.apiKeyHeader | quote }}
CATALOG_RATE_LIMIT: {{ .Values.config.rateLimit | quote }}
CATALOG_AUTH_FAILURE_LIMIT: {{ .Values.config.authFailureLimit | quote }}
CATALOG_TRUSTED_PROXY_HOPS: {{ .Values.config.trustedProxyHops | quote }}
CATALOG_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
CATALOG_DATABASE_URL: {{ include "catalog.database.url" . | quote }}
{{- with include "catalog.redis.url" . }}
CATALOG_REDIS_URL: {{ . | quote }}
{{- end }}
{{- end -}}
