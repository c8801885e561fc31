{{/*
A helm test pod running a Python check with the app image (no other image to pull).
(dict "ctx" $ "check" "readyz" "weight" "1" "script" "...")
*/}}
{{- define "catalog.testPod" -}}
{{- $ctx := .ctx -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "catalog.suffixedName" (dict "ctx" $ctx "suffix" (printf "test-%s" .check)) }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "catalog.labelsFor" (dict "ctx" $ctx "name" (printf "%s-test" (include "catalog.name" $ctx)) "component" "test") | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-weight: {{ .weight | quote }}
    # A passed check leaves nothing behind (helm uninstall never deletes hook pods); a failed one stays for
    # `kubectl logs` until the next `helm test`. (So `helm test --logs` cannot read the passed ones.)
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  enableServiceLinks: false
  serviceAccountName: {{ include "catalog.serviceAccountName" $ctx }}
  {{- include "catalog.imagePullSecrets" $ctx | nindent 2 }}
  securityContext:
    {{- include "catalog.securityContext" (dict "ctx" $ctx "context" $ctx.Values.podSecurityContext) | nindent 4 }}
  containers:
    - name: {{ .check }}
      image: {{ include "catalog.image" $ctx }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      env:
        - name: CATALOG_URL
          value: {{ printf "http://%s:%v" (include "catalog.fullname" $ctx) $ctx.Values.service.port | quote }}
        - name: CATALOG_API_KEY_HEADER
          value: {{ $ctx.Values.config.apiKeyHeader | quote }}
        - name: CATALOG_SHARED_CACHE
          value: {{ ternary "true" "false" (eq (include "catalog.redis.inUse" $ctx) "true") | quote }}
        - name: PYTHONDONTWRITEBYTECODE
          value: "1"
      command:
        - python3
        - -c
        - |
          {{- include "catalog.testCommon" . | nindent 10 }}
          {{- .script | nindent 10 }}
      securityContext:
        {{- include "catalog.securityContext" (dict "ctx" $ctx "context" $ctx.Values.securityContext) | nindent 8 }}
      resources:
        {{- toYaml $ctx.Values.tests.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if .apiKeys }}
        - name: api-keys
          mountPath: /var/run/secrets/catalog/api-keys
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 16Mi
    {{- if .apiKeys }}
    - name: api-keys
      secret:
        secretName: {{ include "catalog.apiKeys.secretName" $ctx }}
        defaultMode: 0440
    {{- end }}
{{- end -}}

{{- define "catalog.testCommon" -}}
import json, os, pathlib, sys, time, urllib.error, urllib.request

BASE = os.environ["CATALOG_URL"]
HEADER = os.environ["CATALOG_API_KEY_HEADER"]


def api_key(write=False):
    # A usable plain key of the mounted Secret (sha256-only entries cannot be sent) with the read scope; with
    # write=True one that may write too, if the Secret has one.
    root = pathlib.Path("/var/run/secrets/catalog/api-keys")
    found = []
    for f in sorted(root.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        value, scopes = f.read_text().strip(), ["read", "write"]
        if value.startswith("{"):
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            value, scopes = doc.get("key") or "", doc.get("scopes", scopes)
        if "read" in scopes and len(value) >= 16 and not value.startswith("sha256:"):
            found.append((f.name, value, "write" in scopes))
    if not found:
        sys.exit("FAIL: no plain API key with the read scope in the Secret")
    name, value, _ = sorted(found, key=lambda k: not (write and k[2]))[0]
    return name, value


def call(method, path, key=None, body=None, attempts=30):
    headers = {"Accept": "application/json"}
    if key:
        headers[HEADER] = key
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    for attempt in range(attempts):
        req = urllib.request.Request(BASE + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()
        except OSError as err:
            print(f"{method} {path}: {err}; retrying", flush=True)
            time.sleep(2)
    sys.exit(f"FAIL: {method} {path} unreachable")
{{- end -}}
