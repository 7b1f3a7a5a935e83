#!/usr/bin/env bash
# Self-check of the package test bed, without the real package: builds a throw-away stand-in
# dmm-sidecar .deb (and .rpm, if rpmbuild is there) in a temp dir, runs test-deb.sh on it and
# expects every step to pass; then runs it on a deliberately broken stand-in and expects exactly
# the failures planted in it. The stand-in is a shell script "daemon" (Type=notify through
# systemd-notify, a perl-base metrics responder, the capture chain made by ExecStartPre) that
# honours the package contract test-deb.sh checks. It is never installed on this machine.
#
#   tests/package/selftest.sh [--rebuild-rootfs] [--no-negative] [--keep-logs]
#   tests/package/selftest.sh --build-only DIR    # only write the stand-in packages to DIR
#
# Needs root (see test-deb.sh). Prints the timings: rootfs build (with --rebuild-rootfs),
# unpack, dependencies, boot, whole runs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"

rebuild=0 negative=1 keep=() build_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild-rootfs) rebuild=1 ;;
    --no-negative) negative=0 ;;
    --keep-logs) keep=(--keep-logs) ;;
    --build-only) build_only=$(mkdir -p "${2:?}" && cd "$2" && pwd); shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pkgtest_die "unknown argument: $1" ;;
  esac
  shift
done
pkgtest_need_root
pkgtest_need_cmds dpkg-deb:dpkg

work=$(mktemp -d "${TMPDIR:-/var/tmp}/dmm-pkgtest-selftest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- the stand-in -------------------------------------------------------------------------------
# make_standin DIR VARIANT: the package tree (good | broken) in DIR.
make_standin() {
  local d=$1 variant=$2
  mkdir -p "$d/DEBIAN" "$d/usr/bin" "$d/usr/lib/systemd/system" "$d/usr/lib/sysusers.d" \
    "$d/etc/dmm-sidecar/policy.d" "$d/usr/lib/dmm-sidecar"

  cat >"$d/usr/bin/dmm-sidecar" <<'EOF'
#!/bin/bash
# Stand-in for dmm-sidecar, made by tests/package/selftest.sh: NOT the real daemon.
set -u
conf=/etc/dmm-sidecar/sidecar.toml
chain=DMM_SIDECAR
case "${1:-}" in
  "") ;;
  ctl) [ "${2:-}" = status ] || exit 2; echo "stand-in: serving, config $conf"; exit 0 ;;
  capture)
    case "${2:-}" in
      install)
        iptables -w -t nat -N "$chain" 2>/dev/null || iptables -w -t nat -F "$chain"
        iptables -w -t nat -C OUTPUT -p tcp -j "$chain" 2>/dev/null ||
          iptables -w -t nat -A OUTPUT -p tcp -j "$chain" ;;
      remove)
        while iptables -w -t nat -D OUTPUT -p tcp -j "$chain" 2>/dev/null; do :; done
        if iptables -w -t nat -S "$chain" >/dev/null 2>&1; then
          iptables -w -t nat -F "$chain" && iptables -w -t nat -X "$chain"
        fi ;;
      *) exit 2 ;;
    esac
    exit ;;
  *) echo "stand-in: unknown command $1" >&2; exit 2 ;;
esac
# Metrics: one connection at a time, from perl-base (every Debian has it).
perl -MIO::Socket::INET -e '
  $SIG{PIPE} = "IGNORE";
  my $l = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 17090,
                                Listen => 8, ReuseAddr => 1) or die "listen: $!\n";
  my $body = "# HELP dmm_sidecar_up Whether the stand-in runs.\n"
           . "# TYPE dmm_sidecar_up gauge\ndmm_sidecar_up 1\n";
  while (1) {
    my $c = $l->accept or next;
    while (my $line = <$c>) { last if $line =~ /^\r?\n$/ }
    print $c "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
           . "Content-Length: " . length($body) . "\r\n\r\n" . $body;
    close $c;
  }' &
