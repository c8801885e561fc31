# Sourced by .ci/tools/*.sh: install Debian packages at pinned versions, with no apt call when they are.

installed_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3 == "installed" {print $4}'; }

# The pinned version if the archive still has it; else (a Debian point release replaced it) the
# archive's current one for the same suite, loudly, rather than failing the whole CI run.
pick_version() {
  local pkg="$1" want="$2"
  if apt-cache madison "$pkg" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF "$want"; then
    echo "${pkg}=${want}"
  else
    echo "WARNING: ${pkg} ${want} is not in the apt archive any more; installing its current version" >&2
    echo "${pkg}"
  fi
}

# install_pinned PACKAGE=VERSION ...: apt-get install whichever is not installed at that version.
install_pinned() {
  local wanted=() spec pkg version
  for spec in "$@"; do
    pkg="${spec%%=*}" version="${spec#*=}"
    [ "$(installed_version "$pkg")" = "$version" ] || wanted+=("$(pick_version "$pkg" "$version")")
  done
  if [ "${#wanted[@]}" -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${wanted[@]}"
  fi
}
