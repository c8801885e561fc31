#!/usr/bin/env bash
# promtool + a real Prometheus server (Debian's `prometheus`) for the observability tests, and `wrk` for
# `make bench`. Pinned to bookworm's versions; idempotent (no apt call when they are already installed).
# Debian's package would start its own Prometheus on :9090: we keep it from starting (policy-rc.d) and
# stop/disable it in case it did. Tests start their own server on a free port.
set -euo pipefail

PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-2.42.0+ds-5+deb12u1}"
WRK_VERSION="${WRK_VERSION:-4.1.0-3+b2}"

# shellcheck source=../lib/apt-pinned.sh
source "$(dirname "$0")/../lib/apt-pinned.sh"

stop_packaged_prometheus() {
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
}

wanted=()
[ "$(installed_version prometheus)" = "${PROMETHEUS_VERSION}" ] || wanted+=("$(pick_version prometheus "${PROMETHEUS_VERSION}")")
[ "$(installed_version wrk)" = "${WRK_VERSION}" ] || wanted+=("$(pick_version wrk "${WRK_VERSION}")")

if [ "${#wanted[@]}" -gt 0 ]; then
  # Keep maintainer scripts from starting services while we install (restore any policy already there).
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then
    saved="$(mktemp)"
    cp -p "$policy" "$saved"
  fi
  restore_policy() {
    if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  apt-get install -y -qq --no-install-recommends "${wanted[@]}"
  restore_policy
  trap - EXIT
fi

stop_packaged_prometheus

promtool --version 2>&1 | head -n 1
prometheus --version 2>&1 | head -n 1
command -v wrk >/dev/null