metrics=$!
trap 'echo "reload: $conf re-read"' HUP
trap 'echo "received SIGTERM, stopping"; kill "$metrics"; exit 0' TERM
until (exec 3<>/dev/tcp/127.0.0.1/17090) 2>/dev/null; do sleep 0.05; done
echo "dmm-sidecar 0.0~standin started: $(grep -c . "$conf") config lines"
systemd-notify --ready --status="stand-in: metrics on 127.0.0.1:17090"
while :; do sleep 1 & wait $!; done
EOF
  chmod 755 "$d/usr/bin/dmm-sidecar"

  local stop_post='ExecStopPost=+/usr/bin/dmm-sidecar capture remove'
  [ "$variant" = broken ] && stop_post='# (broken: the chain is not removed at stop)'
  cat >"$d/usr/lib/systemd/system/dmm-sidecar.service" <<EOF
[Unit]
Description=dmm-sidecar stand-in (package test bed self-check)

[Service]
Type=notify
# systemd-notify is a child of the script, not its main process.
NotifyAccess=all
User=dmm-sidecar
ExecStartPre=+/usr/bin/dmm-sidecar capture install
ExecStart=/usr/bin/dmm-sidecar
# The shell's kill: /bin/kill is procps's.
ExecReload=/bin/sh -c 'kill -HUP "\$MAINPID"'
$stop_post

[Install]
WantedBy=multi-user.target
EOF
  printf 'u dmm-sidecar - "dmm-sidecar (test stand-in)" - -\n' \
    >"$d/usr/lib/sysusers.d/dmm-sidecar.conf"
  printf '# stand-in configuration\ngreeting = "hello"\n' >"$d/etc/dmm-sidecar/sidecar.toml"
  # Stands for the preload library: private directory, never on the default search path.
  printf 'not a real library\n' >"$d/usr/lib/dmm-sidecar/libdmm-preload.so"

  local depends="bash, perl-base, systemd, iptables, libevent-2.1-7 (>= 2.1.8-stable)"
  [ "$variant" = broken ] && depends="bash, perl-base, systemd, libevent-2.1-7 (>= 2.1.8-stable)"
  cat >"$d/DEBIAN/control" <<EOF
Package: dmm-sidecar
Version: 0.0~standin1
Architecture: all
Maintainer: dmm-sidecar package test bed <noreply@invalid>
Depends: $depends
Section: net
Priority: optional
Description: stand-in for dmm-sidecar (package test bed self-check only)
 A shell script honouring the package contract of tests/package/test-deb.sh.
EOF
  [ "$variant" = broken ] || echo /etc/dmm-sidecar/sidecar.toml >"$d/DEBIAN/conffiles"

  cat >"$d/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  systemd-sysusers dmm-sidecar.conf
  if [ -d /run/systemd/system ]; then systemctl --system daemon-reload >/dev/null || true; fi
fi
EOF
  cat >"$d/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop dmm-sidecar.service || true
fi
EOF
  cat >"$d/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl --system daemon-reload >/dev/null || true; fi
