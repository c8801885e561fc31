{{/*
The Redis container, standalone or as a native sidecar (an init container with restartPolicy Always: it starts
before the app and stops after it). The password comes from the mounted Secret on stdin, never from the
environment or the command line: `redis-server <conf> -` reads extra config from stdin.
(dict "ctx" $ "bind" "* -::*" "sidecar" false)
*/}}
{{- define "catalog.redis.container" -}}
{{- $ctx := .ctx -}}
- name: redis
  image: {{ include "catalog.imageRef" (dict "image" $ctx.Values.redis.image "default" "latest") }}
  imagePullPolicy: {{ $ctx.Values.redis.image.pullPolicy }}
  {{- if .sidecar }}
  restartPolicy: Always
  {{- end }}
  command:
    - sh
    - -c
    - |
      exec redis-server /etc/redis/redis.conf - <<EOF
      bind {{ .bind }}
      requirepass "$(cat /var/run/secrets/redis/password)"
      EOF
  ports:
    - name: redis
      containerPort: 6379
      protocol: TCP
  securityContext:
    {{- toYaml $ctx.Values.redis.securityContext | nindent 4 }}
  resources:
    {{- toYaml $ctx.Values.redis.resources | nindent 4 }}
  startupProbe:
    exec:
      command: ["sh", "-c", "REDISCLI_AUTH=\"$(cat /var/run/secrets/redis/password)\" redis-cli -h 127.0.0.1 ping | grep -q PONG"]
    periodSeconds: 2
    timeoutSeconds: 3
    failureThreshold: 30
  livenessProbe:
    exec:
      command: ["sh", "-c", "REDISCLI_AUTH=\"$(cat /var/run/secrets/redis/password)\" redis-cli -h 127.0.0.1 ping | grep -q PONG"]
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    exec:
      command: ["sh", "-c", "REDISCLI_AUTH=\"$(cat /var/run/secrets/redis/password)\" redis-cli -h 127.0.0.1 ping | grep -q PONG"]
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 3
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
