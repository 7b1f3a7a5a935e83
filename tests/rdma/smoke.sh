#!/usr/bin/env bash
# The RDMA test bed's smoke test (ctest: rdma.testbed). Run on the host, it boots a guest with
# tests/rdma/run-in-vm.sh and runs itself in it (--in-vm); in the guest it moves real
# RDMA traffic between the bed's two addresses with rdma-core's own tools:
#   - rping: 10 verified iterations, client bound to IP_A, server on IP_B;
#   - rstream (rsockets): 100 transfers of 64 KiB, verified, client bound to IP_A, server on IP_B.
# Each client/server pair must succeed on both sides. Servers are awaited with
# rdmavm-wait-listen (never a sleep), every program runs under `timeout`.
#
#   tests/rdma/smoke.sh [run-in-vm.sh options]     (exit status: 0 ok, 124 timeout, 125 VM failure)
set -uo pipefail

if [ "${1:-}" != --in-vm ]; then   # on the host: boot a guest and run this script in it
  here=$(cd "$(dirname "$0")" && pwd)
  missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || missing+=(busybox-static)
  command -v rping >/dev/null || missing+=(rdmacm-utils)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "smoke.sh: the RDMA test bed needs: apt-get install ${missing[*]} (tests/bootstrap.sh installs them)" >&2
    exit 125
  fi
  exec "$here/run-in-vm.sh" -t "${RDMAVM_SMOKE_TIMEOUT:-240}" "$@" -- "$here/smoke.sh" --in-vm
fi

A=$RDMAVM_IP_A
B=$RDMAVM_IP_B
fails=0
ok() { echo "smoke: OK   $*"; }
bad() { echo "smoke: FAIL $*"; fails=$((fails + 1)); }

# pair NAME PORT 'SERVER CMD' 'CLIENT CMD': the server in the background, the client once the
# server listens; both must exit 0. Output goes to $log/NAME.{srv,cli}, shown on failure.
log=$(mktemp -d)
pair() {
  local name=$1 port=$2 srv=$3 cli=$4 spid src crc t0
  t0=$EPOCHREALTIME
  timeout 60 $srv > "$log/$name.srv" 2>&1 & spid=$!
  if ! rdmavm-wait-listen "$port" 30; then
    kill "$spid" 2>/dev/null; wait "$spid"
    bad "$name: server never listened"; cat "$log/$name.srv"; return
  fi
  timeout 60 $cli > "$log/$name.cli" 2>&1; crc=$?
  if [ $crc -ne 0 ]; then kill "$spid" 2>/dev/null; fi   # it would wait for a client forever
  wait "$spid"; src=$?
  if [ $crc -eq 0 ] && [ $src -eq 0 ]; then
    ok "$name ($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b - a}') s)"
    tail -n 1 "$log/$name.cli" | sed 's/^/  cli| /'
  else
    bad "$name: client rc=$crc server rc=$src"
    sed 's/^/  cli| /' "$log/$name.cli"; sed 's/^/  srv| /' "$log/$name.srv"
  fi
}

echo "smoke: $RDMAVM_DEV on $RDMAVM_NETDEV, A=$A (GID ${RDMAVM_GID_INDEX:-none}) B=$B (GID ${RDMAVM_GID_INDEX_B:-none})"
pair rping 7174 "rping -s -a $B -p 7174 -C 10 -V" "rping -c -a $B -I $A -p 7174 -C 10 -V -v"
# rping -V checks each ping's payload; -v prints them: all 10 must have arrived.
n=$(grep -c '^ping data: rdma-ping-' "$log/rping.cli")
if [ "$n" = 10 ]; then ok "rping: 10 pings verified"; else bad "rping: $n of 10 pings seen"; fi
# rstream -b on the client binds it to A (same port number as the server, on another address).
pair rstream 7471 "rstream -b $B -p 7471 -S 65536 -C 100 -T v" \
                  "rstream -s $B -b $A -p 7471 -S 65536 -C 100 -T v"
rm -rf "$log"
if [ $fails = 0 ]; then echo "smoke: all passed"; else echo "smoke: $fails failure(s)"; fi
exit $((fails > 0))
