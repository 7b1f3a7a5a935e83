#!/usr/bin/env bash
# A throw-away Debian 12 system booted with systemd-nspawn, for package tests.
#
# As a library (what the tests do):
#
#   . tests/package/container.sh
#   ct_init lifecycle                   # temp dir, cleanup trap (EXIT, INT, TERM, HUP)
#   ct_unpack "$(tests/package/rootfs.sh)"  # a fresh copy of the cached root filesystem
#   ct_apt_satisfy "libevent-2.1-7 (>= 2.1.8), procps"  # before boot: chroot + apt-get
#   ct_copy_in pkg.deb /var/tmp/pkg.deb
#   ct_boot                             # until is-system-running says running/degraded
#   ct_exec systemctl status            # nsenter into the container's PID 1
#   ct_journal "$out/journal.txt"
#   ct_stop                             # also done by the trap, which then removes the temp dir
#
# As a command, to look around a pristine container (booted, then stopped on exit):
#
#   tests/package/container.sh run [--deps 'DEPENDS'] [--copy SRC:DST]... [CMD...]
#
# CMD defaults to an interactive bash. Needs root, systemd-container, zstd, util-linux.
#
# The container has --private-network: only its own loopback, its own iptables; the host's
# network namespace is never touched. Every process is stopped by PID (nspawn first, then the
# container's PID 1 if it outlived nspawn), never by name. Runs are independent: each has its
# own name, temp dir and cgroup, so two may run side by side.

# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CT_NAME=""           # machine name, unique per run
CT_DIR=""            # per-run temp dir: root/, console.log, apt.log
CT_ROOT=""           # the container's root filesystem ($CT_DIR/root)
CT_NSPAWN_PID=""     # systemd-nspawn (a child of this shell)
CT_LEADER=""         # the container's PID 1, as seen from the host
CT_LEADER_PIDNS=""   # its PID namespace, to tell it from a reused PID
CT_BOOT_SECS=""      # timings of the last unpack, boot and stop, for reports
CT_UNPACK_SECS=""
CT_STOP_SECS=""
CT_EXEC_TIMEOUT=${CT_EXEC_TIMEOUT:-180}   # no command inside may hang a test for ever
# shellcheck disable=SC2034  # read by ct_at_exit hooks
CT_EXIT_STATUS=""    # the script's exit status, for ct_at_exit hooks
_ct_exit_hooks=()
_ct_cgroup=""

# ct_init NAME: make the temp dir and install the cleanup trap. NAME is made unique per run.
ct_init() {
  pkgtest_need_root
  pkgtest_need_cmds systemd-nspawn:systemd-container nsenter:util-linux unshare:util-linux \
    zstd:zstd flock:util-linux setpriv:util-linux
  CT_NAME="${1:-pkgtest}-$$"
  _ct_cgroup="dmm-pkgtest-$CT_NAME"
  _ct_remove_stale_cgroups
  CT_DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/dmm-pkgtest.XXXXXX")
  CT_ROOT="$CT_DIR/root"
  trap ct_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  mkdir "$CT_ROOT"
  # The root filesystem on a tmpfs: unpacking and dpkg (which fsyncs every file) take a tenth of
  # the time they take on a disk. DMM_PKGTEST_TMPFS=0 keeps it on the disk (under TMPDIR).
  if [ "${DMM_PKGTEST_TMPFS:-1}" = 1 ]; then
    mount -t tmpfs -o "mode=0755,size=${DMM_PKGTEST_TMPFS_SIZE:-3g}" dmm-pkgtest "$CT_ROOT"
  fi
}

# ct_private_mounts "$@": first thing in a test script (see pkgtest_private_mounts).
ct_private_mounts() { pkgtest_private_mounts "$@"; }

# ct_at_exit 'COMMAND': run COMMAND (eval'd) first when cleaning up, while the container still runs.
ct_at_exit() { _ct_exit_hooks+=("$1"); }

# ct_unpack TARBALL: a fresh root filesystem from the cached tarball (rootfs.sh).
ct_unpack() {
  local t0; t0=$(pkgtest_now)
  zstd -q -dc "$1" | tar -C "$CT_ROOT" --numeric-owner --xattrs --acls -xf -
  echo "$CT_NAME" >"$CT_ROOT/etc/hostname"
  CT_UNPACK_SECS=$(pkgtest_secs "$t0")
  pkgtest_log "container: unpacked $(basename "$1") in $CT_UNPACK_SECS s"
}

