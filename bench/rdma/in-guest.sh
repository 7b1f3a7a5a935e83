#!/bin/bash
# The rdma benchmark's body, run inside the Soft-RoCE guest of tests/rdma/ by bench/rdma/run.sh.
# In one guest and one run, interleaved over ROUNDS rounds, the same workload (librdmacm's
# rstream: 64 KiB transfers for throughput, 64 B ping-pong for latency) over:
#   sidecar  rstream -T s (kernel sockets) client -> sidecar A -> RDMA (rd0) -> sidecar B ->
#            rstream -T s server: the sidecars' rdma path, as applications see it
#   rstream  rstream over rsocket between the two addresses: RDMA straight from the application
#   rstream-spin  the same with rstream's default non-blocking calls retried in a loop (it spins)
#   tcp      rstream -T s straight between the two addresses (the kernel's loopback TCP)
#   sidecar-kernel  as sidecar, with both sidecars on the kernel stack instead of rd0
# plus perftest's ib_write_bw / ib_send_lat (raw verbs) for scale. Writes OUT/raw.csv
# (variant,test,round,value) and OUT/*.log.
# Usage: in-guest.sh BUILD_DIR OUT ROUNDS   (RDMA_EXTRA: more keys for the rd0 [[stack]] tables)
set -euo pipefail
build=$1 out=$2 rounds=${3:-3}
A=${RDMAVM_IP_A:-192.168.77.1} B=${RDMAVM_IP_B:-192.168.77.2}
dev=${RDMAVM_DEV:-rxe0} gid=${RDMAVM_GID_INDEX_B:-2}
bin=$build/proxy/dmm-sidecar
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Throughput: 64 KiB x 100 transfers x 10 iterations each way (125 MiB); latency: 64 B x 1, 4000
# iterations (usec/xfer is half a round trip).
BW=(-S 65536 -C 100 -I 10)
LAT=(-S 64 -C 1 -I 4000)

wait_tcp() {  # port: until something listens there (process start-up is slow under TCG)
  for _ in $(seq 200); do ss -ltn "sport = :$1" | grep -q LISTEN && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2; return 1
}

sidecar() {  # name ip metrics-port forward-port (0: none) stack-kind tunnel-port
  local name=$1 ip=$2 mport=$3 forward=$4 kind=$5 tport=$6
  cat > "$work/$name.toml" <<CONF
[log]
level = "warning"
[sidecar]
workers = 1
[metrics]
listen = "127.0.0.1:$mport"
[security]
psk = "rdma-bench-key-0123456789abcdefgh"
[capture]
enabled = false
[tunnel]
listen = ["$ip:$tport"]
port = $tport
[admin]
socket = "$work/$name-admin.sock"
[preload]
socket = "$work/$name-preload.sock"
[policy]
dir = "$work/$name-policy.d"
CONF
  if [ "$kind" = rdma ]; then
    printf '[[stack]]\nname = "rd0"\nkind = "rdma"\naddress = "%s"\n%s\n' "$ip" "${RDMA_EXTRA:-}" >> "$work/$name.toml"
  else
    printf '[[stack]]\nname = "kernel"\nkind = "kernel"\n' >> "$work/$name.toml"
  fi
  if [ "$forward" != 0 ]; then
    printf '[[forward]]\nlisten = "127.0.0.1:%s"\ndestination = "%s:7471"\n' "$forward" "$B" >> "$work/$name.toml"
  fi
  mkdir -p "$work/$name-policy.d"
  "$bin" -c "$work/$name.toml" > "$out/sidecar-$name.log" 2>&1 &
  pids+=($!)
  wait_tcp "$mport" || { cat "$out/sidecar-$name.log" >&2; return 1; }
}
# The rdma pair, and a kernel-stack pair as the reference for what RDMA changes.
sidecar b "$B" 17092 0 rdma 17002
sidecar a "$A" 17091 17471 rdma 17002
sidecar kb "$B" 17094 0 kernel 17003
sidecar ka "$A" 17093 17472 kernel 17003

