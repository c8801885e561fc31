#!/usr/bin/env bash
# End-to-end test of catalog on a real cluster (the current kube context; kind in CI): what a user does
# from the README, step by step. Each step prints what it runs; the first failure stops the script with
# the pods' logs and the namespace's events; everything it created is removed on exit.
#
#   tests/e2e/run.sh                      # or: make e2e
#
# Environment:
#   E2E_SHAPE      standalone (default: the chart's defaults, Redis as its own Deployment + PostgreSQL),
#                  sidecar (Redis in the app pod, one replica) or kustomize (k8s/overlays/dev)
#   E2E_IMAGE      the catalog image, repository:tag, already loadable by the cluster (default catalog:dev;
#                  on kind: `kind load docker-image <image>`)
#   E2E_NAMESPACE  namespace of the helm shapes (default catalog-e2e; the kustomize overlay has its own)
#   E2E_RELEASE    helm release name (default catalog)
#   E2E_TIMEOUT    timeout of installs, rollouts and helm test (default 300s)
#   E2E_PORT       local port of the port-forward (default 18080)
#   E2E_KEEP=1     keep what was installed (for a look after a failure)
#   E2E_DRY_RUN=1  no cluster needed: run every step as far as a read-only API server allows (helm
#                  --dry-run=server, kubectl --dry-run=client, reads); the steps that need running pods
#                  say so and are skipped. The tests run it against a fake API server (tests/e2e/).
#   HELM, KUBECTL  the binaries (default helm, kubectl)
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="${ROOT}/chart"
SHAPE="${E2E_SHAPE:-standalone}"
IMAGE="${E2E_IMAGE:-catalog:dev}"
RELEASE="${E2E_RELEASE:-catalog}"
TIMEOUT="${E2E_TIMEOUT:-300s}"
LOCAL_PORT="${E2E_PORT:-18080}"
HELM="${HELM:-helm}"
KUBECTL="${KUBECTL:-kubectl}"
DRY_RUN="${E2E_DRY_RUN:-}"
KEY_ROTATION_SECONDS=90

case "${SHAPE}" in
  standalone | sidecar)
    NAMESPACE="${E2E_NAMESPACE:-catalog-e2e}"
    SERVICE="${RELEASE}"
    KEYS_SECRET="${RELEASE}-api-keys"
    KEY_NAME=default # auth.generatedKeyName: the key the chart generates once
    ;;
  kustomize)
    NAMESPACE=catalog-dev # set by k8s/overlays/dev
    RELEASE=catalog
    SERVICE=catalog
    KEYS_SECRET=catalog-api-keys
    KEY_NAME=dev
    ;;
  *)
    echo "E2E_SHAPE must be standalone, sidecar or kustomize, not '${SHAPE}'" >&2
    exit 2
    ;;
esac
APP_PODS="app.kubernetes.io/name=catalog,app.kubernetes.io/instance=${RELEASE}"

WORK="$(mktemp -d)"
STEP="start"
PORT_FORWARD_PID=""
INSTALLED=""
CREATED_NAMESPACE=""

# ------------------------------------------------------------------------------------------ helpers

step() {
  STEP="$1"
  printf '\n==> [%s] %s\n' "$(date -u +%H:%M:%S)" "${STEP}"
}
note() { printf '    %s\n' "$*"; }
fail() {
  printf '    FAIL: %s\n' "$*" >&2
  exit 1
}
# run CMD...: print the command (on stderr: stdout may go to a file), then run it
run() {
  local shown=("$@")
  if [ "$1" = kc ]; then shown=("${KUBECTL}" --namespace "${NAMESPACE}" "${@:2}"); fi
  printf '    $ %s\n' "${shown[*]}" >&2
  "$@"
}
kc() { "${KUBECTL}" --namespace "${NAMESPACE}" "$@"; }
dry() { [ -n "${DRY_RUN}" ]; }
# cluster_only: true (and says so) when the step needs running pods, which a dry run has not
cluster_only() {
  if dry; then
    note "dry run: skipped (needs running pods): $*"
    return 0
  fi
  return 1
}
# apply_flags: a dry run validates client-side (the fake API serves no OpenAPI document to validate with)
apply_flags() {
  if dry; then printf '%s\n' --dry-run=client --validate=false; fi
}
# helm_dry_flags: a dry run renders with the API server's state (lookups) and changes nothing; no
# validation against the server's OpenAPI document, which the fake API does not serve
helm_dry_flags() {
  if dry; then printf '%s\n' --dry-run=server --disable-openapi-validation; fi
}

