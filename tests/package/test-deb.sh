#!/usr/bin/env bash
# The dmm-sidecar package's life in a real systemd: the .deb's contents and control fields (and the
# .rpm's, if given), then, in a freshly booted Debian 12 container: dpkg -i, the system user,
# enable --now, readiness and status, metrics, the admin command, the capture chain, reload (and
# a refused one), restart (keeping the listeners' backlog), a crash, stale rules, an upgrade,
# stop, the journal, remove and purge.
#
#   tests/package/test-deb.sh [OPTIONS] PKG.deb [PKG.rpm]
#   tests/package/test-deb.sh [OPTIONS] --cpack BUILD_DIR    # cpack -G "DEB;RPM" there first
#
# Options:
#   --artifacts DIR   where the container's journal, console and apt log go on failure (default .)
#   --keep-logs       save them on success too
#
# One PASS/FAIL/SKIP/WARN/INFO line per step, a summary, exit 1 if any step failed. Exit 77
# (ctest: skipped) when not run as root. Runs as root: debootstrap (first run, see rootfs.sh),
# chroot, systemd-nspawn. The container has a private network: the host's iptables are not touched.
#
# Environment: DMM_PKGTEST_CACHE (rootfs and apt cache, default /var/cache/dmm-sidecar-pkgtest),
# DMM_CPACK (the cpack to run, default: cpack from PATH),
# DMM_PKGTEST_START_RE (the daemon's start line, default ' started'), DMM_PKGTEST_TMPFS=0 (the
# container's root on the disk instead of a tmpfs).

# shellcheck disable=SC2016  # dpkg-query's ${Field} formats are not the shell's
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=container.sh
. "$here/container.sh"

# ---- the contract of the package ----------------------------------------------------------------
PKG=dmm-sidecar
UNIT=dmm-sidecar.service
BIN=/usr/bin/dmm-sidecar
CONFFILE=/etc/dmm-sidecar/sidecar.toml
CONFDIR=/etc/dmm-sidecar
POLICY_DIR=/etc/dmm-sidecar/policy.d
SYSUSER=dmm-sidecar
METRICS_URL=http://127.0.0.1:17090/metrics
METRIC_PREFIX=dmm_sidecar_
CHAIN=DMM_SIDECAR
START_RE=${DMM_PKGTEST_START_RE:- started}
RELOAD_RE='reload'
IN_CT_DIR=/var/tmp/dmm-pkgtest     # where the package is copied in the container

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "SKIP: the package test runs as root (chroot, systemd-nspawn)"
  exit 77
fi
ct_private_mounts "$@"

deb="" rpm="" cpack_dir="" artifacts=. keep_logs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --artifacts) artifacts=${2:?}; shift ;;
    --keep-logs) keep_logs=1 ;;
    --cpack) cpack_dir=$(cd "${2:?}" && pwd); shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *.deb) deb=$(realpath "$1") ;;
    *.rpm) rpm=$(realpath "$1") ;;
    *) echo "not a .deb or .rpm: $1" >&2; usage ;;
  esac
  shift
done
[ -n "$deb" ] || [ -n "$cpack_dir" ] || usage
for f in "$deb" "$rpm"; do
  [ -z "$f" ] || [ -f "$f" ] || pkgtest_die "no such package: $f"
done
mkdir -p "$artifacts"
artifacts=$(cd "$artifacts" && pwd)
rm -f "$artifacts"/dmm-pkgtest-{journal,console,apt}.txt

pkgtest_need_cmds dpkg-deb:dpkg
ct_init lifecycle
T0=$(pkgtest_now)

# ---- steps --------------------------------------------------------------------------------------
# A step is a function run in a subshell with set -e, its output kept; status from its exit:
# 0 PASS (INFO for a --report step), 77 SKIP, 78 WARN (reported, not a failure), other FAIL.
# Lines a step prints starting with "= " are shown even when it passes.
declare -A blocked=()   # gate -> why the steps needing it cannot run
results=()              # "STATUS NAME" for the summary
declare -A step_secs=() # NAME -> seconds
nfail=0
STEPLOG="$CT_DIR/step.log"

fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "$*"; exit 77; }
warn() { echo "$*"; exit 78; }
note() { echo "= $*"; }
block() { blocked[$1]=$2; }

