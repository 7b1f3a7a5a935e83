#!/bin/bash
# The rdma benchmark (bench/README.md, "RDMA"): boots the Soft-RoCE guest of tests/rdma/ once and
# runs bench/rdma/in-guest.sh there, ROUNDS interleaved rounds of the same rstream workload over
# the sidecars' rdma path, over rsocket directly (rstream), over loopback TCP and over the
# sidecars' kernel path, plus perftest for scale. Prints the table (medians, min..max, ratios to
# rstream) and writes it with raw.csv under OUT.
# Usage: bench/rdma/run.sh [--build DIR] [--rounds N] [--out DIR] [--mtu MTU]
# RDMA_EXTRA="ring_size = 2097152" passes more keys to the sidecars' rd0 instances.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
build=$here/build rounds=5 out=$here/bench/out/rdma-$(date +%Y%m%d-%H%M%S) mtu=1500
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=$(realpath "$2"); shift 2;;
    --rounds) rounds=$2; shift 2;;
    --out) out=$2; shift 2;;
    --mtu) mtu=$2; shift 2;;
    *) echo "usage: $0 [--build DIR] [--rounds N] [--out DIR] [--mtu MTU]" >&2; exit 2;;
  esac
done
mkdir -p "$out"
out=$(realpath "$out")
echo "== rdma bench: $rounds rounds, RoCE netdev MTU $mtu, results in $out"
start=$(date +%s)
RDMAVM_ENV="RDMA_EXTRA" "$here/tests/rdma/run-in-vm.sh" -t $((300 + rounds * 240)) -M "$mtu" -w "$out" -C "$here" -- \
  "$here/bench/rdma/in-guest.sh" "$build" "$out" "$rounds"
echo "== guest run: $(( $(date +%s) - start )) s"
python3 - "$out" "$mtu" <<'PY'
import csv, statistics, sys
out, mtu = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(f"{out}/raw.csv")))
vals = {}
for r in rows:
    vals.setdefault((r["test"], r["variant"]), []).append(float(r["value"]))
lines = [f"RoCE netdev MTU {mtu}; medians [min..max] over rounds; same guest, same run",
         f"{'test':<28}{'variant':<16}{'value':>10}  {'range':<20}{'/ rstream':>10}"]
names = {"bw_gbit": "throughput 64 KiB (Gbit/s)", "lat_half_rtt_us": "64 B ping-pong half RTT (us)"}
for test in ("bw_gbit", "lat_half_rtt_us"):
    base = statistics.median(vals.get((test, "rstream"), [float("nan")]))
    for v in ("sidecar", "rstream", "rstream-spin", "tcp", "sidecar-kernel", "ib_write_bw", "ib_send_lat"):
        x = vals.get((test, v))
        if not x:
            continue
        m = statistics.median(x)
        lines.append(f"{names[test]:<28}{v:<16}{m:>10.3f}  [{min(x):.3f}..{max(x):.3f}]"
                     f"{m / base:>10.2f}")
bw = statistics.median(vals[("bw_gbit", "sidecar")]) / statistics.median(vals[("bw_gbit", "rstream")])
lat = statistics.median(vals[("lat_half_rtt_us", "sidecar")]) / statistics.median(vals[("lat_half_rtt_us", "rstream")])
lines.append(f"bar: throughput sidecar/rstream = {bw:.2f} (>= 1.5: {'MET' if bw >= 1.5 else 'NOT MET'}); "
             f"latency sidecar/rstream = {lat:.2f} (<= 1.0: {'MET' if lat <= 1.0 else 'NOT MET'})")
text = "\n".join(lines) + "\n"
open(f"{out}/table.txt", "w").write(text)
print(text, end="")
PY