# http METHOD PATH [curl args...]: one request through the port-forward; sets STATUS, keeps the
# headers in ${WORK}/headers and the body in ${WORK}/body (the key is never printed)
http() {
  local method="$1" path="$2"
  shift 2
  STATUS="$(curl -sS -o "${WORK}/body" -D "${WORK}/headers" -w '%{http_code}' --max-time 20 \
    -X "${method}" "$@" "http://127.0.0.1:${LOCAL_PORT}${path}")"
}
header() { grep -i "^$1:" "${WORK}/headers" | tail -n1 | cut -d: -f2- | tr -d ' \r'; }
json_field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "${WORK}/body" "$1"; }
expect() { # STATUS WHAT
  if [ "${STATUS}" != "$1" ]; then
    fail "$2: expected HTTP $1, got ${STATUS}: $(head -c 600 "${WORK}/body")"
  fi
  note "$2 -> ${STATUS}"
}

# wait_until SECONDS WHAT CMD...: retry CMD every 2 s until it succeeds; returns 1 after SECONDS
wait_until() {
  local limit="$1" what="$2" started="${SECONDS}"
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - started >= limit)); then
      note "gave up after ${limit} s: ${what}"
      return 1
    fi
    sleep 2
  done
  note "${what} after $((SECONDS - started)) s"
}