# ct_chroot CMD...: run CMD in the (not booted) root filesystem, in a mount and PID namespace of
# its own: /proc is that namespace's, the apt download cache is bind-mounted from the cache dir,
# and every mount and every process a maintainer script may leave behind vanish with the
# namespace when CMD ends, whatever way it ends.
ct_chroot() {
  [ -z "$CT_LEADER" ] || pkgtest_die "ct_chroot: the container is running; use ct_exec"
  mkdir -p "$PKGTEST_CACHE/apt-archives/partial"
  # shellcheck disable=SC2016  # expanded by that sh
  unshare --mount --propagation private --fork --pid --mount-proc="$CT_ROOT/proc" -- \
    /bin/sh -c 'mount --bind "$1" "$2/var/cache/apt/archives" && shift 2 && exec chroot "$@"' \
    sh "$PKGTEST_CACHE/apt-archives" "$CT_ROOT" "$CT_ROOT" \
    /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

# ct_apt_satisfy 'DEPENDS': before boot, install what a Depends field asks for (versions and
# alternatives included: apt-get satisfy) with apt-get in a chroot, services kept from starting
# by a policy-rc.d. The package lists are fetched fresh (the rootfs tarball has none). Output in
# $CT_DIR/apt.log; its tail is shown on failure.
ct_apt_satisfy() {
  [ -n "$1" ] || return 0
  local t0 rc=0; t0=$(pkgtest_now)
  printf '#!/bin/sh\n# dmm-sidecar package test: no service starts in the chroot\nexit 101\n' \
    >"$CT_ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$CT_ROOT/usr/sbin/policy-rc.d"
  cp --remove-destination /etc/resolv.conf "$CT_ROOT/etc/resolv.conf"
  {
    # The download cache is shared by every run of the machine: one apt at a time in it.
    flock 8
    ct_chroot apt-get -q update &&
      ct_chroot apt-get -q -y --no-install-recommends satisfy "$1" &&
      ct_chroot apt-get -q autoclean
  } 8>"$PKGTEST_CACHE/.apt.lock" >>"$CT_DIR/apt.log" 2>&1 || rc=$?
  rm -f "$CT_ROOT/usr/sbin/policy-rc.d"
  if [ "$rc" -ne 0 ]; then
    tail -n 25 "$CT_DIR/apt.log" >&2
    pkgtest_log "container: apt-get satisfy '$1' failed (exit $rc)"
    return "$rc"
  fi
  pkgtest_log "container: installed '$1' by chroot + apt-get in $(pkgtest_secs "$t0") s"
}

# ct_copy_in SRC DST: copy a host file into the container (before or after boot; DST is a path
# inside it, not under /run or /tmp once booted: those are the container's own tmpfs).
ct_copy_in() {
  mkdir -p "$CT_ROOT$(dirname "$2")"
  cp "$1" "$CT_ROOT$2"
}

# The dedicated cgroup of this run, in each hierarchy nspawn uses (cgroup2 and the v1
# name=systemd one of a hybrid setup), under this shell's own cgroup. Without a host systemd,
# nspawn --keep-unit puts its "payload" and "supervisor" cgroups next to itself: in a cgroup of
# its own, two containers cannot collide there, and the leftovers are easy to remove.
_ct_cgroup_dirs() {
  local id ctrl path mnt
  while IFS=: read -r id ctrl path; do
    if [ "$id" = 0 ]; then
      mnt=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
    elif [ "$ctrl" = name=systemd ]; then
      mnt=$(awk '$3 == "cgroup" && $4 ~ /(^|,)name=systemd(,|$)/ { print $2; exit }' /proc/self/mounts)
    else
      continue
    fi
    [ -n "$mnt" ] && echo "$mnt${path%/}/$_ct_cgroup"
  done </proc/self/cgroup
}

# The empty cgroups of runs that were SIGKILLed (their name ends in the PID of a gone shell).
_ct_remove_stale_cgroups() {
  local d stale pid
  for d in $(_ct_cgroup_dirs); do
    for stale in "$(dirname "$d")"/dmm-pkgtest-*; do
      pid=${stale##*-}
      if [ -d "$stale" ] && [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -e "/proc/$pid" ]; then
        find "$stale" -depth -type d -exec rmdir {} + 2>/dev/null || true
      fi
    done
  done
}

# _ct_alive PID: the process exists and is not a zombie (kill -0 succeeds on an unreaped child).
_ct_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# ct_boot [TIMEOUT]: boot the root filesystem; returns once systemctl is-system-running says
# running or degraded (TIMEOUT seconds at most, default 30). Call it directly, not in $(...):
# nspawn must be a child of the test's shell.
# shellcheck disable=SC2120  # the argument is optional
ct_boot() {
  local timeout=${1:-30} t0 deadline state c kids mypidns
  t0=$(pkgtest_now)
  deadline=$(( t0 + timeout * 1000 ))
  (
    for c in $(_ct_cgroup_dirs); do
      mkdir -p "$c" && echo "$BASHPID" >"$c/cgroup.procs"
    done
    # A session of its own: a Ctrl-C at the terminal reaches the test's trap (an orderly stop),
    # not nspawn directly. If the test's shell dies without its trap (SIGKILL), nspawn gets a
    # SIGTERM (parent-death signal) and shuts the container down rather than leaving it running.
    exec setsid setpriv --pdeathsig TERM systemd-nspawn -D "$CT_ROOT" -b --register=no --keep-unit --private-network \
      -M "$CT_NAME" --console=read-only
  ) >"$CT_DIR/console.log" 2>&1 </dev/null &
  CT_NSPAWN_PID=$!

  # nspawn forks a short-lived helper in the host's PID namespace, which clones the container's
  # PID 1 in a new one as another child of nspawn: the child in another PID namespace is PID 1.
  mypidns=$(readlink /proc/self/ns/pid)
  while [ -z "$CT_LEADER" ]; do
    kids=()
    read -ra kids <"/proc/$CT_NSPAWN_PID/task/$CT_NSPAWN_PID/children" 2>/dev/null || true
    for c in "${kids[@]}"; do
      state=$(readlink "/proc/$c/ns/pid" 2>/dev/null) || continue
      if [ "$state" != "$mypidns" ]; then CT_LEADER=$c; CT_LEADER_PIDNS=$state; fi
    done
    [ -n "$CT_LEADER" ] && break
    if ! _ct_alive "$CT_NSPAWN_PID" || [ "$(pkgtest_now)" -ge "$deadline" ]; then
      tail -n 30 "$CT_DIR/console.log" >&2
      pkgtest_log "container: systemd-nspawn did not start a PID 1"
      return 1
    fi
    sleep 0.02
  done
  # PID 1 runs nspawn's code until it execs systemd; systemctl needs the manager's socket.
  until [ "$(cat "/proc/$CT_LEADER/comm" 2>/dev/null)" = systemd ] &&
        [ -S "/proc/$CT_LEADER/root/run/systemd/private" ]; do
    if ! _ct_alive "$CT_LEADER" || [ "$(pkgtest_now)" -ge "$deadline" ]; then
      tail -n 30 "$CT_DIR/console.log" >&2
      pkgtest_log "container: systemd did not come up in PID 1 ($CT_LEADER)"
      return 1
    fi
    sleep 0.02
  done
  state=$(CT_EXEC_TIMEOUT=$(( (deadline - $(pkgtest_now)) / 1000 + 1 )) \
    ct_exec systemctl is-system-running --wait 2>&1) || true
  CT_BOOT_SECS=$(pkgtest_secs "$t0")
  case "$state" in
    running) pkgtest_log "container: $CT_NAME booted in $CT_BOOT_SECS s (PID 1 is $CT_LEADER)" ;;
    degraded)
      pkgtest_log "container: $CT_NAME booted in $CT_BOOT_SECS s, degraded; failed units:"
      ct_exec systemctl --failed --no-legend >&2 || true ;;
    *)
      tail -n 30 "$CT_DIR/console.log" >&2
      pkgtest_log "container: not booted after $CT_BOOT_SECS s (is-system-running: ${state:-nothing})"
      return 1 ;;
  esac
}

