{{/* Chart name. */}}
{{- define "catalog.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, plus the chart name unless the release name contains it. */}}
{{- define "catalog.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "catalog.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource; `component` and `name` are passed in a dict: (dict "ctx" $ "name" "redis" "component" "cache"). */}}
{{- define "catalog.labelsFor" -}}
helm.sh/chart: {{ include "catalog.chart" .ctx }}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: catalog
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of the app's resources. */}}
{{- define "catalog.labels" -}}
{{ include "catalog.labelsFor" (dict "ctx" . "name" (include "catalog.name" .) "component" "api") }}
{{- end -}}

{{/* Selector labels: name + instance only. */}}
{{- define "catalog.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "catalog.redis.name" -}}{{ include "catalog.name" . }}-redis{{- end -}}
{{- define "catalog.redis.fullname" -}}{{ include "catalog.fullname" . | trunc 57 | trimSuffix "-" }}-redis{{- end -}}
{{- define "catalog.redis.labels" -}}
{{ include "catalog.labelsFor" (dict "ctx" . "name" (include "catalog.redis.name" .) "component" "cache") }}
{{- end -}}
{{- define "catalog.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalog.redis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "catalog.postgresql.name" -}}{{ include "catalog.name" . }}-postgresql{{- end -}}
{{- define "catalog.postgresql.fullname" -}}{{ include "catalog.fullname" . | trunc 52 | trimSuffix "-" }}-postgresql{{- end -}}
{{- define "catalog.postgresql.labels" -}}
{{ include "catalog.labelsFor" (dict "ctx" . "name" (include "catalog.postgresql.name" .) "component" "database") }}
{{- end -}}
{{- define "catalog.postgresql.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalog.postgresql.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Annotations of every resource (commonAnnotations), as a YAML block or nothing. */}}
{{- define "catalog.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "catalog.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "catalog.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image reference from a dict with repository, tag, digest; (dict "image" .Values.image "default" .Chart.AppVersion) */}}
{{- define "catalog.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (toString (default .default .image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "catalog.image" -}}
{{ include "catalog.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end -}}

{{/* ---- Secrets ---------------------------------------------------------------------------------- */}}

{{- define "catalog.apiKeys.secretName" -}}
{{- default (printf "%s-api-keys" (include "catalog.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Redis in use at all: bundled, or an external URL. */}}
{{- define "catalog.redis.inUse" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.url -}}true{{- end -}}
{{- end -}}

{{- define "catalog.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (include "catalog.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "catalog.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}password{{ end -}}
{{- else -}}
{{- .Values.externalRedis.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{- define "catalog.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- if eq .Values.redis.architecture "sidecar" -}}
redis://127.0.0.1:6379/0
{{- else -}}
{{- printf "redis://%s:6379/0" (include "catalog.redis.fullname" .) -}}
{{- end -}}
{{- else -}}
{{- .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{- define "catalog.database.secretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- default (include "catalog.postgresql.fullname" .) .Values.postgresql.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "catalog.database.secretKey" -}}
{{- if .Values.postgresql.enabled -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretPasswordKey }}{{ else }}password{{ end -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{- define "catalog.database.url" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "postgresql://%s@%s:5432/%s" .Values.postgresql.auth.username (include "catalog.postgresql.fullname" .) .Values.postgresql.auth.database -}}
{{- else -}}
{{- $url := printf "postgresql://%s@%s:%v/%s" .Values.externalDatabase.username .Values.externalDatabase.host .Values.externalDatabase.port .Values.externalDatabase.database -}}
{{- if .Values.externalDatabase.params }}{{ printf "%s?%s" $url .Values.externalDatabase.params }}{{ else }}{{ $url }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* A password generated once: the existing Secret's value if the release already has it, else random. (dict "ctx" $ "name" secretName "key" "password") */}}
{{- define "catalog.generatedPassword" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Checks of values that the schema cannot express. */}}
{{- define "catalog.validate" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.host) -}}
{{- fail "postgresql.enabled is false: set externalDatabase.host and externalDatabase.existingSecret" -}}
{{- end -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.existingSecret) -}}
{{- fail "an external database needs externalDatabase.existingSecret (the Secret with its password)" -}}
{{- end -}}
{{- if regexMatch "://[^/@]*:[^/@]*@" .Values.externalRedis.url -}}
{{- fail "externalRedis.url must not hold a password: put it in the Secret named by externalRedis.existingSecret" -}}
{{- end -}}
{{- if and .Values.externalRedis.existingSecret (not .Values.externalRedis.url) (not .Values.redis.enabled) -}}
{{- fail "externalRedis.existingSecret is set but externalRedis.url is empty" -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 30 | int) -}}
{{- fail "terminationGracePeriodSeconds must exceed preStopSleepSeconds + 30 (gunicorn's graceful timeout)" -}}
{{- end -}}
{{- end -}}