# _report STATUS NAME SECS: the step's line, then the part of its log worth showing.
_report() {
  local status=$1 name=$2 secs=$3
  printf '%-4s  %-32s %7s s\n' "$status" "$name" "$secs"
  results+=("$status $name")
  step_secs[$name]=$secs
  case "$status" in
    PASS) grep '^= ' "$STEPLOG" | sed 's/^= /        /' || true ;;
    SKIP) head -n 3 "$STEPLOG" | sed 's/^/        /' ;;
    INFO|WARN) sed 's/^= //; s/^/        /' "$STEPLOG" | head -n 80 ;;
    FAIL) nfail=$((nfail + 1)); sed 's/^= //; s/^/        /' "$STEPLOG" | tail -n 60 ;;
  esac
}

# step [--needs GATE]... [--report] NAME FUNCTION [ARGS...]; returns 1 only if it failed.
step() {
  local needs=() report=0 name gate t0 rc=0 status
  while :; do
    case "$1" in
      --needs) needs+=("$2"); shift 2 ;;
      --report) report=1; shift ;;
      *) break ;;
    esac
  done
  name=$1; shift
  for gate in "${needs[@]}"; do
    if [ -n "${blocked[$gate]:-}" ]; then
      echo "not run: ${blocked[$gate]}" >"$STEPLOG"
      _report SKIP "$name" -
      return 0
    fi
  done
  t0=$(pkgtest_now)
  # In the background and waited for: set -e holds inside (it would not in "f || ...").
  ( set -euo pipefail; "$@" ) >"$STEPLOG" 2>&1 </dev/null &
  wait $! || rc=$?
  case "$rc" in
    0) status=PASS; [ "$report" = 1 ] && status=INFO ;;
    77) status=SKIP ;;
    78) status=WARN ;;
    *) status=FAIL ;;
  esac
  _report "$status" "$name" "$(pkgtest_secs "$t0")"
  [ "$status" != FAIL ]
}

cx() { ct_exec "$@"; }
# The names in a Depends-style field, without versions, architectures and alternatives' bars.
dep_names() { tr ',|' '\n' | sed 's/[(\[<].*//; s/:.*//; s/[[:space:]]//g' | sed '/^$/d'; }
depends() { dpkg-deb -f "$deb" Pre-Depends Depends | sed 's/^[A-Za-z-]*: //' | paste -sd, -; }
unit_prop() { cx systemctl show -p "$1" --value "${2:-$UNIT}"; }
chain_present() { cx iptables -w -t nat -S | grep -qx -- "-N $CHAIN"; }
# wait_active SECONDS: until the unit is active; fails at once if it failed.
wait_active() {
  local state i
  for ((i = 0; i < $1 * 10; i++)); do
    state=$(cx systemctl is-active "$UNIT" || true)
    case "$state" in
      active) return 0 ;;
      failed) break ;;
    esac
    sleep 0.1
  done
  echo "is-active: $state"
  cx systemctl status --no-pager -n 30 "$UNIT" || true
  return 1
}