# ct_exec CMD...: run CMD inside the booted container (all its namespaces, its root, a clean
# environment), stdin passed on, killed after $CT_EXEC_TIMEOUT seconds.
ct_exec() {
  [ -n "$CT_LEADER" ] || pkgtest_die "ct_exec: the container is not running"
  timeout -k 5 "$CT_EXEC_TIMEOUT" nsenter -t "$CT_LEADER" -a -r -w \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 "$@"
}

# ct_journal FILE: the container's whole journal of this boot (journald keeps it in the
# container's /run: save it before stopping).
ct_journal() {
  ct_exec journalctl -b --no-pager -o short-monotonic >"$1" 2>&1 ||
    pkgtest_log "container: journalctl -b failed (see $1)"
}

# ct_console FILE: what systemd printed on the container's console (the boot, the shutdown).
ct_console() { cp "$CT_DIR/console.log" "$1"; }

# ct_stop [TIMEOUT]: orderly shutdown (SIGTERM to nspawn: it asks systemd to power off), SIGKILL
# after TIMEOUT seconds (default 20); then the cgroups nspawn left behind are removed.
# shellcheck disable=SC2120  # the argument is optional
ct_stop() {
  local timeout=${1:-20} t0 deadline d
  if [ -n "$CT_NSPAWN_PID" ]; then
    t0=$(pkgtest_now)
    deadline=$(( t0 + timeout * 1000 ))
    if _ct_alive "$CT_NSPAWN_PID"; then
      kill -TERM "$CT_NSPAWN_PID" 2>/dev/null || true
      while _ct_alive "$CT_NSPAWN_PID" && [ "$(pkgtest_now)" -lt "$deadline" ]; do sleep 0.05; done
      if _ct_alive "$CT_NSPAWN_PID"; then
        pkgtest_log "container: no shutdown after ${timeout} s, SIGKILL"
        kill -KILL "$CT_NSPAWN_PID" 2>/dev/null || true
      fi
    fi
    wait "$CT_NSPAWN_PID" 2>/dev/null || true   # reap it
    CT_STOP_SECS=$(pkgtest_secs "$t0")
    pkgtest_log "container: $CT_NAME stopped in $CT_STOP_SECS s"
    CT_NSPAWN_PID=""
  fi
  # The container's PID 1 outlives a killed nspawn; killing it ends its whole PID namespace.
  if [ -n "$CT_LEADER" ]; then
    if [ "$(readlink "/proc/$CT_LEADER/ns/pid" 2>/dev/null)" = "$CT_LEADER_PIDNS" ]; then
      kill -KILL "$CT_LEADER" 2>/dev/null || true
      for _ in $(seq 100); do
        [ "$(readlink "/proc/$CT_LEADER/ns/pid" 2>/dev/null)" = "$CT_LEADER_PIDNS" ] || break
        sleep 0.05
      done
    fi
    CT_LEADER=""
  fi
  if [ -n "$_ct_cgroup" ]; then
    for d in $(_ct_cgroup_dirs); do
      [ -d "$d" ] || continue
      # Leaves first; a cgroup empties a moment after its last process is gone.
      for _ in $(seq 20); do
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$d" ] || break
        sleep 0.1
      done
      [ -d "$d" ] && pkgtest_log "container: could not remove cgroup $d"
    done
  fi
  # nspawn's mount propagation directory (it declines to remove it on a /run that is not tmpfs).
  [ -n "$CT_NAME" ] && rm -rf "/run/systemd/nspawn/propagate/$CT_NAME"
  return 0
}