# One rstream run: variant test round -> appends to raw.csv.
run_rstream() {
  local variant=$1 test=$2 round=$3
  local -a args
  if [ "$test" = bw ]; then args=("${BW[@]}"); else args=("${LAT[@]}"); fi
  local -a srv cli
  # -T b: blocking calls. rstream's default is non-blocking calls retried in a loop: both ends
  # would spin on the guest's two vCPUs and starve whatever runs between them (the sidecars).
  case $variant in
    rstream) srv=(rstream -T b -b "$B" "${args[@]}"); cli=(rstream -T b -s "$B" -b "$A" "${args[@]}");;
    tcp) srv=(rstream -T s -T b -b "$B" "${args[@]}"); cli=(rstream -T s -T b -s "$B" "${args[@]}");;
    sidecar) srv=(rstream -T s -T b -b "$B" "${args[@]}"); cli=(rstream -T s -T b -s 127.0.0.1 -p 17471 "${args[@]}");;
    sidecar-kernel) srv=(rstream -T s -T b -b "$B" "${args[@]}"); cli=(rstream -T s -T b -s 127.0.0.1 -p 17472 "${args[@]}");;
    rstream-spin) srv=(rstream -b "$B" "${args[@]}"); cli=(rstream -s "$B" -b "$A" "${args[@]}");;
  esac
  timeout 120 "${srv[@]}" > "$out/$variant-$test-$round.srv.log" 2>&1 & local s=$!
  if [ "${variant#rstream}" != "$variant" ]; then rdmavm-wait-listen 7471 30
  else wait_tcp 7471; fi
  timeout 120 "${cli[@]}" > "$out/$variant-$test-$round.log" 2>&1 || { echo "$variant $test failed" >&2; cat "$out/$variant-$test-$round.log" >&2; }
  wait "$s" || true
  # "custom 64k 100 10 125m 4.71s 0.22 2353.25": Gb/sec for bw, usec/xfer for lat
  local line; line=$(grep '^custom' "$out/$variant-$test-$round.log" | tail -1)
  if [ -n "$line" ]; then
    if [ "$test" = bw ]; then echo "$variant,bw_gbit,$round,$(echo "$line" | awk '{print $7}')" >> "$out/raw.csv"
    else echo "$variant,lat_half_rtt_us,$round,$(echo "$line" | awk '{print $8}')" >> "$out/raw.csv"; fi
  fi
}

echo "variant,test,round,value" > "$out/raw.csv"
for r in $(seq "$rounds"); do
  for v in sidecar rstream tcp sidecar-kernel rstream-spin; do run_rstream "$v" bw "$r"; done
  for v in sidecar rstream tcp sidecar-kernel rstream-spin; do run_rstream "$v" lat "$r"; done
  # perftest, raw verbs (for scale): MB/s of 64 KiB RDMA writes; typical 2 B send latency.
  timeout 60 ib_write_bw -F -d "$dev" -x "$gid" -n 2000 -s 65536 > "$out/ib_write_bw-$r.srv.log" 2>&1 & s=$!
  wait_tcp 18515
  timeout 60 ib_write_bw -F -d "$dev" -x "$gid" -n 2000 -s 65536 "$B" > "$out/ib_write_bw-$r.log" 2>&1 || true
  wait $s || true
  v=$(awk '$1 == 65536 {print $4}' "$out/ib_write_bw-$r.log" | tail -1)
  [ -n "$v" ] && echo "ib_write_bw,bw_gbit,$r,$(echo "$v * 8 / 1000" | bc -l)" >> "$out/raw.csv"
  timeout 60 ib_send_lat -F -d "$dev" -x "$gid" -n 1000 > "$out/ib_send_lat-$r.srv.log" 2>&1 & s=$!
  wait_tcp 18515
  timeout 60 ib_send_lat -F -d "$dev" -x "$gid" -n 1000 "$B" > "$out/ib_send_lat-$r.log" 2>&1 || true
  wait $s || true
  v=$(awk '$1 == 2 {print $6}' "$out/ib_send_lat-$r.log" | tail -1)
  [ -n "$v" ] && echo "ib_send_lat,lat_half_rtt_us,$r,$v" >> "$out/raw.csv"
done
curl -s http://127.0.0.1:17091/metrics | grep -E '^dmm_sidecar_(rdma_|connections_total)' > "$out/metrics-a.txt" || true
echo "done"
