#!/usr/bin/env bash
# Fetches lwIP 2.1.3, the TCP/IP engine of the dpdk stack kind, as Debian 12's source package
# and unpacks it (with Debian's patches) into DEST (default: .deps/lwip beside this repository's
# top-level CMakeLists.txt). The project builds it itself with its own lwipopts.h
# (stacks/dpdk/lwip/); Debian's prebuilt liblwip0 is configured for another system and is not
# used. apt checks the files against the archive's signed Sources index.
#
# Needs network access to the Debian archive and dpkg-dev (dpkg-source). Uses a private apt
# state directory: the machine's sources lists and package lists are left alone.
set -euo pipefail

version=2.1.3+dfsg1-2
here=$(cd "$(dirname "$0")/../.." && pwd)
dest=${1:-$here/.deps/lwip}

if [ -f "$dest/.dmm-version" ] && [ "$(cat "$dest/.dmm-version")" = "$version" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
# deb-src lines derived from the system's own sources (deb822 or one-line format), so a mirror
# or snapshot the machine is configured for is used here too.
uris=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
         2>/dev/null | sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\)[[:space:]]\+bookworm[[:space:]].*/\2/p' \
         | tr ' ' '\n' | grep -v -- '-security' | sort -u || true)
[ -n "$uris" ] || uris=http://deb.debian.org/debian
for u in $uris; do
  echo "deb-src $u bookworm main"
done > "$work/sources.list"
apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o Dir::State::Lists="$work/lists" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only -qq "lwip=$version" >/dev/null)
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
dpkg-source --no-check -x "$work"/lwip_"$version".dsc "$work/src" >/dev/null
mv "$work/src" "$dest"
echo "$version" > "$dest/.dmm-version"
echo "lwIP $version unpacked in $dest"
