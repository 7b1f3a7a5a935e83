# shellcheck shell=bash disable=SC2034  # variables for the scripts that source this
# Helpers shared by the package test scripts (sourced, not run).

# Where the root filesystem tarball and the apt download cache live: outside the clone, so
# every clone and build directory of the machine shares them.
PKGTEST_CACHE=${DMM_PKGTEST_CACHE:-/var/cache/dmm-sidecar-pkgtest}
# Debian 12: the release the packages are built on and for.
PKGTEST_SUITE=bookworm

pkgtest_log() { printf '%s\n' "$*" >&2; }
pkgtest_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Milliseconds since the epoch; pkgtest_secs START prints the seconds since START (ms), e.g. 1.25.
pkgtest_now() { date +%s%3N; }
pkgtest_secs() {
  local ms=$(( $(pkgtest_now) - $1 ))
  printf '%d.%02d' $(( ms / 1000 )) $(( ms % 1000 / 10 ))
}

# pkgtest_private_mounts "$@": first thing in a script, re-runs it in a mount namespace of its
# own, so a tmpfs and any other mount it makes vanish with it, even if it is SIGKILLed.
pkgtest_private_mounts() {
  [ -n "${_PKGTEST_PRIVATE_MOUNTS:-}" ] && return 0
  pkgtest_need_root
  exec env _PKGTEST_PRIVATE_MOUNTS=1 unshare --mount --propagation private -- "$BASH" "$0" "$@"
}

pkgtest_need_root() {
  [ "$(id -u)" -eq 0 ] || pkgtest_die "run as root (debootstrap, chroot, systemd-nspawn)"
}

# pkgtest_need_cmds CMD:PACKAGE... fails naming the Debian packages to install.
pkgtest_need_cmds() {
  local spec missing=()
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  [ ${#missing[@]} -eq 0 ] ||
    pkgtest_die "missing tools; apt-get install --no-install-recommends ${missing[*]}"
}

# The machine's own apt sources, one "URI SUITE COMPONENT..." line per enabled deb source, from
# /etc/apt/sources.list, sources.list.d/*.list (one-line format) and sources.list.d/*.sources
# (deb822). Other file names in sources.list.d are ignored, as apt ignores them.
pkgtest_apt_sources() {
  local f files=() etc=${PKGTEST_APT_ETC:-/etc/apt}
  [ -f "$etc"/sources.list ] && files+=("$etc"/sources.list)
  for f in "$etc"/sources.list.d/*.list; do [ -f "$f" ] && files+=("$f"); done
  [ ${#files[@]} -gt 0 ] && awk '
    { sub(/#.*/, ""); gsub(/\[[^]]*\]/, "") }   # comments, [arch=... signed-by=...] options
    $1 == "deb" && NF >= 4 { line = $2 " " $3; for (i = 4; i <= NF; i++) line = line " " $i; print line }
  ' "${files[@]}"
  files=()
  for f in "$etc"/sources.list.d/*.sources; do [ -f "$f" ] && files+=("$f"); done
  [ ${#files[@]} -gt 0 ] && awk '
    function flush(   nu, ns, u, s, i, j) {
      if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
        nu = split(uris, u, " "); ns = split(suites, s, " ")
        for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) print u[i] " " s[j] " " comps
      }
      types = uris = suites = comps = enabled = ""; key = ""; split("", field)
    }
    FNR == 1 { flush() }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    /^[ \t]/ { val = $0; gsub(/^[ \t]+|[ \t]+$/, "", val); field[key] = field[key] " " val; assign(); next }
    {
      key = tolower($0); sub(/:.*/, "", key)
      val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
      field[key] = val; assign()
    }
    function assign() {
      types = field["types"]; uris = field["uris"]; suites = field["suites"]
      comps = field["components"]; enabled = field["enabled"]
    }
    END { flush() }
  ' "${files[@]}"
  return 0
}
