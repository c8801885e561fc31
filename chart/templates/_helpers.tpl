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

{{/* "<fullname>-<suffix>", the full name shortened so the whole stays a 63-character DNS label. (dict "ctx" $ "suffix" "api-keys") */}}
{{- define "catalog.suffixedName" -}}
{{- $room := sub 62 (len .suffix) | int -}}
{{- printf "%s-%s" (include "catalog.fullname" .ctx | trunc $room | trimSuffix "-") .suffix -}}
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

{{/* Labels of the bundled Redis and PostgreSQL pods: nothing that changes with the chart or app version, so an
upgrade that leaves them as they are does not restart them. (dict "ctx" $ "name" "..." "component" "...") */}}
{{- define "catalog.stableLabelsFor" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: catalog
app.kubernetes.io/component: {{ .component }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels: name + instance only. */}}
{{- define "catalog.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "catalog.redis.name" -}}{{ include "catalog.name" . }}-redis{{- end -}}
{{- define "catalog.redis.fullname" -}}{{ include "catalog.suffixedName" (dict "ctx" . "suffix" "redis") }}{{- end -}}
{{- define "catalog.redis.labels" -}}
{{ include "catalog.labelsFor" (dict "ctx" . "name" (include "catalog.redis.name" .) "component" "cache") }}
{{- end -}}
{{- define "catalog.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalog.redis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "catalog.postgresql.name" -}}{{ include "catalog.name" . }}-postgresql{{- end -}}
{{/* At most 52 characters: the StatefulSet's controller-revision-hash label is "<name>-<10-character hash>". */}}
{{- define "catalog.postgresql.fullname" -}}{{ include "catalog.fullname" . | trunc 41 | trimSuffix "-" }}-postgresql{{- end -}}
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

{{/* An image reference: [registry/]repository(:tag|@digest); global.imageRegistry wins over the image's own
registry (a mirror for everything). (dict "image" .Values.image "default" .Chart.AppVersion "ctx" $) */}}
{{- define "catalog.imageRef" -}}
{{- $registry := default .image.registry .ctx.Values.global.imageRegistry -}}
{{- $name := .image.repository -}}
{{- if $registry }}{{ $name = printf "%s/%s" $registry .image.repository }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $name .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $name (toString (default .default .image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "catalog.image" -}}
{{ include "catalog.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion "ctx" .) }}
{{- end -}}

{{/* imagePullSecrets of every pod: global.imagePullSecrets and imagePullSecrets, as names or {name}. */}}
{{- define "catalog.imagePullSecrets" -}}
{{- $names := list -}}
{{- range (concat .Values.global.imagePullSecrets .Values.imagePullSecrets) -}}
{{- if kindIs "string" . }}{{ $names = append $names . }}{{ else }}{{ $names = append $names .name }}{{ end -}}
{{- end -}}
{{- with ($names | uniq) }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* True when the fixed UIDs/GIDs and fsGroup are left to the platform (OpenShift's restricted-v2 SCC assigns
them from the namespace's range). */}}
{{- define "catalog.openshift" -}}
{{- $mode := .Values.global.compatibility.openshift.adaptSecurityContext -}}
{{- if or (eq $mode "force") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "security.openshift.io/v1")) -}}true{{- end -}}
{{- end -}}

{{/* A pod or container securityContext, without runAsUser/runAsGroup/fsGroup on OpenShift. (dict "ctx" $ "context" ...) */}}
{{- define "catalog.securityContext" -}}
{{- $context := deepCopy .context -}}
{{- if include "catalog.openshift" .ctx -}}
{{- $context = omit $context "runAsUser" "runAsGroup" "fsGroup" -}}
{{- end -}}
{{- toYaml $context -}}
{{- end -}}

{{/* ---- Secrets ---------------------------------------------------------------------------------- */}}

{{- define "catalog.apiKeys.secretName" -}}
{{- default (include "catalog.suffixedName" (dict "ctx" . "suffix" "api-keys")) .Values.auth.existingSecret -}}
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

{{/* Key of the app role's password in the database Secret. */}}
{{- define "catalog.database.secretKey" -}}
{{- if .Values.postgresql.enabled -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretPasswordKey }}{{ else }}password{{ end -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* Key of the migration (owner) role's password in the database Secret; empty when migrations use the app's. */}}
{{- define "catalog.database.ownerSecretKey" -}}
{{- if .Values.postgresql.enabled -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretOwnerPasswordKey }}{{ else }}owner-password{{ end -}}
{{- else if .Values.externalDatabase.ownerUsername -}}
{{- .Values.externalDatabase.existingSecretOwnerPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* The database URL (no password) for a role. (dict "ctx" $ "owner" true|false) */}}
{{- define "catalog.database.urlFor" -}}
{{- $v := .ctx.Values -}}
{{- if $v.postgresql.enabled -}}
{{- $user := ternary $v.postgresql.auth.ownerUsername $v.postgresql.auth.username .owner -}}
{{- printf "postgresql://%s@%s:5432/%s" $user (include "catalog.postgresql.fullname" .ctx) $v.postgresql.auth.database -}}
{{- else -}}
{{- $user := ternary (default $v.externalDatabase.username $v.externalDatabase.ownerUsername) $v.externalDatabase.username .owner -}}
{{- $url := printf "postgresql://%s@%s:%v/%s" $user $v.externalDatabase.host $v.externalDatabase.port $v.externalDatabase.database -}}
{{- if $v.externalDatabase.params }}{{ printf "%s?%s" $url $v.externalDatabase.params }}{{ else }}{{ $url }}{{ end -}}
{{- end -}}
{{- end -}}

{{- define "catalog.database.url" -}}{{ include "catalog.database.urlFor" (dict "ctx" . "owner" false) }}{{- end -}}

{{/* The most PostgreSQL connections the app can hold: worker processes x pool (SQLAlchemy pool_size + max_overflow,
both CATALOG_THREADS: catalog.db.make_engine) x the most pods at once (replicas, or the HPA's maximum, plus the
rolling update's 25 % surge). A migration init container holds one connection before its pod's pool opens. */}}
{{- define "catalog.database.maxAppConnections" -}}
{{- $replicas := ternary (int .Values.autoscaling.maxReplicas) (int .Values.replicaCount) .Values.autoscaling.enabled -}}
{{- $surge := div (add $replicas 3) 4 -}}
{{- mul (int .Values.config.webConcurrency) (mul 2 (int .Values.config.threads)) (add $replicas $surge) -}}
{{- end -}}

{{/* A password generated once: the existing Secret's value if the release already has it, else random (base64).
A server that already runs with the old password (`consumer`: a workload, or the volume PostgreSQL initialised)
would keep it, so a Secret gone while its server exists stops the render instead of making a new password.
Under `helm template` lookup sees nothing: then every render is new (bring your own Secrets with GitOps).
(dict "ctx" $ "name" secretName "key" "password" "consumers" (list (list "apps/v1" "StatefulSet" name) ...)) */}}
{{- define "catalog.generatedPassword" -}}
{{- $ns := .ctx.Release.Namespace -}}
{{- $existing := lookup "v1" "Secret" $ns .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- if not $existing -}}
{{- range .consumers -}}
{{- if lookup (index . 0) (index . 1) $ns (index . 2) -}}
{{- fail (printf "the Secret %s is gone but %s %s, which uses its passwords, is still there: a new password would lock it out. Restore the Secret (with its key %q), or delete %s %s too, or set the existingSecret value" $.name (index . 1) (index . 2) $.key (index . 1) (index . 2)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
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
{{- if and .Values.postgresql.enabled (or (eq .Values.postgresql.auth.username .Values.postgresql.auth.ownerUsername) (has "postgres" (list .Values.postgresql.auth.username .Values.postgresql.auth.ownerUsername))) -}}
{{- fail "postgresql.auth.username (the app's role) and postgresql.auth.ownerUsername (the migrations') must be two roles, neither of them postgres (the superuser)" -}}
{{- end -}}
{{- $perPodCache := or (not (include "catalog.redis.inUse" .)) (and .Values.redis.enabled (eq .Values.redis.architecture "sidecar")) -}}
{{- if and $perPodCache (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) -}}
{{- fail "more than one pod needs a Redis all pods share (redis.architecture=standalone, or externalRedis.url): with a sidecar Redis or none, each pod would cache and count rate limits on its own, so a write on one pod leaves stale reads on the others. Set replicaCount=1 and autoscaling.enabled=false, or share a Redis" -}}
{{- end -}}
{{- $needed := include "catalog.database.maxAppConnections" . | int -}}
{{- if .Values.postgresql.enabled -}}
{{- $budget := sub (int .Values.postgresql.maxConnections) (int .Values.postgresql.connectionReserve) | int -}}
{{- if gt $needed $budget -}}
{{- fail (printf "the app could open %d PostgreSQL connections (config.webConcurrency %v x 2 x config.threads %v per worker x %d pods at most, with the rolling update's surge), more than postgresql.maxConnections %v - postgresql.connectionReserve %v = %d: raise postgresql.maxConnections (and its memory), or lower the workers, threads or replicas" $needed .Values.config.webConcurrency .Values.config.threads (div $needed (mul .Values.config.webConcurrency 2 .Values.config.threads)) .Values.postgresql.maxConnections .Values.postgresql.connectionReserve $budget) -}}
{{- end -}}
{{- else if and (gt (int .Values.externalDatabase.maxConnections) 0) (gt $needed (int .Values.externalDatabase.maxConnections)) -}}
{{- fail (printf "the app could open %d connections to the external database, more than externalDatabase.maxConnections %v: lower the workers, threads or replicas, or put a pooler (PgBouncer) in front" $needed .Values.externalDatabase.maxConnections) -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 30 | int) -}}
{{- fail "terminationGracePeriodSeconds must exceed preStopSleepSeconds + 30 (gunicorn's graceful timeout)" -}}
{{- end -}}
{{- end -}}

{{/* ---- PostgreSQL ------------------------------------------------------------------------------- */}}

{{/* Least privilege, run once by the official image's entrypoint (psql as the superuser, connected to the
database) when it initialises the data directory: the owner role owns the database and its public schema and
runs the migrations; the app role may only read and write rows, in the tables that exist and in every table
the owner creates later (default privileges). Passwords come from the mounted Secret, trimmed like the app. */}}
{{- define "catalog.postgresql.rolesSql" -}}
\set owner {{ .Values.postgresql.auth.ownerUsername }}
\set app {{ .Values.postgresql.auth.username }}
\set database {{ .Values.postgresql.auth.database }}
\set owner_password `sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' /var/run/secrets/postgresql/owner-password`
\set app_password `sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' /var/run/secrets/postgresql/password`
CREATE ROLE :"owner" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
ALTER DATABASE :"database" OWNER TO :"owner";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"app";
ALTER SCHEMA public OWNER TO :"owner";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO :"app";
{{- end -}}

{{/* Who may log in how: in the pod, over the socket, anyone (the init scripts, `kubectl exec ... psql`); over the
network the superuser never, every other role with its password (SCRAM). */}}
{{- define "catalog.postgresql.hba" -}}
# TYPE  DATABASE  USER      ADDRESS  METHOD
local   all       all                trust
host    all       postgres  all      reject
host    all       all       all      scram-sha-256
{{- end -}}
