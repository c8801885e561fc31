#!/usr/bin/env bash
# podman + runc (build and run the image for real) and debootstrap (the tests build their own Debian
# bookworm base image, since no container registry is reachable). Pinned to bookworm's versions;
# idempotent: no apt call when they are installed, and the config edits below are no-ops when applied.
# Config:
#   /etc/containers/containers.conf  [engine] runtime = "runc" (and, on a machine without systemd, the
#                                    cgroupfs manager and a file event log). No default_ulimits: the tests
#                                    pass explicit --ulimit values the host allows, as a fresh machine needs.
#   /etc/containers/registries.conf.d/50-catalog-ci.conf  short-name-mode = "disabled" (never prompt)
set -euo pipefail

PODMAN_VERSION="${PODMAN_VERSION:-4.3.1+ds1-8+deb12u1+b3}"
RUNC_VERSION="${RUNC_VERSION:-1.1.5+ds1-1+deb12u1}"
DEBOOTSTRAP_VERSION="${DEBOOTSTRAP_VERSION:-1.0.128+nmu2+deb12u2}"

# shellcheck source=../lib/apt-pinned.sh
source "$(dirname "$0")/../lib/apt-pinned.sh"

install_pinned "podman=${PODMAN_VERSION}" "runc=${RUNC_VERSION}" "debootstrap=${DEBOOTSTRAP_VERSION}"

# set_toml_key FILE SECTION KEY VALUE: make `KEY = VALUE` the (only) setting of KEY in [SECTION] of
# FILE, keeping every other line as it is: replaces an active setting, else adds it right under the
# section header, else appends the section. (Commented-out `# KEY = ...` lines are left alone.)
set_toml_key() {
  local file="$1" section="$2" key="$3" value="$4" tmp
  touch "${file}"
  tmp="$(mktemp)"
  # Two passes over FILE: the first finds whether [SECTION] already sets KEY; the second writes.
  awk -v section="[${section}]" -v key="${key}" -v line="${key} = ${value}" '
    FNR == 1 { pass++; in_section = 0; skipping = 0 }
    {
      trimmed = $0
      sub(/^[ \t]+/, "", trimmed)
      sub(/[ \t]+$/, "", trimmed)
      if (skipping) { if (trimmed ~ /\]/) skipping = 0; next }
      if (trimmed ~ /^\[/) {
        in_section = (trimmed == section)
        if (pass == 2) {
          print
          if (in_section && !has_key && !done) { print line; done = 1 }
        }
        next
      }
      if (in_section && trimmed ~ ("^" key "[ \t]*=")) {
        # an active setting of KEY: replaced in place (the first one), with the continuation lines of
        # a multi-line array
        if (trimmed ~ /=[ \t]*\[/ && trimmed !~ /\]/) skipping = 1
        if (pass == 1) { has_key = 1; next }
        if (!done) { print line; done = 1 }
        next
      }
      if (pass == 2) print
    }
    END { if (!done) { print ""; print section; print line } }
  ' "${file}" "${file}" >"${tmp}"
  if ! cmp -s "${tmp}" "${file}"; then
    cat "${tmp}" >"${file}"
  fi
  rm -f "${tmp}"
}

mkdir -p /etc/containers /etc/containers/registries.conf.d
conf=/etc/containers/containers.conf
set_toml_key "${conf}" engine runtime '"runc"'
if [ ! -d /run/systemd/system ]; then
  # No systemd here (CI containers/VMs): cgroups and the event log must not go through it.
  set_toml_key "${conf}" engine cgroup_manager '"cgroupfs"'
  set_toml_key "${conf}" engine events_logger '"file"'
fi

# Short names: never prompt (the tests only use fully qualified localhost/... names anyway).
printf '# Written by catalog .ci/tools/40-podman.sh: never prompt for a short image name.\nshort-name-mode = "disabled"\n' \
  >/etc/containers/registries.conf.d/50-catalog-ci.conf.tmp
if ! cmp -s /etc/containers/registries.conf.d/50-catalog-ci.conf.tmp /etc/containers/registries.conf.d/50-catalog-ci.conf; then
  mv -f /etc/containers/registries.conf.d/50-catalog-ci.conf.tmp /etc/containers/registries.conf.d/50-catalog-ci.conf
else
  rm -f /etc/containers/registries.conf.d/50-catalog-ci.conf.tmp
fi

podman --version
runc --version | head -n 1
echo "debootstrap $(installed_version debootstrap)"
