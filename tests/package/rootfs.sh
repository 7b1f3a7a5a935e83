#!/usr/bin/env bash
# Builds, or reuses, the Debian 12 minbase root filesystem the package tests boot with
# systemd-nspawn, kept as a zstd tarball in the cache directory (outside the clone).
#
#   tests/package/rootfs.sh [--rebuild] [--mirror URL]
#
# Prints the tarball's path on stdout; progress and timings go to stderr. The cache directory is
# $DMM_PKGTEST_CACHE (default /var/cache/dmm-sidecar-pkgtest). The tarball's name carries a hash
# of the recipe (suite, architecture, package list, apt sources, recipe_version below), so
# changing any of them builds a new one; --rebuild builds even when a matching tarball exists
# (for a newer point release, say). The mirror is the machine's own (its apt sources), unless
# --mirror is given.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

# systemd as PID 1 and what the lifecycle test runs inside: iptables (the capture chain),
# procps (ps, kill), iproute2 (ss), curl (the metrics endpoint).
packages=(systemd systemd-sysv dbus iproute2 iptables procps curl)
# Bump when what is done to the tree after debootstrap changes (cached tarballs are then rebuilt).
recipe_version=1
rebuild=0
mirror=${DMM_PKGTEST_MIRROR:-}
args=("$@")

while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) rebuild=1 ;;
    --mirror) mirror=${2:?--mirror needs a URL}; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pkgtest_die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

pkgtest_need_root
pkgtest_need_cmds debootstrap:debootstrap zstd:zstd flock:util-linux unshare:util-linux
pkgtest_private_mounts "${args[@]}"

# The sources the container's apt uses later (dependencies of the package under test): the
# machine's entries for the suite, its updates and its security archive.
sources=$(pkgtest_apt_sources | awk -v s="$PKGTEST_SUITE" \
  '$2 == s || $2 == s "-updates" || $2 == s "-security"' | sort -u)
if [ -z "$mirror" ]; then
  mirror=$(awk -v s="$PKGTEST_SUITE" '$2 == s { print $1; exit }' <<<"$sources")
  [ -n "$mirror" ] ||
    pkgtest_die "no '$PKGTEST_SUITE' entry in this machine's apt sources; pass --mirror URL"
fi
[ -n "$sources" ] || sources="$mirror $PKGTEST_SUITE main"
# apt needs ca-certificates to check an https mirror's certificate.
grep -q '^https:' <<<"$sources" && packages+=(ca-certificates)

arch=$(dpkg --print-architecture)
recipe=$(printf '%s\n' "$recipe_version" "$PKGTEST_SUITE" "$arch" "${packages[*]}" "$sources" |
  sha256sum | cut -c1-12)
tarball="$PKGTEST_CACHE/rootfs-$PKGTEST_SUITE-$arch-$recipe.tar.zst"

mkdir -p "$PKGTEST_CACHE"
# One builder at a time; a second caller waits, then finds the tarball made.
exec 9>"$PKGTEST_CACHE/.rootfs.lock"
flock 9

if [ "$rebuild" = 0 ] && [ -s "$tarball" ]; then
  pkgtest_log "rootfs: cached $tarball ($(du -h "$tarball" | cut -f1))"
  echo "$tarball"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/dmm-pkgtest-rootfs.XXXXXX")
cleanup() {
  # debootstrap mounts /proc and /sys in the target and normally unmounts them, and the tmpfs
  # is this mount namespace's: make sure no mount is left before deleting.
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r)
  rm -rf --one-file-system "$work"
  rm -f "$tarball.tmp"
}
trap cleanup EXIT

root=$work/root
mkdir "$root"
# On a tmpfs, as the containers: dpkg fsyncs every file it unpacks, which is slow on a disk.
if [ "${DMM_PKGTEST_TMPFS:-1}" = 1 ]; then
  mount -t tmpfs -o "mode=0755,size=${DMM_PKGTEST_TMPFS_SIZE:-3g}" dmm-pkgtest-rootfs "$root"
fi
t0=$(pkgtest_now)
pkgtest_log "rootfs: debootstrap $PKGTEST_SUITE ($arch) from $mirror"
include=$(IFS=,; echo "${packages[*]}")
if ! debootstrap --variant=minbase --include="$include" --components=main \
    "$PKGTEST_SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
  pkgtest_die "debootstrap failed"
fi
t_debootstrap=$(pkgtest_secs "$t0")

echo dmm-pkgtest >"$root/etc/hostname"
awk '{ printf "deb %s %s", $1, $2; for (i = 3; i <= NF; i++) printf " %s", $i; print "" }' \
  <<<"$sources" >"$root/etc/apt/sources.list"
cat >"$root/etc/apt/apt.conf.d/90dmm-pkgtest" <<'EOF'
// Test container: only what a package asks for, no translations.
APT::Install-Recommends "false";
Acquire::Languages "none";
EOF
# Quieter boots: no timers that would run apt or fstrim, no getty on the read-only console.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer systemd-tmpfiles-clean.timer console-getty.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# The package lists are stale by the time a test runs (it updates them); keep the tarball small.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root/debootstrap"
mkdir -p "$root/var/lib/apt/lists/partial"

t1=$(pkgtest_now)
# Written next to its final name, then renamed: readers never see half a tarball.
tar -C "$root" --numeric-owner --xattrs --acls -cf - . | zstd -q -T0 -o "$tarball.tmp"
mv -f "$tarball.tmp" "$tarball"
t_tar=$(pkgtest_secs "$t1")
# Tarballs of earlier recipes are not used any more.
find "$PKGTEST_CACHE" -maxdepth 1 -name "rootfs-$PKGTEST_SUITE-$arch-*.tar.zst" \
  ! -name "$(basename "$tarball")" -delete

size=$(du -sh "$root" | cut -f1)
pkgtest_log "rootfs: built in $(pkgtest_secs "$t0") s (debootstrap $t_debootstrap s, tar+zstd $t_tar s)," \
  "$size unpacked, $(du -h "$tarball" | cut -f1) as $tarball"
echo "$tarball"