app_pod_names() { kc get pods -l "${APP_PODS}" --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'; }
# pod identity + restart count, to prove that nothing restarted
app_pod_fingerprint() {
  kc get pods -l "${APP_PODS}" \
    -o jsonpath='{range .items[*]}{.metadata.uid}:{range .status.containerStatuses[*]}{.restartCount},{end}{"\n"}{end}' | sort
}

rollout_all() {
  local workload
  for workload in $(kc get deployments,statefulsets -l "app.kubernetes.io/instance=${RELEASE}" -o name); do
    run kc rollout status "${workload}" --timeout "${TIMEOUT}"
  done
}

diagnose() {
  printf '\n==> diagnostics of the failed step "%s" (namespace %s)\n' "${STEP}" "${NAMESPACE}" >&2
  kc get pods -o wide >&2 || true
  local pod
  for pod in $(kc get pods -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
    printf -- '--- logs of %s\n' "${pod}" >&2
    kc logs "${pod}" --all-containers --prefix --tail=200 >&2 || true
    kc logs "${pod}" --all-containers --prefix --tail=100 --previous >/dev/null 2>&1 \
      && kc logs "${pod}" --all-containers --prefix --tail=100 --previous >&2
  done
  printf -- '--- events\n' >&2
  kc get events --sort-by=.lastTimestamp >&2 || true
}

cleanup() {
  local status=$?
  trap - EXIT
  if [ "${status}" -ne 0 ]; then
    printf '\nFAILED at step: %s\n' "${STEP}" >&2
    diagnose || true
  fi
  if [ -n "${PORT_FORWARD_PID}" ]; then kill "${PORT_FORWARD_PID}" 2>/dev/null || true; fi
  if [ -n "${INSTALLED}" ] && [ -z "${E2E_KEEP:-}" ]; then
    printf '\n==> cleanup\n'
    kc delete pod/e2e-load rolebinding/e2e-prometheus --ignore-not-found --wait=false || true
    kc delete -f "${ROOT}/tests/e2e/prometheus.yaml" --ignore-not-found --wait=false || true
    if [ "${SHAPE}" = kustomize ]; then
      "${KUBECTL}" delete -k "${WORK}/overlay" --ignore-not-found --wait=false || true
    else
      "${HELM}" uninstall "${RELEASE}" --namespace "${NAMESPACE}" --ignore-not-found || true
      # what helm uninstall keeps by design: the PostgreSQL volume and the generated Secrets
      kc delete pvc,secret -l "app.kubernetes.io/instance=${RELEASE}" --ignore-not-found --wait=false || true
      if [ -n "${CREATED_NAMESPACE}" ]; then "${KUBECTL}" delete namespace "${NAMESPACE}" --wait=false || true; fi
    fi
  fi
  rm -rf "${WORK}"
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# -------------------------------------------------------------------------------------------- steps

step "preflight: tools, cluster, image (${SHAPE})"
for tool in "${KUBECTL}" "${HELM}" curl python3 openssl; do
  command -v "${tool}" >/dev/null || fail "${tool} is not installed"
done
case "${IMAGE##*/}" in
  *:*) ;;
  *) fail "E2E_IMAGE must be repository:tag, not '${IMAGE}'" ;;
esac
IMAGE_REPOSITORY="${IMAGE%:*}"
IMAGE_TAG="${IMAGE##*:}"
run "${KUBECTL}" config current-context
run "${KUBECTL}" version
run "${HELM}" version --short
if dry; then note "dry run: nothing is changed in the cluster"; fi

step "install"
if [ "${SHAPE}" = kustomize ]; then
  # k8s/overlays/dev as the README applies it, with the image under test (kustomize wants a relative path)
  mkdir -p "${WORK}/overlay"
  overlay="$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' \
    "${ROOT}/k8s/overlays/dev" "${WORK}/overlay")"
  cat >"${WORK}/overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ${overlay}
images:
  - name: catalog
    newName: ${IMAGE_REPOSITORY}
    newTag: "${IMAGE_TAG}"
EOF
  run "${KUBECTL}" kustomize "${WORK}/overlay" >"${WORK}/manifests.yaml"
  if ! dry; then INSTALLED=1; fi
  # shellcheck disable=SC2046 # one flag per line
  run "${KUBECTL}" apply $(apply_flags) -f "${WORK}/manifests.yaml"
else
  shape_values=()
  if [ "${SHAPE}" = sidecar ]; then shape_values=(--set redis.architecture=sidecar --set replicaCount=1); fi
  if ! dry; then
    INSTALLED=1
    "${KUBECTL}" get namespace "${NAMESPACE}" >/dev/null 2>&1 || CREATED_NAMESPACE=1
  fi
  # shellcheck disable=SC2046 # one flag per line
  run "${HELM}" install "${RELEASE}" "${CHART}" --namespace "${NAMESPACE}" --create-namespace \
    --wait --timeout "${TIMEOUT}" \
    --set image.repository="${IMAGE_REPOSITORY}" --set image.tag="${IMAGE_TAG}" "${shape_values[@]}" \
    $(helm_dry_flags) >"${WORK}/install.out"
  sed -n '/^NOTES:/,$p' "${WORK}/install.out"
  cp "${WORK}/install.out" "${WORK}/manifests.yaml"
fi
if dry; then
  grep -q "image: ${IMAGE}\$\|image: \"${IMAGE}\"\$" "${WORK}/manifests.yaml" \
    || fail "the rendered manifests do not run ${IMAGE}"
  note "renders the app with image ${IMAGE}"
fi

step "rollout status"
if ! cluster_only "kubectl rollout status"; then
  rollout_all
  running="$(kc get deployment "${SERVICE}" -o jsonpath='{.spec.template.spec.containers[?(@.name=="catalog")].image}')"
  [ "${running}" = "${IMAGE}" ] || fail "the app runs ${running}, not ${IMAGE}"
  note "the app runs ${IMAGE}"
fi

step "read the API key (${KEYS_SECRET}, client ${KEY_NAME})"
printf '    $ %s\n' "${KUBECTL} --namespace ${NAMESPACE} get secret ${KEYS_SECRET} -o jsonpath='{.data.${KEY_NAME}}' | base64 -d"
KEY="$(kc get secret "${KEYS_SECRET}" -o jsonpath="{.data.${KEY_NAME}}" | base64 -d)" \
  || fail "cannot read Secret ${KEYS_SECRET} in namespace ${NAMESPACE}"
[ "${#KEY}" -ge 16 ] || fail "no usable key under ${KEY_NAME} in Secret ${KEYS_SECRET}"
note "a key of ${#KEY} characters"

step "port-forward service/${SERVICE} ${LOCAL_PORT}:80"
if ! cluster_only "kubectl port-forward"; then
  printf '    $ %s &\n' "${KUBECTL} --namespace ${NAMESPACE} port-forward service/${SERVICE} ${LOCAL_PORT}:80"
  kc port-forward "service/${SERVICE}" "${LOCAL_PORT}:80" >"${WORK}/port-forward.log" 2>&1 &
  PORT_FORWARD_PID=$!
  wait_until 60 "GET /livez answers" curl -fsS "http://127.0.0.1:${LOCAL_PORT}/livez" \
    || fail "the port-forward does not answer: $(cat "${WORK}/port-forward.log")"
  http GET /readyz
  expect 200 "GET /readyz $(cat "${WORK}/body")"
fi

step "the README's curl walkthrough"
if ! cluster_only "create, MISS then HIT, 304, PATCH, 412, DELETE"; then
  auth=(-H "X-Api-Key: ${KEY}")
  sku="E2E-${RANDOM}${RANDOM}"
  http POST /api/v1/products "${auth[@]}" -H 'Content-Type: application/json' -H "Idempotency-Key: ${sku}" \
    -d "{\"sku\":\"${sku}\",\"name\":\"e2e mug\",\"price_cents\":1250,\"currency\":\"EUR\",\"tags\":[\"e2e\"]}"
  expect 201 "POST /api/v1/products"
  id="$(json_field id)"
  path="/api/v1/products/${id}"
  http GET "${path}" "${auth[@]}"
  expect 200 "GET ${path} (X-Cache: $(header X-Cache), ETag: $(header ETag))"
  [ "$(header X-Cache)" = MISS ] || fail "the first GET is not a cache MISS"
  http GET "${path}" "${auth[@]}"
  expect 200 "GET ${path} again (X-Cache: $(header X-Cache))"
  [ "$(header X-Cache)" = HIT ] || fail "the second GET is not a cache HIT"
  http GET "${path}" "${auth[@]}" -H 'If-None-Match: "1"'
  expect 304 "GET ${path} with If-None-Match: \"1\""
  http PATCH "${path}" "${auth[@]}" -H 'Content-Type: application/merge-patch+json' -H 'If-Match: "1"' \
    -d '{"price_cents":990}'
  expect 200 "PATCH ${path} with If-Match: \"1\""
  [ "$(json_field version)" = 2 ] || fail "the PATCH did not make version 2"
  http PATCH "${path}" "${auth[@]}" -H 'Content-Type: application/merge-patch+json' -H 'If-Match: "1"' \
    -d '{"price_cents":1}'
  expect 412 "PATCH ${path} with the stale If-Match: \"1\""
  http DELETE "${path}" "${auth[@]}"
  expect 204 "DELETE ${path}"
  http GET "${path}" "${auth[@]}"
  expect 404 "GET ${path} after the DELETE"
  http GET /api/v1/products
  expect 401 "GET /api/v1/products without a key"
fi

step "/metrics holds the catalog_* series"
if ! cluster_only "GET /metrics"; then
  http GET /metrics
  expect 200 "GET /metrics"
  for series in catalog_cache_requests_total catalog_cache_circuit_open catalog_auth_failures_total \
    catalog_api_keys_loaded catalog_db_queries_total; do
    grep -q "^${series}[{ ]" "${WORK}/body" || fail "/metrics has no ${series}"
  done
  grep -q '^catalog_cache_requests_total{result="hit"} [1-9]' "${WORK}/body" \
    || fail "/metrics counts no cache hit after the HIT above"
  note "catalog_* series present; the cache hit is counted"
fi

step "an in-cluster Prometheus scrapes every app pod (up == 1)"
# shellcheck disable=SC2046 # one flag per line
run kc apply $(apply_flags) -f "${ROOT}/tests/e2e/prometheus.yaml"
printf '    $ %s\n' "${KUBECTL} create rolebinding e2e-prometheus ... --dry-run=client -o yaml | ${KUBECTL} apply -f -"
# shellcheck disable=SC2046 # one flag per line
kc create rolebinding e2e-prometheus --role=e2e-prometheus --serviceaccount="${NAMESPACE}:e2e-prometheus" \
  --dry-run=client -o yaml | kc apply $(apply_flags) -f -
if ! cluster_only "query up"; then
  run kc rollout status deployment/e2e-prometheus --timeout "${TIMEOUT}"
  query="/api/v1/namespaces/${NAMESPACE}/services/e2e-prometheus:9090/proxy/api/v1/query?query=up"
  all_up() {
    local pods up
    pods="$(app_pod_names | tr ' ' '\n' | sort | tr '\n' ' ')"
    up="$("${KUBECTL}" get --raw "${query}" | python3 -c '
import json, sys
print(" ".join(sorted(r["metric"].get("pod", "") for r in json.load(sys.stdin)["data"]["result"] if r["value"][1] == "1")))
')"
    printf '%s\n' "app pods: ${pods}| up == 1: ${up}" >"${WORK}/up.txt"
    [ -n "${pods}" ] && [ "${pods}" = "${up} " ]
  }
  wait_until 120 "every app pod is up == 1" all_up || fail "Prometheus: $(cat "${WORK}/up.txt")"
  note "$(cat "${WORK}/up.txt")"
fi

step "rotate keys with kubectl create secret ... | kubectl apply (in effect within ${KEY_ROTATION_SECONDS} s, no restart)"
NEW_KEY="$(openssl rand -hex 32)"
if ! dry; then before="$(app_pod_fingerprint)"; fi
printf '    $ %s\n' "${KUBECTL} create secret generic ${KEYS_SECRET} --from-literal=${KEY_NAME}=… --from-literal=e2e-rotated=… --dry-run=client -o yaml | ${KUBECTL} apply -f -"
# shellcheck disable=SC2046 # one flag per line
kc create secret generic "${KEYS_SECRET}" --from-literal="${KEY_NAME}=${KEY}" \
  --from-literal="e2e-rotated=${NEW_KEY}" --dry-run=client -o yaml | kc apply $(apply_flags) -f -
if ! cluster_only "wait for the new key"; then
  new_key_works() {
    [ "$(curl -sS -o /dev/null -w '%{http_code}' -H "X-Api-Key: ${NEW_KEY}" \
      "http://127.0.0.1:${LOCAL_PORT}/api/v1/products?limit=1")" = 200 ]
  }
  wait_until "${KEY_ROTATION_SECONDS}" "the new key is accepted" new_key_works \
    || fail "the new key is not accepted within ${KEY_ROTATION_SECONDS} s"
  http GET '/api/v1/products?limit=1' -H "X-Api-Key: ${KEY}"
  expect 200 "the listed old key still works"
  [ "$(app_pod_fingerprint)" = "${before}" ] || fail "pods restarted or were replaced by the rotation"
  note "no pod restarted or was replaced"
fi

step "upgrade while a request loop runs through the Service: 0 failed requests"
if [ "${SHAPE}" = sidecar ]; then
  replicas=1 # a per-pod Redis cannot serve several replicas (the contract): a rolling update at 1 replica
else
  replicas=3
fi
# The loop runs in the cluster against the Service (a port-forward sticks to one pod, which the rollout
# replaces); it counts every answer that is not 200 until it is told to stop.
cat >"${WORK}/load-pod.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: e2e-load
  labels:
    app.kubernetes.io/name: e2e-load
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: loop
      image: ${IMAGE}
      imagePullPolicy: IfNotPresent
      command:
        - python3
        - -c
        - |
          import os, time, urllib.error, urllib.request
          url = "http://${SERVICE}/api/v1/products?limit=1"
          headers = {"X-Api-Key": open("/keys/${KEY_NAME}").read().strip()}
          total = failed = 0
          while not os.path.exists("/tmp/stop"):
              total += 1
              try:
                  with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                      status = r.status
              except urllib.error.HTTPError as error:
                  status = error.code
              except OSError as error:
                  status = repr(error)
              if status != 200:
                  failed += 1
                  print(time.strftime("%H:%M:%S"), "request", total, "failed:", status, flush=True)
              time.sleep(0.1)
          print(f"requests={total} failures={failed}", flush=True)
      securityContext:
        readOnlyRootFilesystem: true
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
      resources:
        requests: {cpu: 20m, memory: 48Mi}
        limits: {cpu: 200m, memory: 96Mi}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: keys, mountPath: /keys, readOnly: true}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: keys
      secret:
        secretName: ${KEYS_SECRET}
EOF
# shellcheck disable=SC2046 # one flag per line
run kc apply $(apply_flags) -f "${WORK}/load-pod.yaml"
if ! dry; then
  run kc wait --for=condition=Ready pod/e2e-load --timeout "${TIMEOUT}"
  sleep 5
fi
rollout_mark="$(date +%s)"
if [ "${SHAPE}" = kustomize ]; then
  cluster_only "kubectl patch the Deployment (the fake API has none to patch)" || {
  patch="{\"spec\":{\"replicas\":${replicas},\"template\":{\"metadata\":{\"annotations\":{\"e2e-rollout\":\"${rollout_mark}\"}}}}}"
  run kc patch deployment "${SERVICE}" --type merge -p "${patch}"
  run kc rollout status "deployment/${SERVICE}" --timeout "${TIMEOUT}"
  }
else
  # shellcheck disable=SC2046 # one flag per line
  run "${HELM}" upgrade "${RELEASE}" "${CHART}" --namespace "${NAMESPACE}" --reuse-values \
    --set replicaCount="${replicas}" --set-string podAnnotations.e2e-rollout="${rollout_mark}" \
    --wait --timeout "${TIMEOUT}" $(dry && printf '%s\n' --install "${shape_values[@]}" \
      --set image.repository="${IMAGE_REPOSITORY}" --set image.tag="${IMAGE_TAG}") \
    $(helm_dry_flags) >"${WORK}/upgrade.out"
  if dry; then
    grep -q "^  replicas: ${replicas}\$" "${WORK}/upgrade.out" || fail "the upgrade does not render ${replicas} replicas"
    grep -q "e2e-rollout: \"${rollout_mark}\"" "${WORK}/upgrade.out" || fail "the upgrade does not change the pod template"
    note "renders ${replicas} replicas and a new pod template"
  fi
fi
if ! cluster_only "count the loop's failures"; then
  ready="$(kc get deployment "${SERVICE}" -o jsonpath='{.status.readyReplicas}')"
  [ "${ready}" = "${replicas}" ] || fail "${ready} ready replicas, not ${replicas}"
  sleep 15 # the replaced pods drain (preStop + graceful shutdown) while the loop goes on
  run kc exec e2e-load -- python3 -c 'open("/tmp/stop", "w").close()'
  run kc wait --for=jsonpath='{.status.phase}'=Succeeded pod/e2e-load --timeout 60s
  summary="$(kc logs e2e-load)"
  printf '%s\n' "${summary}" | sed 's/^/    loop: /'
  [[ "${summary}" =~ requests=([0-9]+)\ failures=0 ]] || fail "requests failed during the upgrade"
  ((BASH_REMATCH[1] >= 50)) || fail "the loop sent only ${BASH_REMATCH[1]} requests"
  note "${replicas} ready replicas; ${BASH_REMATCH[1]} requests, 0 failed"
fi

step "helm test"
if [ "${SHAPE}" = kustomize ]; then
  note "not applicable: the kustomize manifests have no helm tests"
elif ! cluster_only "helm test"; then
  # no --logs: the chart deletes passed test pods (nothing is left behind); a failed one stays, and the
  # diagnostics print its logs
  run "${HELM}" test "${RELEASE}" --namespace "${NAMESPACE}" --timeout "${TIMEOUT}"
fi

step "uninstall leaves nothing behind"
if ! cluster_only "uninstall and look for leftovers"; then
  run kc delete pod/e2e-load rolebinding/e2e-prometheus --wait
  run kc delete -f "${ROOT}/tests/e2e/prometheus.yaml" --wait
  if [ "${SHAPE}" = kustomize ]; then
    run "${KUBECTL}" delete -k "${WORK}/overlay" --wait --timeout "${TIMEOUT}"
    INSTALLED=""
    ! "${KUBECTL}" get namespace "${NAMESPACE}" >/dev/null 2>&1 || fail "namespace ${NAMESPACE} is still there"
    note "namespace ${NAMESPACE} deleted with everything in it, its PVC too"
  else
    run "${HELM}" uninstall "${RELEASE}" --namespace "${NAMESPACE}" --wait --timeout "${TIMEOUT}"
    INSTALLED=""
    # Kept by design: the PostgreSQL volume (helm never deletes PVCs) and the Secrets the chart generated
    # with helm.sh/resource-policy: keep (a reinstall must find the password the data was made with).
    kept() {
      kc get pvc -o name
      kc get secrets -o jsonpath='{range .items[?(@.metadata.annotations.helm\.sh/resource-policy=="keep")]}secret/{.metadata.name}{"\n"}{end}'
    }
    leftovers() {
      local kinds
      kinds="$("${KUBECTL}" api-resources --verbs=list --namespaced -o name | grep -v -e '^events' | paste -sd, -)"
      kc get "${kinds}" -o name 2>/dev/null \
        | grep -v -x -F -e configmap/kube-root-ca.crt -e serviceaccount/default -f <(kept) \
          >"${WORK}/leftovers.txt" || true
      [ ! -s "${WORK}/leftovers.txt" ]
    }
    wait_until 120 "no other object of the release is left" leftovers \
      || fail "left behind by helm uninstall: $(tr '\n' ' ' <"${WORK}/leftovers.txt")"
    note "kept by design, deleted by the cleanup: $(kept | tr '\n' ' ')"
    INSTALLED=1 # let the cleanup delete the PVC and the namespace
  fi
fi

printf '\nPASSED: %s shape, image %s%s\n' "${SHAPE}" "${IMAGE}" "$(dry && echo ' (dry run)')"
