#!/usr/bin/env bash
# The two-host demo: host A and host B are network namespaces joined by a veth pair. B runs an
# ordinary HTTP server; both run dmm-sidecar; A's iptables capture sends curl's connection to
# A's sidecar, which carries it to B's sidecar, which delivers it to the server. Then B's sidecar
# is stopped and the same curl falls back to a direct connection.
#
#   tests/demo/two-hosts.sh [path/to/dmm-sidecar]     (as root)
set -euo pipefail

bin=$(realpath "${1:-build/proxy/dmm-sidecar}")
[ -x "$bin" ] || { echo "no dmm-sidecar at $bin (build first)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

ns_a=dmmdemo$$a
ns_b=dmmdemo$$b
work=$(mktemp -d /tmp/dmm-demo.XXXXXX)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$ns_a" 2>/dev/null || true   # takes its iptables rules and the veth with it
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "two hosts: $ns_a (10.88.0.1) and $ns_b (10.88.0.2) on a veth pair"
ip netns add "$ns_a"
ip netns add "$ns_b"
ip -n "$ns_a" link set lo up
ip -n "$ns_b" link set lo up
ip link add "va$$" netns "$ns_a" type veth peer name "vb$$" netns "$ns_b"
ip -n "$ns_a" addr add 10.88.0.1/24 dev "va$$"
ip -n "$ns_b" addr add 10.88.0.2/24 dev "vb$$"
ip -n "$ns_a" link set "va$$" up
ip -n "$ns_b" link set "vb$$" up

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/psk"
chmod 600 "$work/psk"
for host in a b; do
  cat > "$work/$host.toml" <<TOML
[log]
level = "info"
format = "plain"
[sidecar]
workers = 2
[security]
psk_file = "$work/psk"
[metrics]
listen = "127.0.0.1:17090"
[admin]
socket = "$work/$host-admin.sock"
[preload]
socket = "$work/$host-preload.sock"
[policy]
dir = "$work/$host-policy.d"
[[stack]]
name = "kernel"
kind = "kernel"
[[stack]]
name = "lan"
kind = "kernel"
congestion = "reno"
TOML
  mkdir -p "$work/$host-policy.d"
done
# Host A's policy: web traffic on the LAN goes over the "lan" instance, raced against "kernel".
cat > "$work/a-policy.d/10-lan.toml" <<TOML
[[rule]]
name = "lan-web"
match.dst = ["10.88.0.0/24"]
match.ports = ["80", "8080"]
stacks = ["lan", "kernel"]
mode = "race"
stagger = "50ms"
TOML
"$bin" --mode validate -c "$work/a.toml" | sed 's/^/   /'

step "host B: an ordinary HTTP server (python3 -m http.server) on 10.88.0.2:8080"
mkdir -p "$work/www"
echo "hello from host B" > "$work/www/hello.txt"
ip netns exec "$ns_b" python3 -m http.server 8080 --bind 10.88.0.2 --directory "$work/www" \
  >"$work/http.log" 2>&1 &
pids+=($!)

step "both hosts: dmm-sidecar; host A: capture rules (dmm-sidecar capture install)"
ip netns exec "$ns_b" "$bin" -c "$work/b.toml" 2>"$work/b.log" &
pid_b=$!
pids+=($pid_b)
ip netns exec "$ns_a" "$bin" -c "$work/a.toml" 2>"$work/a.log" &
pids+=($!)
ip netns exec "$ns_a" "$bin" capture install -c "$work/a.toml"
ip netns exec "$ns_a" iptables -t nat -S DMM_SIDECAR | sed 's/^/   /'

wait_http() {  # namespace url
  for _ in $(seq 100); do
    ip netns exec "$1" curl -sf -o /dev/null "$2" && return 0
    sleep 0.05
  done
  echo "timed out waiting for $2 in $1" >&2
  return 1
}
wait_http "$ns_a" http://127.0.0.1:17090/metrics
wait_http "$ns_b" http://127.0.0.1:17090/metrics
wait_http "$ns_b" http://10.88.0.2:8080/hello.txt

step "host A: curl http://10.88.0.2:8080/hello.txt (an unmodified client)"
ip netns exec "$ns_a" curl -sS http://10.88.0.2:8080/hello.txt | sed 's/^/   /'
sleep 0.3

metrics() {  # namespace
  ip netns exec "$1" curl -s http://127.0.0.1:17090/metrics |
    grep -E '^dmm_sidecar_(connections_total|relay_bytes_total|fallbacks_total|handshake_duration_seconds_count|policy_decisions_total|stack_attempts_total)' |
    grep -v ' 0$' | sed 's/^/   /'
}

step "which stack and rule carried it (sidecar A's connection log)"
grep -E 'conn .* role=outbound' "$work/a.log" | sed 's/^.* conn /   conn /'
step "why: dmm-sidecar ctl policy explain --dst 10.88.0.2:8080 (over A's admin socket)"
"$bin" ctl --socket "$work/a-admin.sock" policy explain --dst 10.88.0.2:8080 | sed 's/^/   /'
step "sidecar A metrics (non-zero)"
metrics "$ns_a"
step "sidecar B metrics (non-zero)"
metrics "$ns_b"

step "stop sidecar B; the same curl now falls back to a direct connection"
kill "$pid_b"
wait "$pid_b" 2>/dev/null || true
ip netns exec "$ns_a" curl -sS http://10.88.0.2:8080/hello.txt | sed 's/^/   /'
sleep 0.3
grep -E 'no usable sidecar|stack=direct' "$work/a.log" | sed 's/^[^ ]* /   /'
step "sidecar A metrics (non-zero)"
metrics "$ns_a"

step "remove the capture rules"
ip netns exec "$ns_a" "$bin" capture remove -c "$work/a.toml"
echo "   done"
