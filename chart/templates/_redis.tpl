{{/*
The Redis container, standalone or as a native sidecar (an init container with restartPolicy Always: it starts
before the app and stops after it). The password comes from the mounted Secret on stdin, never from the
environment or the command line: `redis-server <conf> -` reads extra config from stdin. It is trimmed like the
app trims it, and `\` and `"` are escaped for the double-quoted config string, so any password works.
A sidecar has no readiness probe: a sidecar's readiness counts for the pod's, and a cache outage must only
degrade the app, never take the pod out of its Service.
(dict "ctx" $ "bind" "* -::*" "sidecar" false)
*/}}
{{- define "catalog.redis.container" -}}
{{- $ctx := .ctx -}}
{{- $ping := "REDISCLI_AUTH=\"$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' /var/run/secrets/redis/password)\" redis-cli -h 127.0.0.1 ping | grep -q PONG" -}}
- name: redis
  image: {{ include "catalog.imageRef" (dict "image" $ctx.Values.redis.image "default" "latest" "ctx" $ctx) }}
  imagePullPolicy: {{ $ctx.Values.redis.image.pullPolicy }}
  {{- if .sidecar }}
  restartPolicy: Always
  {{- end }}
  command:
    - sh
    - -c
    - |
      password=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e 's/[\\"]/\\&/g' /var/run/secrets/redis/password)
      exec redis-server /etc/redis/redis.conf - <<EOF
      bind {{ .bind }}
      requirepass "$password"
      EOF
  ports:
    - name: redis
      containerPort: 6379
      protocol: TCP
  securityContext:
    {{- include "catalog.securityContext" (dict "ctx" $ctx "context" $ctx.Values.redis.securityContext) | nindent 4 }}
  resources:
    {{- toYaml $ctx.Values.redis.resources | nindent 4 }}
  startupProbe:
    exec:
      command: ["sh", "-c", {{ $ping | quote }}]
    periodSeconds: 2
    timeoutSeconds: 3
    failureThreshold: 30
  livenessProbe:
    exec:
      command: ["sh", "-c", {{ $ping | quote }}]
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  {{- if not .sidecar }}
  readinessProbe:
    exec:
      command: ["sh", "-c", {{ $ping | quote }}]
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 3
  {{- end }}
  volumeMounts:
    - name: redis-config
      mountPath: /etc/redis
      readOnly: true
    - name: redis-server-password
      mountPath: /var/run/secrets/redis
      readOnly: true
    - name: redis-data
      mountPath: /data
    - name: redis-tmp
      mountPath: /tmp
{{- end -}}

{{- define "catalog.redis.volumes" -}}
- name: redis-config
  configMap:
    name: {{ include "catalog.redis.fullname" . }}
- name: redis-server-password
  secret:
    secretName: {{ include "catalog.redis.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "catalog.redis.secretKey" . }}
        path: password
- name: redis-data
  emptyDir:
    sizeLimit: 16Mi
- name: redis-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end -}}

{{/* redis.conf (its checksum restarts Redis only when the file changes, not on every chart version). */}}
{{- define "catalog.redis.conf" -}}
# A cache: no persistence, bounded memory, least-recently-used keys evicted first.
port 6379
protected-mode yes
save ""
appendonly no
dir /data
maxmemory {{ .Values.redis.maxmemory }}
maxmemory-policy {{ .Values.redis.maxmemoryPolicy }}
tcp-keepalive 60
timeout 0
# Dangerous administrative commands are not needed by catalog.
rename-command DEBUG ""
rename-command CONFIG ""
{{- end -}}