if [ "$1" = purge ]; then
  # The admin's "systemctl enable" links are not dpkg's: remove them with the rest.
  rm -f /etc/systemd/system/*.wants/dmm-sidecar.service
fi
EOF
  chmod 755 "$d/DEBIAN/postinst" "$d/DEBIAN/prerm" "$d/DEBIAN/postrm"
}

# make_rpm TREE OUT.rpm: the same files as a noarch rpm with the scriptlets an rpm needs.
make_rpm() {
  local tree=$1 out=$2 top="$work/rpmbuild"
  mkdir -p "$top/SPECS"
  cat >"$top/SPECS/standin.spec" <<EOF
Name: dmm-sidecar
Version: 0.0
Release: standin1
Summary: stand-in for dmm-sidecar (package test bed self-check only)
License: none
BuildArch: noarch
AutoReqProv: no
Requires: iptables, libevent

%description
A shell script honouring the package contract of tests/package/test-deb.sh.

%install
cp -a $tree/usr $tree/etc %{buildroot}/

%post
systemd-sysusers dmm-sidecar.conf || :
systemctl daemon-reload >/dev/null 2>&1 || :

%preun
[ \$1 -eq 0 ] && systemctl stop dmm-sidecar.service >/dev/null 2>&1 || :

%postun
systemctl daemon-reload >/dev/null 2>&1 || :

%files
/usr/bin/dmm-sidecar
/usr/lib/systemd/system/dmm-sidecar.service
/usr/lib/sysusers.d/dmm-sidecar.conf
/usr/lib/dmm-sidecar
%dir /etc/dmm-sidecar
%dir /etc/dmm-sidecar/policy.d
%config(noreplace) /etc/dmm-sidecar/sidecar.toml
EOF
  rpmbuild -bb --quiet --define "_topdir $top" "$top/SPECS/standin.spec" >"$work/rpmbuild.log" 2>&1 ||
    { cat "$work/rpmbuild.log" >&2; pkgtest_die "rpmbuild failed"; }
  mv "$top"/RPMS/noarch/dmm-sidecar-*.rpm "$out"
}

t0=$(pkgtest_now)
if [ "$rebuild" = 1 ]; then
  "$here/rootfs.sh" --rebuild >/dev/null
  echo "== rootfs rebuilt in $(pkgtest_secs "$t0") s"
fi

for variant in good broken; do
  make_standin "$work/$variant" "$variant"
  dpkg-deb --root-owner-group -Zxz --build "$work/$variant" \
    "$work/dmm-sidecar_0.0~standin1_all.$variant.deb" >/dev/null
done
pkgs=("$work/dmm-sidecar_0.0~standin1_all.good.deb")
if command -v rpmbuild >/dev/null; then
  make_rpm "$work/good" "$work/dmm-sidecar-0.0-standin1.noarch.rpm"
  pkgs+=("$work/dmm-sidecar-0.0-standin1.noarch.rpm")
fi
echo "== stand-in packages built in $(pkgtest_secs "$t0") s"
if [ -n "$build_only" ]; then
  cp "${pkgs[@]}" "$work/dmm-sidecar_0.0~standin1_all.broken.deb" "$build_only/"
  ls -1 "$build_only"
  exit 0
fi

status=0
t1=$(pkgtest_now)
echo "== test-deb.sh on the stand-in: every step must pass"
"$here/test-deb.sh" --artifacts "$work/good-logs" "${keep[@]}" "${pkgs[@]}" | tee "$work/good.out" ||
  { echo "SELFTEST FAIL: test-deb.sh failed on the good stand-in"; status=1; }
echo "== whole run: $(pkgtest_secs "$t1") s"
if grep -qE '^(SKIP|WARN)  ' "$work/good.out"; then
  echo "SELFTEST FAIL: steps skipped or warned on the good stand-in:"
  grep -E '^(SKIP|WARN)  ' "$work/good.out"
  status=1
fi

if [ "$negative" = 1 ]; then
  echo
  echo "== test-deb.sh on the broken stand-in: exactly the planted failures"
  t2=$(pkgtest_now)
  rc=0
  "$here/test-deb.sh" --artifacts "$work/broken-logs" "$work/dmm-sidecar_0.0~standin1_all.broken.deb" \
    >"$work/broken.out" 2>&1 || rc=$?
  failed=$(awk '$1 == "FAIL" && NF >= 3 { print $2 }' "$work/broken.out" | sort | paste -sd' ' -)
  # No conffiles and no iptables in Depends (static), the conffile not registered (installed),
  # the chain left behind by stop, the config gone at remove (not a conffile).
  expected="deb.conffiles deb.runtime-tools install.files remove.dpkg service.stop"
  echo "exit $rc, failed: $failed ($(pkgtest_secs "$t2") s)"
  if [ "$rc" -ne 1 ] || [ "$failed" != "$expected" ]; then
    echo "SELFTEST FAIL: expected exit 1 and failures '$expected'"
    cat "$work/broken.out"
    status=1
  fi
  [ -f "$work/broken-logs/dmm-pkgtest-journal.txt" ] ||
    { echo "SELFTEST FAIL: no journal saved for the failed run"; status=1; }
fi

echo
if [ "$status" -eq 0 ]; then echo "SELFTEST PASS ($(pkgtest_secs "$t0") s)"; else echo "SELFTEST FAIL"; fi
exit "$status"