# ---- packages (host) ----------------------------------------------------------------------------
t_cpack() {
  cd "$cpack_dir"
  [ -f CPackConfig.cmake ] || fail "no CPackConfig.cmake in $cpack_dir (include(CPack) missing?)"
  rm -f "$PKG"_*.deb "$PKG"-*.rpm
  local generators=DEB
  if command -v rpmbuild >/dev/null; then generators="DEB;RPM"; else note "no rpmbuild: DEB only"; fi
  "${DMM_CPACK:-cpack}" -G "$generators"
  local debs=("$cpack_dir/$PKG"_*.deb) rpms=("$cpack_dir/$PKG"-*.rpm)
  [ -f "${debs[0]}" ] || fail "cpack made no ${PKG}_*.deb in $cpack_dir"
  [ ${#debs[@]} -eq 1 ] || fail "more than one $PKG .deb: ${debs[*]}"
  echo "${debs[0]}" >"$CT_DIR/cpack.deb"
  note "made $(basename "${debs[0]}")"
  if [ -f "${rpms[0]}" ]; then
    echo "${rpms[0]}" >"$CT_DIR/cpack.rpm"
    note "made $(basename "${rpms[0]}")"
  fi
}

t_deb_contents() {
  # "./usr/bin/x" -> "/usr/bin/x" (directories keep their trailing slash, links lose their target)
  dpkg-deb -c "$deb" | awk '{ print $6 }' | sed 's|^\.||' >"$CT_DIR/deb.files"
  cat "$CT_DIR/deb.files"
  local f missing=()
  for f in "$BIN" "$CONFFILE" "$POLICY_DIR/"; do
    grep -qxF "$f" "$CT_DIR/deb.files" || missing+=("$f")
  done
  grep -qxE "(/usr)?/lib/systemd/system/$UNIT" "$CT_DIR/deb.files" ||
    missing+=("/usr/lib/systemd/system/$UNIT")
  grep -qxE '(/usr)?/lib/sysusers\.d/[^/]+\.conf' "$CT_DIR/deb.files" ||
    missing+=("/usr/lib/sysusers.d/*.conf")
  [ ${#missing[@]} -eq 0 ] || fail "not in the package: ${missing[*]}"
  note "$(grep -vc '/$' "$CT_DIR/deb.files") files;" \
    "units: $(grep -oE '[^/]+\.(service|socket|timer)$' "$CT_DIR/deb.files" | paste -sd' ' -)"
}

t_deb_control() {
  dpkg-deb -I "$deb" | sed -n '/^ Package:/,$p'
  local name arch deps
  name=$(dpkg-deb -f "$deb" Package)
  arch=$(dpkg-deb -f "$deb" Architecture)
  deps=$(depends)
  [ "$name" = "$PKG" ] || fail "Package: $name, expected $PKG"
  [ "$arch" = all ] || [ "$arch" = "$(dpkg --print-architecture)" ] ||
    fail "Architecture: $arch, this machine is $(dpkg --print-architecture)"
  [ -n "$deps" ] || fail "no Depends (shlibdeps not run?)"
  dep_names <<<"$deps" | grep -q '^libevent' || fail "Depends names no libevent: $deps"
  note "Depends: $deps"
}

t_deb_conffiles() {
  local conffiles
  conffiles=$(dpkg-deb -I "$deb" conffiles 2>/dev/null) || fail "no conffiles in the control archive"
  echo "$conffiles"
  grep -qxF "$CONFFILE" <<<"$conffiles" || fail "$CONFFILE is not a conffile"
}

# What the unit and the daemon run must be there on any Debian 12, not only in this container
# (which has iptables and procps from its rootfs).
t_deb_runtime_tools() {
  local names unit problems=()
  names=$(depends | dep_names)
  # The capture chain is made by running iptables-restore and iptables through PATH.
  grep -qx iptables <<<"$names" || problems+=("Depends lacks iptables (capture runs iptables-restore)")
  unit=$(find "$CT_DIR/extract" -path "*/systemd/system/$UNIT" | head -n 1)
  if [ -n "$unit" ] && grep -qE '^Exec[A-Za-z]*=[-+!@:]*(/usr)?/bin/kill ' "$unit" &&
     ! grep -qx procps <<<"$names"; then
    problems+=("the unit runs /bin/kill, which is procps's: Depends lacks procps")
  fi
  [ ${#problems[@]} -eq 0 ] || fail "${problems[@]}"
}

# The preload library goes to a private directory (dlopen / LD_PRELOAD by full path), never to a
# directory the dynamic linker searches by default.
t_deb_private_libs() {
  local libs bad
  libs=$(grep -E '\.so(\.[0-9.]+)?$' "$CT_DIR/deb.files" || true)
  [ -n "$libs" ] || skip "no shared library in the package (no preload library yet)"
  echo "$libs"
  bad=$(grep -vE "^/usr/lib/([^/]+/)?$PKG/" <<<"$libs" || true)
  [ -z "$bad" ] || fail "outside /usr/lib/[<triplet>/]$PKG/: $bad"
  ! grep -q '^/etc/ld\.so\.conf\.d/' "$CT_DIR/deb.files" ||
    fail "the package adds a search path: $(grep '^/etc/ld\.so\.conf\.d/' "$CT_DIR/deb.files")"
  note "$(wc -l <<<"$libs") in a private directory"
}

t_deb_scripts() {
  local s found=()
  for s in preinst postinst prerm postrm; do
    dpkg-deb -I "$deb" "$s" >/dev/null 2>&1 && found+=("$s")
  done
  echo "maintainer scripts: ${found[*]:-none}"
}

t_unit_security() {
  local unit
  unit=$(find "$CT_DIR/extract" -path "*/systemd/system/$UNIT" | head -n 1)
  [ -n "$unit" ] || skip "no $UNIT in the package"
  systemd-analyze security --help 2>/dev/null | grep -q -- '--offline' ||
    skip "systemd-analyze security --offline not available here"
  local out
  out=$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1) || true
  grep -q 'Overall exposure' <<<"$out" || { echo "$out"; warn "no exposure level"; }
  grep 'Overall exposure' <<<"$out" | sed 's/^→ *//'
  # The settings it counts against the unit, by name (the full table: the command above).
  echo "not set or too open:"
  awk '$1 == "✗" { print $2 }' <<<"$out" | sort -u | paste -sd' ' - | fold -s -w 100
}

t_rpm_files() {
  local files f missing=()
  files=$(rpm -qpl "$rpm")
  echo "$files"
  for f in "$BIN" "$CONFFILE"; do grep -qxF "$f" <<<"$files" || missing+=("$f"); done
  grep -qxE "(/usr)?/lib/systemd/system/$UNIT" <<<"$files" || missing+=("$UNIT")
  [ ${#missing[@]} -eq 0 ] || fail "not in the rpm: ${missing[*]}"
}

t_rpm_config() {
  local config
  config=$(rpm -qpc "$rpm")
  echo "$config"
  grep -qxF "$CONFFILE" <<<"$config" || fail "$CONFFILE is not %config"
}

t_rpm_scripts() {
  local scripts s missing=()
  scripts=$(rpm -qp --scripts "$rpm")
  echo "$scripts"
  # The user is made after install, the service stopped before erase and systemd told after.
  for s in postinstall preuninstall postuninstall; do
    grep -q "^$s scriptlet" <<<"$scripts" || missing+=("$s")
  done
  [ ${#missing[@]} -eq 0 ] || fail "no ${missing[*]} scriptlet"
}

t_rpm_requires() { rpm -qpR "$rpm"; }

# ---- the container ------------------------------------------------------------------------------
t_rootfs() { "$here/rootfs.sh" >"$CT_DIR/rootfs.path"; }
t_unpack() { ct_unpack "$(cat "$CT_DIR/rootfs.path")"; }
t_deps() {
  note "$(depends)"
  ct_apt_satisfy "$(depends)"
}
t_copy_in() { ct_copy_in "$deb" "$IN_CT_DIR/$(basename "$deb")"; }

t_dpkg_install() {
  cx dpkg -i "$IN_CT_DIR/$(basename "$deb")"
  [ "$(cx dpkg-query -W -f='${Status}' "$PKG")" = "install ok installed" ] ||
    fail "dpkg-query: $(cx dpkg-query -W -f='${Status}' "$PKG")"
}

t_installed() {
  cx test -x "$BIN" || fail "$BIN is not executable"
  local libs
  if libs=$(cx ldd "$BIN" 2>&1); then
    echo "$libs"
    ! grep 'not found' <<<"$libs" || fail "libraries of $BIN not found (Depends incomplete?)"
  else
    note "$BIN: $(tr -d '\t' <<<"$libs")"
  fi
  cx dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q "^ $CONFFILE " ||
    fail "$CONFFILE not registered as a conffile"
  cx test -d "$POLICY_DIR" || fail "no $POLICY_DIR"
  [ "$(unit_prop LoadState)" = loaded ] || fail "$UNIT: LoadState=$(unit_prop LoadState)"
  note "unit $(unit_prop FragmentPath), User=$(unit_prop User)"
}

t_user() {
  local entry uid
  entry=$(cx getent passwd "$SYSUSER") || fail "no user $SYSUSER"
  echo "$entry"
  uid=$(cut -d: -f3 <<<"$entry")
  [ "$uid" -lt 1000 ] || fail "$SYSUSER has uid $uid: not a system user"
  note "$entry"
}

t_unit_verify() {
  local out rc=0
  out=$(cx systemd-analyze verify "$UNIT" 2>&1) || rc=$?
  [ "$rc" -eq 0 ] && [ -z "$out" ] && return 0
  echo "$out"
  fail "systemd-analyze verify $UNIT: exit $rc, or it printed the problems above"
}

t_enable_now() {
  CT_EXEC_TIMEOUT=100 cx systemctl enable --now "$UNIT" || true
  wait_active 30
  note "active, MainPID $(unit_prop MainPID), Type=$(unit_prop Type)"
}

t_status_text() {
  local text
  text=$(unit_prop StatusText)
  [ -n "$text" ] || fail "StatusText is empty (no sd_notify STATUS=)"
  note "StatusText: $text"
}

t_metrics() {
  local body="" i
  for ((i = 0; i < 20; i++)); do
    body=$(cx curl -fsS --max-time 5 "$METRICS_URL" 2>&1) && break
    sleep 0.25
  done
  grep -q "^$METRIC_PREFIX" <<<"$body" || { echo "$body" | head -n 20; fail "no $METRIC_PREFIX* sample at $METRICS_URL"; }
  note "$(grep -c "^$METRIC_PREFIX" <<<"$body") ${METRIC_PREFIX}* samples"
}

t_ctl_status() {
  local out
  out=$(cx "$BIN" ctl status 2>&1) || { echo "$out"; fail "$BIN ctl status failed"; }
  echo "$out"
  note "$(head -n 1 <<<"$out")"
}

t_chain_present() {
  cx iptables -w -t nat -S
  chain_present || fail "no chain $CHAIN in the nat table"
  cx iptables -w -t nat -S OUTPUT | grep -q -- "-j $CHAIN" || note "(no jump to $CHAIN in OUTPUT)"
}

t_reload() {
  local pid cursor line i
  pid=$(unit_prop MainPID)
  # A cursor of the same match: with one from another (e.g. -u, whose last line is PID 1's),
  # journalctl 252 --after-cursor finds none of the new lines.
  cursor=$(cx journalctl "_SYSTEMD_UNIT=$UNIT" -n 1 --show-cursor -o cat | sed -n 's/^-- cursor: //p')
  [ -n "$cursor" ] || fail "no journal line from the daemon before the reload"
  cx systemctl reload "$UNIT"
  sleep 0.2
  [ "$(cx systemctl is-active "$UNIT")" = active ] || { wait_active 0 || true; fail "not active after reload"; }
  [ "$(unit_prop MainPID)" = "$pid" ] || fail "MainPID changed $pid -> $(unit_prop MainPID): reload restarted it"
  # The daemon's own lines only (systemd's "Reloading ..." is PID 1's): it got the signal.
  for ((i = 0; i < 50; i++)); do
    line=$(cx journalctl "_SYSTEMD_UNIT=$UNIT" --after-cursor "$cursor" -o cat | grep -i -m1 "$RELOAD_RE") &&
      { note "$line"; return 0; }
    sleep 0.1
  done
  cx journalctl -u "$UNIT" --after-cursor "$cursor" --no-pager
  fail "no '$RELOAD_RE' line from the daemon after the reload"
}

t_restart() {
  local pid
  pid=$(unit_prop MainPID)
  CT_EXEC_TIMEOUT=100 cx systemctl restart "$UNIT" || true
  wait_active 30
  [ "$(unit_prop MainPID)" != "$pid" ] || fail "MainPID unchanged ($pid) after restart"
  chain_present || fail "no chain $CHAIN after restart"
  note "MainPID $pid -> $(unit_prop MainPID)"
}

# An invalid config: the reload is refused (ExecReload validates first) and the daemon keeps
# running as it was.
t_reload_invalid() {
  local pid rc=0
  pid=$(unit_prop MainPID)
  cx cp "$CONFFILE" "$CONFFILE.good"
  cx sh -c "printf '\n[not_a_key]\nx = 1\n' >> $CONFFILE"
  CT_EXEC_TIMEOUT=60 cx systemctl reload "$UNIT" || rc=$?
  cx mv "$CONFFILE.good" "$CONFFILE"
  [ "$rc" -ne 0 ] || fail "systemctl reload succeeded with an invalid config"
  [ "$(cx systemctl is-active "$UNIT")" = active ] || fail "not active after a refused reload"
  [ "$(unit_prop MainPID)" = "$pid" ] || fail "MainPID changed after a refused reload"
  # journald takes the reload command's output asynchronously.
  local i
  for ((i = 0; i < 30; i++)); do
    cx journalctl -u "$UNIT" -o cat | grep -m1 "not_a_key" && return 0
    sleep 0.1
  done
  cx journalctl -u "$UNIT" -o cat -n 20
  fail "the validation error is not in the journal"
}

# A restart keeps the listening sockets (the fd store): a connection made while the old process
# drains and no process accepts waits in the backlog and is served by the new process. An idle
# connection to the tunnel port holds the old process's drain open (up to timeouts.handshake,
# 5 s), so the window is seconds wide rather than a race.
t_restart_backlog() {
  local pid before after
  pid=$(unit_prop MainPID)
  before=$(cx journalctl "_SYSTEMD_UNIT=$UNIT" -o cat | grep -c "draining" || true)
  note "fd store: $(unit_prop NFileDescriptorStore) sockets"
  [ "$(unit_prop NFileDescriptorStore)" -gt 0 ] || fail "nothing in the fd store"
  CT_EXEC_TIMEOUT=60 cx bash -c '
    set -e
    exec 5<>/dev/tcp/127.0.0.1/17002
    systemctl restart --no-block '"$UNIT"'
    for i in $(seq 100); do
      n=$(journalctl _SYSTEMD_UNIT='"$UNIT"' -o cat | grep -c draining || true)
      [ "$n" -gt '"$before"' ] && break
      sleep 0.05
    done
    [ "$n" -gt '"$before"' ] || { echo "the old process never started draining"; exit 1; }
    ss -Htln "sport = :17002" | head -3 || true
    # Listeners closed in the old process, the new one not started: only the fd store holds them.
    exec 6<>/dev/tcp/127.0.0.1/17002 || { echo "connection refused during the restart"; exit 1; }
    echo "connected during the drain"
    printf "GET / HTTP/1.0\r\n\r\n" >&6
    # The new process accepts it, finds no handshake and closes it.
    timeout 30 cat <&6 >/dev/null || { echo "not served within 30 s"; exit 1; }
    echo "served by the new process"
    exec 5>&- 6>&-
  '
  wait_active 30
  after=$(unit_prop MainPID)
  [ "$after" != "$pid" ] || fail "MainPID unchanged"
  cx curl -fsS "$METRICS_URL" | grep '^dmm_sidecar_handshake_rejections_total{.*bad_magic' ||
    fail "the new process did not count the queued connection"
}

# A crash: Restart=on-failure brings it back; ExecStopPost removed the rules and ExecStartPre
# installed them again, once.
t_crash_restart() {
  local pid jumps
  pid=$(unit_prop MainPID)
  cx kill -KILL "$pid"
  local i
  for ((i = 0; i < 100; i++)); do
    [ "$(unit_prop MainPID)" != "$pid" ] && [ "$(unit_prop MainPID)" != 0 ] &&
      [ "$(cx systemctl is-active "$UNIT" || true)" = active ] && break
    sleep 0.1
  done
  wait_active 10
  [ "$(unit_prop MainPID)" != "$pid" ] || fail "not restarted"
  note "restarted after SIGKILL: MainPID $pid -> $(unit_prop MainPID), NRestarts=$(unit_prop NRestarts)"
  chain_present || fail "no chain after the restart"
  jumps=$(cx iptables -w -t nat -S OUTPUT | grep -c -- "-j $CHAIN" || true)
  [ "$jumps" = 1 ] || fail "$jumps jumps to $CHAIN in OUTPUT"
}

# Stale rules (a hand-made install, or an older version's): start replaces them.
t_stale_rules() {
  local jumps
  CT_EXEC_TIMEOUT=100 cx systemctl stop "$UNIT"
  cx iptables -w -t nat -N "$CHAIN"
  cx iptables -w -t nat -A "$CHAIN" -p tcp --dport 9 -j RETURN
  cx iptables -w -t nat -A OUTPUT -p tcp -j "$CHAIN"
  cx iptables -w -t nat -A OUTPUT -p tcp -j "$CHAIN"
  cx systemctl start "$UNIT"
  wait_active 30
  ! cx iptables -w -t nat -S "$CHAIN" | grep -- "--dport 9" || fail "the stale rule survived the start"
  jumps=$(cx iptables -w -t nat -S OUTPUT | grep -c -- "-j $CHAIN" || true)
  [ "$jumps" = 1 ] || fail "$jumps jumps to $CHAIN in OUTPUT after the start"
}

# An upgrade (the same package again goes through prerm upgrade / postinst configure with the
# old version): the service is not stopped or disabled, it runs the new binary (try-restart),
# and an edited conffile is kept.
t_upgrade() {
  local pid
  cx sh -c "echo '# edited by the operator' >> $CONFFILE"
  pid=$(unit_prop MainPID)
  cx dpkg -i "$IN_CT_DIR/$(basename "$deb")"
  wait_active 30
  [ "$(cx systemctl is-enabled "$UNIT")" = enabled ] || fail "not enabled after the upgrade"
  [ "$(unit_prop MainPID)" != "$pid" ] || fail "still the old process (MainPID $pid): no try-restart"
  cx grep -q '^# edited by the operator' "$CONFFILE" || fail "the edited conffile was replaced"
  note "active and enabled; MainPID $pid -> $(unit_prop MainPID); the edited conffile kept"
}

t_stop() {
  CT_EXEC_TIMEOUT=100 cx systemctl stop "$UNIT"
  local state
  state=$(cx systemctl is-active "$UNIT" || true)
  [ "$state" = inactive ] || {
    cx systemctl status --no-pager -n 20 "$UNIT" || true
    fail "is-active: $state after stop (Result=$(unit_prop Result), status $(unit_prop ExecMainStatus))"
  }
  ! chain_present || { cx iptables -w -t nat -S; fail "chain $CHAIN still there after stop"; }
}

t_journal() {
  local daemon systemd_lines starts
  daemon=$(cx journalctl "_SYSTEMD_UNIT=$UNIT" -o cat)
  systemd_lines=$(cx journalctl -u "$UNIT" -o cat)
  echo "$systemd_lines" | tail -n 40
  grep -q '^Started ' <<<"$systemd_lines" || fail "no 'Started' line from systemd"
  starts=$(grep -c -- "$START_RE" <<<"$daemon" || true)
  [ "$starts" -gt 0 ] || fail "no start line ('$START_RE') from the daemon"
  note "$starts start lines from the daemon (enable --now, restart): $(grep -m1 -- "$START_RE" <<<"$daemon")"
}

t_socket() {
  local sockets s
  sockets=$(grep -oE "[^/]+\.socket$" "$CT_DIR/deb.files" || true)
  [ -n "$sockets" ] || { echo "no socket unit in the package"; return 0; }
  for s in $sockets; do
    echo "$s: enabled=$(cx systemctl is-enabled "$s" || true) active=$(cx systemctl is-active "$s" || true)"
  done
}

t_remove() {
  cx dpkg --remove "$PKG"
  local status state
  status=$(cx dpkg-query -W -f='${Status}' "$PKG")
  [ "$status" = "deinstall ok config-files" ] || fail "dpkg-query: $status"
  state=$(cx systemctl is-active "$UNIT" || true)
  [ "$state" != active ] || fail "$UNIT still active after remove"
  ! cx test -e "$BIN" || fail "$BIN still there"
  ! cx test -e "/lib/systemd/system/$UNIT" || fail "/lib/systemd/system/$UNIT still there"
  ! cx test -e "/usr/lib/systemd/system/$UNIT" || fail "/usr/lib/systemd/system/$UNIT still there"
  cx test -f "$CONFFILE" || fail "$CONFFILE gone after remove (conffiles stay until purge)"
  ! chain_present || fail "chain $CHAIN still there after remove"
  note "is-active: $state, LoadState=$(unit_prop LoadState)"
}

t_purge() {
  cx dpkg --purge "$PKG"
  local status left
  status=$(cx dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true)
  case "$status" in ""|"unknown ok not-installed") ;; *) fail "dpkg-query: $status" ;; esac
  ! cx test -e "$CONFDIR" || { cx find "$CONFDIR"; fail "$CONFDIR still there after purge"; }
  # Enablement symlinks and the like: nothing of the package may stay in systemd's directories.
  left=$(cx find /etc/systemd /lib/systemd /usr/lib/systemd /run/systemd/system -name "$PKG*" 2>/dev/null || true)
  [ -z "$left" ] || fail "left in systemd's directories: $left"
  left=$(cx find / -xdev -name "*$PKG*" ! -path "$IN_CT_DIR*" 2>/dev/null || true)
  [ -z "$left" ] || note "still on disk: $(paste -sd' ' - <<<"$left")"
  if cx getent passwd "$SYSUSER" >/dev/null; then
    note "user $SYSUSER kept (as Debian packages do)"
  else
    note "user $SYSUSER removed"
  fi
}

# Logs of a run that failed (or with --keep-logs): journal first, while the container still runs.
save_logs() {
  [ "$nfail" -gt 0 ] || [ "$keep_logs" = 1 ] || [ "${CT_EXIT_STATUS:-0}" -ne 0 ] || return 0
  [ -n "$CT_LEADER" ] && ct_journal "$artifacts/dmm-pkgtest-journal.txt"
  [ -f "$CT_DIR/console.log" ] && ct_console "$artifacts/dmm-pkgtest-console.txt"
  [ -f "$CT_DIR/apt.log" ] && cp "$CT_DIR/apt.log" "$artifacts/dmm-pkgtest-apt.txt"
  pkgtest_log "logs saved in $artifacts: dmm-pkgtest-{journal,console,apt}.txt"
}
ct_at_exit save_logs

# ---- the run ------------------------------------------------------------------------------------
if [ -n "$cpack_dir" ]; then
  step cpack t_cpack || { echo "FAIL: no package to test"; exit 1; }
  deb=$(cat "$CT_DIR/cpack.deb")
  [ -f "$CT_DIR/cpack.rpm" ] && rpm=$(cat "$CT_DIR/cpack.rpm")
fi
echo "== $(basename "$deb")${rpm:+ and $(basename "$rpm")}"
mkdir "$CT_DIR/extract"
dpkg-deb -x "$deb" "$CT_DIR/extract"

step deb.contents t_deb_contents || true
step deb.control t_deb_control || true
step deb.conffiles t_deb_conffiles || true
step deb.runtime-tools t_deb_runtime_tools || true
step deb.private-libs t_deb_private_libs || true
step --report deb.maintainer-scripts t_deb_scripts || true
step --report unit.security t_unit_security || true
if [ -n "$rpm" ]; then
  if command -v rpm >/dev/null; then
    step rpm.files t_rpm_files || true
    step rpm.config t_rpm_config || true
    step rpm.scripts t_rpm_scripts || true
    step --report rpm.requires t_rpm_requires || true
  else
    echo "skip: rpm is not installed" >"$STEPLOG"; _report SKIP rpm.checks -
  fi
fi

step container.rootfs t_rootfs || block container "no root filesystem"
step --needs container container.unpack t_unpack || block container "unpack failed"
step --needs container container.deps t_deps || block installed "the dependencies did not install"
step --needs container container.copy-in t_copy_in || block container "copy failed"
# The boot itself runs in this shell: nspawn must be its child.
if [ -z "${blocked[container]:-}" ]; then
  t0=$(pkgtest_now) rc=0
  ct_boot 30 >"$STEPLOG" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then _report PASS container.boot "$(pkgtest_secs "$t0")"
  else _report FAIL container.boot "$(pkgtest_secs "$t0")"; block container "no boot"; fi
fi

G=(--needs container --needs installed)
step "${G[@]}" install.dpkg t_dpkg_install || block installed "dpkg -i failed"
step "${G[@]}" install.files t_installed || true
step "${G[@]}" install.user t_user || true
step "${G[@]}" unit.verify t_unit_verify || true
step "${G[@]}" service.enable-now t_enable_now || block running "the service did not start"
R=("${G[@]}" --needs running)
step "${R[@]}" service.status-text t_status_text || true
step "${R[@]}" service.metrics t_metrics || true
step "${R[@]}" service.ctl-status t_ctl_status || true
step "${R[@]}" service.capture-chain t_chain_present || true
step "${R[@]}" service.reload t_reload || true
step "${R[@]}" service.reload-invalid t_reload_invalid || true
step "${R[@]}" service.restart t_restart || true
step "${R[@]}" service.restart-keeps-backlog t_restart_backlog || true
step "${R[@]}" service.crash-restart t_crash_restart || true
step "${R[@]}" service.stale-rules t_stale_rules || true
step "${R[@]}" upgrade.dpkg t_upgrade || true
step --report "${G[@]}" service.socket t_socket || true
step "${G[@]}" service.stop t_stop || true
step "${G[@]}" service.journal t_journal || true
step "${G[@]}" remove.dpkg t_remove || true
step "${G[@]}" purge.dpkg t_purge || true

# ---- summary ------------------------------------------------------------------------------------
declare -A count=()
for r in "${results[@]}"; do s=${r%% *}; count[$s]=$(( ${count[$s]:-0} + 1 )); done
echo
echo "== summary: ${count[PASS]:-0} passed, ${count[FAIL]:-0} failed, ${count[SKIP]:-0} skipped," \
  "${count[WARN]:-0} warnings, ${count[INFO]:-0} reports; $(pkgtest_secs "$T0") s" \
  "(rootfs ${step_secs[container.rootfs]:-?} s, unpack ${step_secs[container.unpack]:-?} s," \
  "deps ${step_secs[container.deps]:-?} s, boot ${step_secs[container.boot]:-?} s)"
for r in "${results[@]}"; do
  case "$r" in FAIL*|WARN*) echo "   $r" ;; esac
done
[ "$nfail" -eq 0 ]
