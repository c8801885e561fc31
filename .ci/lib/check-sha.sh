# Sourced by .ci/tools/*.sh: stop the install when a downloaded file is not the pinned one.

check_sha() { # file sha
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "${got}" != "$2" ]; then
    echo "sha256 mismatch for $1: got ${got}, want $2" >&2
    exit 1
  fi
}