# ct_cleanup: the trap. Hooks, stop, then the temp dir, after making sure nothing is mounted in
# it (rm -rf through a bind mount would delete the host's files).
ct_cleanup() {
  local rc=$? hook m
  trap - EXIT INT TERM HUP
  # shellcheck disable=SC2034  # read by the hooks
  CT_EXIT_STATUS=$rc
  for hook in "${_ct_exit_hooks[@]}"; do eval "$hook" || true; done
  ct_stop 20
  if [ -n "$CT_DIR" ] && [ -d "$CT_DIR" ]; then
    while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$CT_DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
    if awk -v d="$CT_DIR/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
      pkgtest_log "container: something is still mounted under $CT_DIR; not deleting it"
    else
      rm -rf --one-file-system "$CT_DIR"
    fi
  fi
  CT_DIR=""
  exit "$rc"
}

# ---- as a command --------------------------------------------------------------------------------
_ct_main() {
  local deps="" copies=() cmd=() spec tarball
  [ "${1:-}" = run ] || { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --deps) deps=${2:?}; shift 2 ;;
      --copy) copies+=("${2:?}"); shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  cmd=("$@")
  tarball=$("$(dirname "$0")/rootfs.sh")
  ct_init run
  ct_unpack "$tarball"
  ct_apt_satisfy "$deps"
  for spec in "${copies[@]}"; do ct_copy_in "${spec%%:*}" "${spec#*:}"; done
  ct_boot 30
  if [ ${#cmd[@]} -eq 0 ]; then
    # Interactive: no timeout (it would take the terminal away from the shell).
    nsenter -t "$CT_LEADER" -a -r -w env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      LANG=C.UTF-8 TERM="${TERM:-vt100}" bash -l || true
  else
    ct_exec "${cmd[@]}"
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  [ "${1:-}" = run ] && ct_private_mounts "$@"
  _ct_main "$@"
fi
