#!/usr/bin/env python3
"""The DMM sidecar benchmark: the sidecar pair against the direct path, nginx and HAProxy.

    bench/run.py [--quick] [--rounds N] [--sections tput,lat,conn,redis,mem,shm,dpdk] [--out DIR]

Topology (every variant at once, in one network namespace this script makes with unshare -n,
everything on 127.0.0.1):

    direct : client -> server
    others : client -> hop A -> hop B -> server     (each hop its own process)

The shm section measures the application-to-sidecar leg instead, with one sidecar and servers on
10.77.0.1 (the preload shim never captures loopback destinations):

    direct : client -> echo
    tcp    : client -> 127.0.0.1 [[forward]] -> sidecar -> echo     (what iptables capture gives)
    unix   : client under LD_PRELOAD -> Unix socket -> sidecar -> echo    (DMM_PRELOAD_SHM=0)
    shm    : the same with DMM_PRELOAD_SHM=1 (the shared-memory data path)

The dpdk section measures the sidecar pair's dpdk stack between two network namespaces A and B
(made with ip netns, deleted at the end), in phases, each with its own pair of sidecars:

    direct, kernel, kernel-txoff : client(A) [-> sidecar A -> kernel TCP] over veth dpa/dpb -> B
    xdp   : client(A) -> sidecar A -> dpdk dp0 on net_af_xdp (dpa/dpb) -> sidecar B -> server(B)
    memif : client(A) -> sidecar A -> dpdk dp0 on net_memif (shared memory) -> sidecar B -> server

Variants are measured in interleaved rounds (variant after variant, round after round) so the
machine's noise hits all of them alike; results are medians with min..max. Output, in --out
(default /tmp/dmm-bench/<stamp>): raw.csv, results.json, table.txt and PNG charts. How to read
them: bench/README.md.
"""

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Backend services, each on its fixed port, shared by every variant.
SERVICES = {"iperf3": 5201, "echo": 7000, "http": 8080, "redis": 6379}
SERVICE_INDEX = {"iperf3": 0, "echo": 1, "http": 2, "redis": 3}

# Variants: name -> (kind, description). The sidecars run on the kernel stack.
VARIANTS = {
    "direct": ("direct", "client straight to the server"),
    "dmm": ("dmm", "dmm-sidecar A -> B, kernel stack, workers=1"),
    "dmm2": ("dmm", "dmm-sidecar A -> B, kernel stack, workers=2"),
    "dmmb": ("dmm", "the --compare-sidecar binary, workers=1 (before/after comparisons)"),
    "nginx": ("nginx", "nginx 1.22 stream, 1 worker, proxy_buffer_size 64k"),
    "nginx2": ("nginx", "nginx 1.22 stream, 2 workers (reuseport), proxy_buffer_size 64k"),
    "haproxy": ("haproxy", "haproxy 2.6 mode tcp, nbthread 1, tune.bufsize 65536"),
    "haproxy2": ("haproxy", "haproxy 2.6 mode tcp, nbthread 2, tune.bufsize 65536"),
}
OURS = ("dmm", "dmm2", "dmmb")
PEERS = ("nginx", "nginx2", "haproxy", "haproxy2")

# The shm section (bench/README.md): the application-to-sidecar leg under three capture paths,
# through one dedicated sidecar (no peer: it falls back to direct) to servers on SHM_ADDR, an
# address that is local but not loopback, so that the preload shim captures it.
SHM_ADDR = "10.77.0.1"
SHM_DEV = "dmmshm0"
SHM_SERVICES = {"echo": 7000, "iperf3": 5201}  # on SHM_ADDR
SHM_FORWARD = {"echo": 11000, "iperf3": 11001}  # the sidecar's [[forward]] listeners, 127.0.0.1
# The ipt path's own servers (same programs, other ports): the REDIRECT rule takes only these,
# so the direct client and the sidecar's own connections to SHM_SERVICES are never redirected.
SHM_IPT_SERVICES = {"echo": 7002, "iperf3": 5202}
SHM_CAPTURE = 11002  # the sidecar's capture listener, 127.0.0.1 (the ipt path)
SHM_MARK = "0x444d"  # the sidecar's SO_MARK (its default): its own connections are not redirected
SHM_METRICS = 11008
SHM_TUNNEL = 11009  # the peer tunnel port dialed on SHM_ADDR: nothing listens, so no sidecar
SHM_VARIANTS = {
    "direct": f"client straight to the echo server on {SHM_ADDR}, no sidecar",
    "ipt": "iptables REDIRECT of the client's connection to the sidecar's capture listener "
           "(loopback TCP plus netfilter NAT and SO_ORIGINAL_DST: the capture the issue names)",
    "tcp": "loopback TCP to the sidecar's [[forward]] listener (the REDIRECT path without "
           "netfilter: a faster baseline than ipt)",
    "unix": "LD_PRELOAD=libdmm-preload.so, stage 1: a Unix socket to the sidecar "
            "(DMM_PRELOAD_SHM=0)",
    "shm": "LD_PRELOAD=libdmm-preload.so with DMM_PRELOAD_SHM=1 (the shared-memory data path)",
}
SHM_LEGS = ("ipt", "tcp", "unix", "shm")
# (section, pinned, event-loop client): the 64 B ping-pong forms, measured in this order.
SHM_RR = (("shm-rr64", False, False), ("shm-rr64-pinned", True, False),
          ("shm-rr64-poll", False, True), ("shm-rr64-poll-pinned", True, True))
# The dpdk section (bench/README.md): the sidecar pair between two network namespaces A
# (clients, sidecar A) and B (servers, sidecar B) this script makes, with a kernel veth for the
# control path (ctla/ctlb) and a second veth pair for the data path (dpa/dpb). The kernel and
# af_xdp variants share dpa/dpb, and af_xdp's XDP program takes every frame of it, so the
# section runs in phases: the kernel phase (dpa/dpb with kernel addresses), the xdp phase (the
# same addresses owned by the sidecars' dpdk instances) and the memif phase.
DPDK_CTL = ("10.88.0.1", "10.88.0.2")  # A, B on ctla/ctlb (/24): handshakes of xdp and memif
DPDK_DATA = ("10.89.0.1", "10.89.0.2")  # A, B on dpa/dpb (/24): kernel phase, dpdk instances
DPDK_CTL_DEVS = ("ctla", "ctlb")
DPDK_DEVS = ("dpa", "dpb")
DPDK_SERVICES = {"echo": 7000, "iperf3": 5201}  # in B, on every address
DPDK_FORWARD = {"echo": 11100, "iperf3": 11101}  # sidecar A's [[forward]] listeners, 127.0.0.1
DPDK_METRICS = 11108  # each sidecar's /metrics, 127.0.0.1 in its namespace
DPDK_TUNNEL = 11109  # sidecar B's tunnel port (every address of B), dialed by A
DPDK_VARIANTS = {
    "direct": "client in A straight to the server in B over the kernel on dpa/dpb "
              "(default offloads; reference only)",
    "kernel": "sidecar A -> sidecar B, kernel stack only; the tunnel (control and data) over "
              "dpa/dpb with kernel addresses and the veth's default offloads",
    "kernel-txoff": "the same with TX checksum offload off on dpa/dpb (what a kernel peer of a "
                    "user-space stack needs; for information)",
    "xdp": "sidecar A -> sidecar B, [[stack]] dp0 = dpdk on net_af_xdp (dpa/dpb, no kernel "
           "addresses) then kernel; handshake over ctla/ctlb",
    "memif": "sidecar A -> sidecar B, [[stack]] dp0 = dpdk on net_memif between the two "
             "sidecars (B the server) then kernel; handshake over ctla/ctlb",
}
# Phases in the order of odd rounds (even rounds run them backwards), with their variants.
DPDK_PHASES = (("kernel", ("direct", "kernel", "kernel-txoff")), ("xdp", ("xdp",)),
               ("memif", ("memif",)))
DPDK_RATIOS = (("kernel", "xdp"), ("kernel", "memif"))  # table columns: xdp / kernel, ...
SECTIONS = ("tput", "lat", "conn", "redis", "mem", "shm", "dpdk")
FD_HARD_LIMIT_NOTE = "RLIMIT_NOFILE hard limit bounds the idle-connection count"


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def port(variant, hop, service):
    """Port of `service` on hop `hop` (1 = B, next to the server; 2 = A, next to the client)."""
    index = list(VARIANTS).index(variant)
    return 10000 + 100 * index + 10 * hop + SERVICE_INDEX[service]


def entry_port(variant, service):
    return SERVICES[service] if variant == "direct" else port(variant, 2, service)


# ---------------------------------------------------------------- process bookkeeping

class Procs:
    """Everything this run starts, stopped by PID at the end."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.procs = []  # (name, Popen)

    def start(self, name, argv, **kw):
        out = open(os.path.join(self.run_dir, name + ".log"), "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    @staticmethod
    def stop_one(p, grace=5):
        """Stops one process this run started (SIGTERM to its own process group, SIGKILL after
        `grace` seconds); returns its exit status."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        return p.returncode

    def stop(self):
        for _, p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 3
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def descendants(pid):
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for c in f.read().split():
                    out += descendants(int(c))
    except OSError:
        pass
    return out


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()


def pid_ticks(pids):
    t = 0
    for p in pids:
        try:
            f = stat_fields(p)
            t += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        except (OSError, IndexError):
            pass
    return t


def rss_kb(pids):
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        t += int(line.split()[1])
        except OSError:
            pass
    return t


def tree_ticks(root):
    """(ticks of root's process tree, ticks of every other user process, ticks of the kernel's
    threads): the second is the CPU other tenants of the machine used; the third is the work
    the kernel did in its own threads (kworkers: the sidecars' kernel relay sends there,
    ksoftirqd: packet processing deferred from interrupts)."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = stat_fields(int(d))
        except OSError:
            continue
        parent[int(d)] = int(f[1])
        ticks[int(d)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    ours = others = kernel = 0
    for p, t in ticks.items():
        if p == 2 or parent.get(p) == 2:
            kernel += t
            continue
        q, k, mine = p, 0, False
        while q > 1 and k < 64:
            if q == root:
                mine = True
                break
            q = parent.get(q, 1)
            k += 1
        if mine:
            ours += t
        else:
            others += t
    return ours, others, kernel


HZ = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- configuration of the hops

def nginx_conf(d, variant, hop, workers):
    lines = [
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;",
        f"worker_processes {workers};",
        "worker_rlimit_nofile 20000;",
        f"pid {d}/nginx.pid;",
        "user root;",
        "events { worker_connections 19500; }",
        "stream {",
        "  proxy_buffer_size 64k;",
    ]
    reuse = " reuseport" if workers > 1 else ""
    for s in SERVICES:
        target = SERVICES[s] if hop == 1 else port(variant, 1, s)
        lines.append(f"  server {{ listen 127.0.0.1:{port(variant, hop, s)} backlog=8192{reuse}; "
                     f"proxy_pass 127.0.0.1:{target}; }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def haproxy_conf(variant, hop, threads):
    lines = ["global", f"    nbthread {threads}", "    maxconn 9400", "    tune.bufsize 65536",
             "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 300s",
             "    timeout server 300s", "    maxconn 9400"]
    for s in SERVICES:
        target = SERVICES[s] if hop == 1 else port(variant, 1, s)
        lines += [f"frontend f{s}", f"    bind 127.0.0.1:{port(variant, hop, s)} backlog 8192",
                  f"    default_backend b{s}", f"backend b{s}", f"    server s 127.0.0.1:{target}"]
    return "\n".join(lines) + "\n"


PSK = "bench-pre-shared-key-0123456789"


def sidecar_conf(variant, hop, workers, log_level, relay="", state_dir="/tmp", tables=True):
    """Hop B (1) serves the tunnel; hop A (2) has one [[forward]] listener per service, each bound
    for that service's address, which it reaches through B."""
    tunnel = port(variant, 1, "iperf3") + 9  # x9: B's tunnel port
    common = [
        "[sidecar]", f"workers = {workers}",
        "[log]", f'level = "{log_level}"', 'format = "plain"',
        "[capture]", "enabled = false",
        "[security]", f'psk = "{PSK}"',
        "[metrics]", f'listen = "127.0.0.1:{port(variant, hop, "iperf3") + 8}"',
        "[timeouts]", 'idle = "10m"',
        "[relay]", relay.replace(";", "\n"),
    ]
    if tables:  # a --compare-sidecar binary may predate these tables (then it has no sockets)
        common += ["[admin]", f'socket = "{state_dir}/admin.sock"',
                   "[policy]", f'dir = "{state_dir}/policy.d"',
                   "[preload]", f'socket = "{state_dir}/preload.sock"']
    if hop == 1:
        lines = common + ["[tunnel]", f'listen = "127.0.0.1:{tunnel}"',
                          "[inbound]", "allow_local = false",
                          "[[inbound.allow]]", 'cidr = "127.0.0.1/32"',
                          "ports = [" + ", ".join(f'"{p}"' for p in SERVICES.values()) + "]"]
    else:
        lines = common + ["[tunnel]", "enabled = false", f"port = {tunnel}"]
        for s, p in SERVICES.items():
            lines += ["[[forward]]", f'listen = "127.0.0.1:{port(variant, 2, s)}"',
                      f'destination = "127.0.0.1:{p}"']
    return "\n".join(lines) + "\n"


def shm_sidecar_conf(state_dir, log_level):
    """The shm section's one sidecar: a [[forward]] listener per service for the tcp path, the
    preload socket for the others. No peer sidecar runs at SHM_ADDR: the first connection probes
    SHM_TUNNEL, is refused and goes direct, and so do all later ones (no_sidecar_ttl). The kernel
    relay is off: this section measures how bytes get from the application into the sidecar, and
    with it a long-lived TCP-captured connection's bytes would not enter the sidecar at all."""
    lines = [
        "[sidecar]", "workers = 1",
        "[log]", f'level = "{log_level}"', 'format = "plain"',
        "[capture]", "enabled = true", f'listen = ["127.0.0.1:{SHM_CAPTURE}"]',
        "[security]", f'psk = "{PSK}"',
        "[metrics]", f'listen = "127.0.0.1:{SHM_METRICS}"',
        "[timeouts]", 'idle = "10m"',
        "[fallback]", 'mode = "direct"', 'no_sidecar_ttl = "1h"',
        "[relay]", "kernel_relay = false",
        "[tunnel]", "enabled = false", f"port = {SHM_TUNNEL}",
        "[admin]", f'socket = "{state_dir}/admin.sock"',
        "[policy]", f'dir = "{state_dir}/policy.d"',
        "[preload]", f'socket = "{state_dir}/preload.sock"',
    ]
    for s, p in SHM_SERVICES.items():
        lines += ["[[forward]]", f'listen = "127.0.0.1:{SHM_FORWARD[s]}"',
                  f'destination = "{SHM_ADDR}:{p}"']
    return "\n".join(lines) + "\n"


def dpdk_sidecar_conf(side, state_dir, log_level, port=None, extra=""):
    """A sidecar of the dpdk section, in namespace A (side 0) or B (side 1). With `port` (DPDK
    devargs), [[stack]] dp0 = a dpdk instance on it with the side's DPDK_DATA address, then the
    kernel stack (the default policy offers both, in order); without, only the kernel stack. A has
    a [[forward]] listener per service, bound for B's control address when dp0 carries the data
    (the handshake goes over ctla/ctlb) and for B's dpa/dpb address otherwise (the kernel
    variant: handshake and data over dpa/dpb)."""
    lines = [
        "[sidecar]", "workers = 1", 'drain_timeout = "1s"',
        "[log]", f'level = "{log_level}"', 'format = "plain"',
        "[capture]", "enabled = false",
        "[security]", f'psk = "{PSK}"',
        "[metrics]", f'listen = "127.0.0.1:{DPDK_METRICS}"',
        "[timeouts]", 'idle = "10m"',
        "[admin]", f'socket = "{state_dir}/admin.sock"',
        "[policy]", f'dir = "{state_dir}/policy.d"',
        "[preload]", f'socket = "{state_dir}/preload.sock"',
    ]
    if port:
        lines += ["[[stack]]", 'name = "dp0"', 'kind = "dpdk"', f'port = "{port}"',
                  f'address = "{DPDK_DATA[side]}/24"', extra.replace(";", "\n")]
    lines += ["[[stack]]", 'name = "kernel"', 'kind = "kernel"']
    if side == 1:
        lines += ["[tunnel]", f'listen = "0.0.0.0:{DPDK_TUNNEL}"']
    else:
        host = DPDK_CTL[1] if port else DPDK_DATA[1]
        lines += ["[tunnel]", "enabled = false", f"port = {DPDK_TUNNEL}"]
        for s, p in DPDK_SERVICES.items():
            lines += ["[[forward]]", f'listen = "127.0.0.1:{DPDK_FORWARD[s]}"',
                      f'destination = "{host}:{p}"']
    return "\n".join(lines) + "\n"


def parse_metrics(text):
    """Prometheus text -> [(name, {label: value}, value)]."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$", line)
        if m:
            try:
                out.append((m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")),
                            float(m.group(3))))
            except ValueError:
                pass
    return out


def metric_sum(samples, name, **labels):
    """The sum of every series of `name` whose labels include `labels`; None without any."""
    values = [v for n, lbl, v in samples
              if n == name and all(lbl.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.run_dir = os.path.join(self.out, "run")
        os.makedirs(self.run_dir, exist_ok=True)
        self.procs = Procs(self.run_dir)
        self.hops = {}  # variant -> {hop: Popen}
        self.echo = None
        self.rows = []  # section, variant, metric, round, value
        self.root = os.getpid()
        self.tool = os.path.join(args.build, "bench", "dmm-bench-tool")
        self.sidecar = os.path.join(args.build, "proxy", "dmm-sidecar")
        self.variants = [v for v in VARIANTS if v in args.variants]
        self.preload_lib = os.path.join(args.build, "preload", "libdmm-preload.so")
        self.shm = None  # the shm section's state once set up (start_shm)
        self.dpdk = None  # the dpdk section's state once set up (start_dpdk)

    # -------------------------------------------------------------- setup
    def start_servers(self):
        www = os.path.join(self.run_dir, "www")
        origin = os.path.join(self.run_dir, "nginx-origin")
        os.makedirs(www, exist_ok=True)
        os.makedirs(os.path.join(origin, "tmp"), exist_ok=True)
        with open(os.path.join(www, "small.txt"), "w") as f:
            f.write("x" * 64)
        self.procs.start("iperf3-server", ["iperf3", "-s", "-p", "5201", "-B", "127.0.0.1"])
        self.echo = self.procs.start("echo-server", [self.tool, "echo", "7000"])
        t = os.path.join(origin, "tmp")
        with open(os.path.join(origin, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes 1;
worker_rlimit_nofile 20000;
pid {origin}/nginx.pid;
user root;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  default_type text/plain;
  sendfile on;
  keepalive_requests 1000000;
  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi;
  uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;
  server {{ listen 127.0.0.1:8080 backlog=8192; root {www}; }}
}}
""")
        self.procs.start("nginx-origin", ["nginx", "-e", os.path.join(origin, "error.log"),
                                          "-p", origin, "-c", os.path.join(origin, "nginx.conf"),
                                          "-g", "daemon off;"])
        self.procs.start("redis", ["redis-server", "--port", "6379", "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                   "--dir", self.run_dir, "--maxclients", "10000"])

    def start_hop(self, variant, hop):
        kind = VARIANTS[variant][0]
        d = os.path.join(self.run_dir, f"{variant}-{hop}")
        os.makedirs(d, exist_ok=True)
        name = f"{variant}-{'AB'[2 - hop]}"
        if kind == "nginx":
            workers = 2 if variant.endswith("2") else 1
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(nginx_conf(d, variant, hop, workers))
            return self.procs.start(name, ["nginx", "-e", os.path.join(d, "error.log"), "-p", d,
                                           "-c", conf, "-g", "daemon off;"])
        if kind == "haproxy":
            threads = 2 if variant.endswith("2") else 1
            conf = os.path.join(d, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(haproxy_conf(variant, hop, threads))
            return self.procs.start(name, ["haproxy", "-db", "-f", conf])
        if kind == "dmm":
            workers = 2 if variant.endswith("2") else 1
            conf = os.path.join(d, "sidecar.toml")
            relay = self.args.compare_relay if variant == "dmmb" else self.args.sidecar_relay
            binary = self.args.compare_sidecar if variant == "dmmb" else self.sidecar
            # Each hop's own admin/preload sockets and policy directory; a --compare-sidecar
            # binary older than those tables gets a config without them.
            for tables in (True, False) if variant == "dmmb" else (True,):
                with open(conf, "w") as f:
                    f.write(sidecar_conf(variant, hop, workers, self.args.sidecar_log_level, relay,
                                         state_dir=d, tables=tables))
                check = subprocess.run([binary, "--mode", "validate", "-c", conf],
                                       capture_output=True, text=True)
                if check.returncode == 0:
                    break
            if check.returncode != 0:
                raise SystemExit(f"sidecar config {conf} invalid:\n{check.stderr}")
            return self.procs.start(name, [binary, "-c", conf])
        raise ValueError(variant)

    def start_proxies(self):
        for v in self.variants:
            if v == "direct":
                continue
            self.hops[v] = {1: self.start_hop(v, 1), 2: self.start_hop(v, 2)}

    def wait_listening(self):
        want = set(SERVICES.values())
        for v in self.hops:
            for hop in (1, 2):
                for s in SERVICES:
                    want.add(port(v, hop, s))
        want -= {port(v, 1, s) for v in self.hops if VARIANTS[v][0] == "dmm" for s in SERVICES}
        deadline = time.time() + 15
        missing = want
        while time.time() < deadline:
            out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
            listening = {int(m) for m in re.findall(r":(\d+)\s", out)}
            missing = want - listening
            if not missing:
                return
            time.sleep(0.1)
        raise SystemExit(f"not listening after 15 s: {sorted(missing)}; see {self.run_dir}")

    def hop_pids(self, variant, hop=None):
        if variant not in self.hops:
            return []
        hops = (1, 2) if hop is None else (hop,)
        pids = []
        for h in hops:
            pids += descendants(self.hops[variant][h].pid)
        return pids

    # -------------------------------------------------------------- the shm section's setup
    def start_shm(self):
        """SHM_ADDR on a dummy interface, an echo and an iperf3 server there, and one sidecar
        with a [[forward]] listener per server and a preload socket."""
        d = os.path.join(self.run_dir, "shm")
        os.makedirs(os.path.join(d, "policy.d"), exist_ok=True)
        # A dummy interface needs the kernel's dummy driver; without it the address goes on lo,
        # which carries the packets of every local address anyway. Either way the namespace
        # takes it with it when the run ends.
        r = subprocess.run(["ip", "link", "add", SHM_DEV, "type", "dummy"], capture_output=True,
                           text=True)
        dev = SHM_DEV
        if r.returncode != 0:
            log(f"shm: no dummy interface ({r.stderr.strip()}): {SHM_ADDR}/32 goes on lo")
            dev = "lo"
        subprocess.run(["ip", "addr", "add", f"{SHM_ADDR}/32", "dev", dev], check=True)
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        shim_conf = os.path.join(d, "preload.conf")  # empty: only the environment below counts
        open(shim_conf, "w").close()
        self.shm = {"dir": d, "device": dev, "admin": os.path.join(d, "admin.sock"),
                    "preload": os.path.join(d, "preload.sock"), "shim_conf": shim_conf,
                    "ok": False, "checks": []}
        self.shm["echo"] = self.procs.start(
            "shm-echo-server", [self.tool, "echo", SHM_ADDR, str(SHM_SERVICES["echo"])])
        self.procs.start("shm-iperf3-server", ["iperf3", "-s", "-p", str(SHM_SERVICES["iperf3"]),
                                               "-B", SHM_ADDR])
        self.shm["ipt-echo"] = self.procs.start(
            "shm-ipt-echo-server", [self.tool, "echo", SHM_ADDR, str(SHM_IPT_SERVICES["echo"])])
        self.procs.start("shm-ipt-iperf3-server",
                         ["iperf3", "-s", "-p", str(SHM_IPT_SERVICES["iperf3"]), "-B", SHM_ADDR])
        conf = os.path.join(d, "sidecar.toml")
        with open(conf, "w") as f:
            f.write(shm_sidecar_conf(d, self.args.sidecar_log_level))
        check = subprocess.run([self.sidecar, "--mode", "validate", "-c", conf],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"sidecar config {conf} invalid:\n{check.stderr}")
        self.shm["sidecar"] = self.procs.start("shm-sidecar", [self.sidecar, "-c", conf])
        want = {f"{SHM_ADDR}:{p}" for p in SHM_SERVICES.values()}
        want |= {f"{SHM_ADDR}:{p}" for p in SHM_IPT_SERVICES.values()}
        want |= {f"127.0.0.1:{p}" for p in SHM_FORWARD.values()}
        want.add(f"127.0.0.1:{SHM_CAPTURE}")
        # The ipt path: what `capture install` puts in the nat OUTPUT chain, narrowed to the
        # bench's servers and without its "local destination: RETURN" rule (SHM_ADDR is local
        # here). The sidecar's own connections carry its mark and are left alone. The rule goes
        # with the namespace.
        subprocess.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", SHM_ADDR,
                        "-m", "multiport", "--dports",
                        ",".join(str(p) for p in SHM_IPT_SERVICES.values()),
                        "-m", "mark", "!", "--mark", SHM_MARK,
                        "-j", "REDIRECT", "--to-ports", str(SHM_CAPTURE)], check=True)
        deadline = time.time() + 15
        missing = want
        while time.time() < deadline:
            out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
            missing = {w for w in want if w + " " not in out}
            if not missing and os.path.exists(self.shm["preload"]):
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"shm: not listening after 15 s: {sorted(missing)} or no "
                             f"{self.shm['preload']}; see {self.run_dir}")

    def shm_target(self, variant, service):
        if variant == "tcp":
            return "127.0.0.1", SHM_FORWARD[service]
        if variant == "ipt":
            return SHM_ADDR, SHM_IPT_SERVICES[service]
        return SHM_ADDR, SHM_SERVICES[service]

    def shm_env(self, variant):
        """The preload paths' environment; fallback = refuse, so that a sidecar that is not
        there fails the measurement instead of silently measuring the direct path."""
        if variant not in ("unix", "shm"):
            return None
        return dict(os.environ, LD_PRELOAD=self.preload_lib,
                    DMM_PRELOAD_CONFIG=self.shm["shim_conf"],
                    DMM_PRELOAD_SOCKET=self.shm["preload"], DMM_PRELOAD_FALLBACK="refuse",
                    DMM_PRELOAD_SHM="1" if variant == "shm" else "0")

    def shm_pids(self, variant):
        return [] if variant == "direct" else descendants(self.shm["sidecar"].pid)

    def shm_warm_up(self):
        """One connection through each path before measuring (the first one through the
        sidecar probes SHM_ADDR for a peer sidecar; that is not what is measured), and, while it
        runs, what the sidecar says about it (ctl connections)."""
        ok = True
        for v in SHM_VARIANTS:
            host, prt = self.shm_target(v, "echo")
            client = subprocess.Popen([self.tool, "rr", host, str(prt), "64", "1"],
                                      env=self.shm_env(v), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            time.sleep(0.5)
            try:
                with open(f"/proc/{client.pid}/environ", "rb") as f:
                    shm_var = [e.decode() for e in f.read().split(b"\0")
                               if e.startswith(b"DMM_PRELOAD_SHM=")]
                # Stage 2's rings are a memfd the sidecar passes and the client maps.
                with open(f"/proc/{client.pid}/maps") as f:
                    mapped = "/memfd:" in f.read()
            except OSError:
                shm_var, mapped = [], False
            ctl = subprocess.run([self.sidecar, "ctl", "--socket", self.shm["admin"],
                                  "connections"], capture_output=True, text=True, timeout=10)
            try:
                out, _ = client.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                client.kill()
                out, _ = client.communicate()
            port_ = (SHM_IPT_SERVICES if v == "ipt" else SHM_SERVICES)["echo"]
            dst = f"dst={SHM_ADDR}:{port_}"
            lines = [line for line in ctl.stdout.splitlines() if dst in line]
            if v == "direct":
                good = not lines  # nothing else talks to the echo server now
            elif v in ("tcp", "ipt"):
                good = len(lines) == 1 and " app=" not in lines[0]
            else:
                good = len(lines) == 1 and " app=dmm-bench-tool " in lines[0] + " "
                # unix must stay on the Unix stream; shm uses shared memory once the shim and
                # the sidecar have stage 2 (until then it measures the Unix stream too)
                good = good and not (v == "unix" and mapped)
            good = good and client.returncode == 0 and "tps=" in out
            note = (f"shm: warm-up {v}: {'ok' if good else 'FAILED'}: {out.strip()}; "
                    f"sidecar: {'; '.join(lines) or 'no connection'}"
                    + (f"; client env {' '.join(shm_var)}, shared memory "
                       f"{'mapped' if mapped else 'not mapped'}" if shm_var else ""))
            log(note)
            self.shm["checks"].append(note)
            ok = ok and good
        if not ok:
            log(f"shm: a path does not go where it should; the shm section is skipped "
                f"(logs: {self.run_dir}/shm-sidecar.log)")
        self.shm["ok"] = ok

    def pin_shm(self, cpus):
        for p in ([self.shm["echo"].pid, self.shm["ipt-echo"].pid] +
                  descendants(self.shm["sidecar"].pid)):
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(p)], capture_output=True)

    # -------------------------------------------------------------- the dpdk section's setup
    def nsexec(self, side, argv):
        """argv in namespace A (side 0) or B (1); `ip netns exec` execs it in place, so the PID
        of the Popen is the command's."""
        return ["ip", "netns", "exec", self.dpdk["ns"][side]] + argv

    def dpdk_sh(self, argv):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SystemExit(f"dpdk: {' '.join(argv)} failed: {(r.stdout + r.stderr).strip()}")
        return r.stdout

    def dpdk_note(self, note, failed=False):
        log(f"dpdk: {'FAILED: ' if failed else ''}{note}")
        self.dpdk["checks"].append(f"{'FAILED: ' if failed else ''}{note}")
        if failed:
            self.dpdk["failed"] = True

    def dpdk_available(self):
        """Whether this dmm-sidecar has the dpdk stack kind: (ok, what validate said)."""
        d = os.path.join(self.run_dir, "dpdk")
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "kind-check.toml")
        with open(conf, "w") as f:
            f.write(dpdk_sidecar_conf(1, d, "info", "net_memif0,role=server",
                                      self.args.dpdk_stack_keys))
        r = subprocess.run([self.sidecar, "--mode", "validate", "-c", conf], capture_output=True,
                           text=True)
        return r.returncode == 0, (r.stdout + r.stderr).strip()

    def start_dpdk(self):
        """Namespaces A and B, the control veth ctla/ctlb with addresses, the data veth dpa/dpb
        without (each phase sets it up), and the servers in B. The namespaces are deleted at the
        end of the run (stop_dpdk), also on errors and signals."""
        d = os.path.join(self.run_dir, "dpdk")
        os.makedirs(d, exist_ok=True)
        ns = (f"dmmbench-{os.getpid()}-a", f"dmmbench-{os.getpid()}-b")
        self.dpdk = {"dir": d, "ns": ns, "made": [], "checks": [], "failed": False,
                     "down": {}, "sidecars": {}, "tx": None, "carried": {}, "ports": {}}
        for n in ns:
            self.dpdk_sh(["ip", "netns", "add", n])
            self.dpdk["made"].append(n)
        self.dpdk_sh(["ip", "link", "add", DPDK_CTL_DEVS[0], "netns", ns[0], "type", "veth",
                      "peer", "name", DPDK_CTL_DEVS[1], "netns", ns[1]])
        self.dpdk_sh(["ip", "link", "add", DPDK_DEVS[0], "netns", ns[0], "type", "veth",
                      "peer", "name", DPDK_DEVS[1], "netns", ns[1]])
        for side in (0, 1):
            self.dpdk_sh(["ip", "-n", ns[side], "link", "set", "lo", "up"])
            for dev in (DPDK_CTL_DEVS[side], DPDK_DEVS[side]):
                # no IPv6: no router solicitations or MLD reports on the DPDK ports
                self.dpdk_sh(self.nsexec(side, ["sysctl", "-q", "-w",
                                                f"net.ipv6.conf.{dev}.disable_ipv6=1"]))
                self.dpdk_sh(["ip", "-n", ns[side], "link", "set", dev, "up"])
            self.dpdk_sh(["ip", "-n", ns[side], "addr", "add", f"{DPDK_CTL[side]}/24", "dev",
                          DPDK_CTL_DEVS[side]])
        self.dpdk["echo"] = self.procs.start(
            "dpdk-echo-server", self.nsexec(1, [self.tool, "echo", "0.0.0.0",
                                                str(DPDK_SERVICES["echo"])]))
        self.procs.start("dpdk-iperf3-server",
                         self.nsexec(1, ["iperf3", "-s", "-p", str(DPDK_SERVICES["iperf3"])]))
        self.dpdk_wait_listening(1, [f":{p}" for p in DPDK_SERVICES.values()], "servers")
        log(f"dpdk: namespaces {ns[0]} (clients, sidecar A) and {ns[1]} (servers, sidecar B); "
            f"control {DPDK_CTL_DEVS[0]}/{DPDK_CTL_DEVS[1]} {DPDK_CTL[0]}-{DPDK_CTL[1]}, data "
            f"{DPDK_DEVS[0]}/{DPDK_DEVS[1]}")

    def dpdk_wait_listening(self, side, wants, what, timeout=15, procs=()):
        """Waits for TCP listeners (":PORT" or "ADDR:PORT") in a namespace; False when one of
        `procs` exits first."""
        deadline = time.time() + timeout
        missing = wants
        while time.time() < deadline:
            out = subprocess.run(self.nsexec(side, ["ss", "-Hltn"]), capture_output=True,
                                 text=True).stdout
            missing = [w for w in wants if w + " " not in out]
            if not missing:
                return True
            if any(p.poll() is not None for p in procs):
                return False
            time.sleep(0.1)
        if procs:
            return False
        raise SystemExit(f"dpdk: {what} not listening after {timeout} s: {missing}; "
                         f"see {self.run_dir}")

    def dpdk_scrape(self, side):
        """Sidecar A's (0) or B's (1) metrics, [] when it does not answer."""
        try:
            r = subprocess.run(self.nsexec(side, [
                "curl", "-s", "--max-time", "2", f"http://127.0.0.1:{DPDK_METRICS}/metrics"]),
                capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return []
        return parse_metrics(r.stdout) if r.returncode == 0 else []

    def dpdk_tx(self, state):
        """TX checksum offload of dpa and dpb, "on" (the veth's default) or "off"."""
        if self.dpdk["tx"] == state:
            return
        for side in (0, 1):
            subprocess.run(self.nsexec(side, ["ethtool", "-K", DPDK_DEVS[side], "tx", state]),
                           capture_output=True)
            out = subprocess.run(self.nsexec(side, ["ethtool", "-k", DPDK_DEVS[side]]),
                                 capture_output=True, text=True).stdout
            m = re.search(r"^tx-checksumming: (\w+)", out, re.M)
            got = m.group(1) if m else "?"
            if got != state:
                raise SystemExit(f"dpdk: ethtool -K {DPDK_DEVS[side]} tx {state}: it is {got}")
        self.dpdk["tx"] = state

    def dpdk_start_sidecar(self, phase, side, port, rnd):
        """One sidecar of a phase; returns its Popen once its metrics answer, or None if it
        exited first (its log says why)."""
        name = f"dpdk-{phase}-{'AB'[side]}-r{rnd}"
        sd = os.path.join(self.dpdk["dir"], name)
        os.makedirs(os.path.join(sd, "policy.d"), exist_ok=True)
        conf = os.path.join(sd, "sidecar.toml")
        with open(conf, "w") as f:
            f.write(dpdk_sidecar_conf(side, sd, self.args.sidecar_log_level, port,
                                      self.args.dpdk_stack_keys))
        check = subprocess.run([self.sidecar, "--mode", "validate", "-c", conf],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"sidecar config {conf} invalid:\n{check.stderr}")
        p = self.procs.start(name, self.nsexec(side, [self.sidecar, "-c", conf]))
        self.dpdk["sidecars"][side] = p
        deadline = time.time() + 20
        while time.time() < deadline and p.poll() is None:
            if self.dpdk_scrape(side):
                return p
            time.sleep(0.1)
        return None

    def dpdk_log(self, phase, side, rnd):
        try:
            with open(os.path.join(self.run_dir, f"dpdk-{phase}-{'AB'[side]}-r{rnd}.log")) as f:
                return f.read()
        except OSError:
            return ""

    def dpdk_begin(self, phase, rnd):
        """Brings dpa/dpb into the phase's state and starts its sidecars, B first; False (and a
        note) when the phase cannot be measured."""
        ns = self.dpdk["ns"]
        ports = (None, None)
        if phase == "kernel":
            for side in (0, 1):
                # nothing of an af_xdp port may be left (a sidecar killed leaves its program)
                self.dpdk_sh(["ip", "-n", ns[side], "link", "set", "dev", DPDK_DEVS[side],
                              "xdp", "off"])
            self.dpdk_tx("on")
            for side in (0, 1):
                self.dpdk_sh(["ip", "-n", ns[side], "addr", "replace", f"{DPDK_DATA[side]}/24",
                              "dev", DPDK_DEVS[side]])
        elif phase == "xdp":
            # what a kernel peer of a user-space stack needs; here both ends are DPDK's, but the
            # link is in the state the stack's documentation asks for
            self.dpdk_tx("off")
            ports = tuple(f"net_af_xdp0,iface={dev}" for dev in DPDK_DEVS)
        else:
            sock = os.path.join(self.dpdk["dir"], "memif.sock")
            if os.path.exists(sock):
                os.unlink(sock)  # a stale socket file keeps the server from listening
            ports = tuple(f"net_memif0,role={role},socket={sock},socket-abstract=no"
                          for role in ("client", "server"))
        for side in (1, 0):  # B first: it serves A's first handshake (and is memif's server)
            if self.dpdk_start_sidecar(phase, side, ports[side], rnd) is None:
                self.dpdk_note(f"{phase}: sidecar {'AB'[side]} did not start "
                               f"(round {rnd}): {self.dpdk_log(phase, side, rnd)[-400:]}",
                               failed=True)
                return False
        if phase != "kernel":
            # dp0 must be up on both sides (its port started) and the port's link up (memif:
            # the client connected to the server)
            deadline = time.time() + 10
            while True:
                m = [self.dpdk_scrape(side) for side in (0, 1)]
                up = [metric_sum(x, "dmm_sidecar_stack_up", stack="dp0") for x in m]
                link = [metric_sum(x, "dmm_sidecar_dpdk_link_up", stack="dp0") for x in m]
                if up == [1, 1] and link == [1, 1]:
                    break
                if 0 in up:
                    side = up.index(0)
                    found = re.search(r"dpdk stack dp0 is down: [^\n]*",
                                      self.dpdk_log(phase, side, rnd))
                    why = found.group(0) if found else "stack dp0 is down (dmm_sidecar_stack_up 0)"
                    self.dpdk["down"][phase] = why  # the port cannot start here: not again
                    self.dpdk_note(f"{phase}: not measured: sidecar {'AB'[side]}: {why} (round "
                                   f"{rnd}; log {self.run_dir}/dpdk-{phase}-{'AB'[side]}-r{rnd}"
                                   ".log)", failed=phase == "memif")
                    return False
                if time.time() > deadline:
                    self.dpdk_note(f"{phase}: round {rnd} not measured: dp0 up {up}, link up "
                                   f"{link} (A, B) after 10 s; logs in {self.run_dir}",
                                   failed=True)
                    return False
                time.sleep(0.1)
        ok = self.dpdk_wait_listening(0, [f"127.0.0.1:{p}" for p in DPDK_FORWARD.values()],
                                      "sidecar A", procs=list(self.dpdk["sidecars"].values()))
        ok = ok and self.dpdk_wait_listening(1, [f":{DPDK_TUNNEL}"], "sidecar B",
                                             procs=list(self.dpdk["sidecars"].values()))
        if not ok:
            self.dpdk_note(f"{phase}: a sidecar exited while starting (round {rnd}); logs in "
                           f"{self.run_dir}", failed=True)
        return ok

    def dpdk_end(self, phase, rnd):
        """Stops the phase's sidecars (A first: memif's client leaves before its server), takes
        any XDP program off dpa/dpb and, after the kernel phase, their addresses."""
        if phase != "kernel":
            # what the dp0 ports saw, summed over the rounds, for reading the figures
            for side in (0, 1):
                m = self.dpdk_scrape(side)
                total = self.dpdk["ports"].setdefault(f"{phase} {'AB'[side]}", [0, 0, 0])
                for i, (name, labels) in enumerate((
                        ("dmm_sidecar_dpdk_tcp_retransmitted_segments_total", {}),
                        ("dmm_sidecar_dpdk_port_dropped_total", {}),
                        ("dmm_sidecar_dpdk_port_tx_packets_total", {}))):
                    total[i] += metric_sum(m, name, stack="dp0", **labels) or 0
        for side in (0, 1):
            p = self.dpdk["sidecars"].pop(side, None)
            if p is not None:
                rc = Procs.stop_one(p)
                if rc not in (0, -signal.SIGTERM):
                    self.dpdk_note(f"{phase}: sidecar {'AB'[side]} exited with status {rc} when "
                                   f"stopped (round {rnd})")
                # the EAL's runtime directory (its default --file-prefix), left behind by DPDK
                shutil.rmtree(f"/var/run/dpdk/dmm-sidecar-{p.pid}", ignore_errors=True)
        ns = self.dpdk["ns"]
        for side in (0, 1):
            subprocess.run(["ip", "-n", ns[side], "link", "set", "dev", DPDK_DEVS[side], "xdp",
                            "off"], capture_output=True)
            if phase == "kernel":
                self.dpdk_sh(["ip", "-n", ns[side], "addr", "flush", "dev", DPDK_DEVS[side]])

    def stop_dpdk(self):
        """Deletes the namespaces (with them their veths); the processes in them are stopped
        by then (Procs.stop)."""
        if not self.dpdk:
            return
        for n in self.dpdk["made"]:
            r = subprocess.run(["ip", "netns", "del", n], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"dpdk: ip netns del {n}: {r.stderr.strip()}")
        self.dpdk["made"] = []

    # -------------------------------------------------------------- measuring
    def record(self, section, variant, metric, rnd, value):
        if value is None:
            return
        self.rows.append((section, variant, metric, rnd, float(value)))

    def measure(self, section, variant, rnd, argv, timeout, pids=None, env=None):
        """Runs argv; records the CPU of the proxies (`pids`, by default the variant's hops), of
        this run, and of other tenants."""
        if pids is None:
            pids = self.hop_pids(variant)
        o0, f0, k0 = tree_ticks(self.root)
        p0 = pid_ticks(pids)
        t0 = time.time()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
            out = r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            out = ""
            log(f"{section} {variant}: timed out: {' '.join(argv)}")
        dt = time.time() - t0
        p1 = pid_ticks(pids)
        o1, f1, k1 = tree_ticks(self.root)
        # The proxies' CPU includes what the kernel did in its own threads meanwhile: the
        # kernel relay's sends run in kworkers, which no process of ours is charged for.
        kernel_pct = 100.0 * (k1 - k0) / HZ / dt
        proxy_pct = 100.0 * (p1 - p0) / HZ / dt + kernel_pct
        self.record(section, variant, "kernel%", rnd, kernel_pct)
        self.record(section, variant, "ours%", rnd, 100.0 * (o1 - o0) / HZ / dt)
        self.record(section, variant, "others%", rnd, 100.0 * (f1 - f0) / HZ / dt)
        if variant != "direct":
            self.record(section, variant, "proxy%", rnd, proxy_pct)
        return out, proxy_pct

    def pin(self, cpus):
        pids = [self.echo.pid]
        for v in self.hops:
            pids += self.hop_pids(v)
        for p in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(p)], capture_output=True)

    def run_tput(self, rnd):
        t = self.args.t_tput
        for streams in (1, 8):
            sec = f"tput-P{streams}"
            for v in self.variants:
                out, pct = self.measure(sec, v, rnd, ["iperf3", "-c", "127.0.0.1", "-p",
                                                      str(entry_port(v, "iperf3")), "-t", str(t),
                                                      "-P", str(streams), "-J"], t + 15)
                try:
                    gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
                except (ValueError, KeyError):
                    log(f"{sec} {v}: iperf3 failed: {out[-300:]}")
                    continue
                self.record(sec, v, "Gbit/s", rnd, gbps)
                if v != "direct" and pct >= 5:
                    self.record(sec, v, "Gbit/s per proxy core", rnd, gbps * 100.0 / pct)

    def parse_kv(self, out):
        return {k: float(x) for k, x in re.findall(r"(\w+)=([0-9.]+)", out)}

    def run_lat(self, rnd):
        t = self.args.t_lat
        for pinned in (False, True):
            sec = "rr64-pinned" if pinned else "rr64"
            if pinned:
                self.pin("0")
            try:
                for v in self.variants:
                    argv = [self.tool, "rr", "127.0.0.1", str(entry_port(v, "echo")), "64", str(t)]
                    if pinned:
                        argv = ["taskset", "-c", "0"] + argv
                    out, pct = self.measure(sec, v, rnd, argv, t + 10)
                    kv = self.parse_kv(out)
                    if "tps" not in kv:
                        log(f"{sec} {v}: failed: {out[-300:]}")
                        continue
                    self.record(sec, v, "p50 us", rnd, kv["p50_us"])
                    self.record(sec, v, "p99 us", rnd, kv["p99_us"])
                    self.record(sec, v, "transactions/s", rnd, kv["tps"])
                    if v != "direct" and kv["tps"] > 0:
                        self.record(sec, v, "proxy CPU us per transaction", rnd,
                                    pct / 100.0 * 1e6 / kv["tps"])
            finally:
                if pinned:
                    self.pin(f"0-{os.cpu_count() - 1}")

    def run_conn(self, rnd):
        t = self.args.t_conn
        for v in self.variants:
            url = f"http://127.0.0.1:{entry_port(v, 'http')}/small.txt"
            out, pct = self.measure("conn-wrk", v, rnd, ["wrk", "-t1", "-c32", f"-d{t}s", "-H",
                                                          "Connection: close", url], t + 15)
            m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
            if not m:
                log(f"conn-wrk {v}: failed: {out[-300:]}")
            else:
                self.record("conn-wrk", v, "connections/s", rnd, m.group(1))
                errors = sum(int(x) for x in re.findall(
                    r"(?:connect|read|write|timeout) (\d+)", out))
                m2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                self.record("conn-wrk", v, "errors", rnd, errors + (int(m2.group(1)) if m2 else 0))
            out, _ = self.measure("conn-seq", v, rnd, [self.tool, "crr", "127.0.0.1",
                                                       str(entry_port(v, "echo")), "64", str(t)],
                                  t + 10)
            kv = self.parse_kv(out)
            if "cps" in kv:
                self.record("conn-seq", v, "connections/s", rnd, kv["cps"])
                self.record("conn-seq", v, "p50 us", rnd, kv["p50_us"])
            else:
                log(f"conn-seq {v}: failed: {out[-300:]}")

    def run_redis(self, rnd):
        for pipeline in (1, 16):
            sec = f"redis-P{pipeline}"
            n = self.args.redis_n if pipeline == 1 else self.args.redis_n * 8
            for v in self.variants:
                out, _ = self.measure(sec, v, rnd, [
                    "redis-benchmark", "-h", "127.0.0.1", "-p", str(entry_port(v, "redis")),
                    "-t", "set,get", "-n", str(n), "-c", "50", "-P", str(pipeline), "--csv"], 90)
                got = False
                for row in csv.reader(out.splitlines()):
                    if row and row[0] in ("SET", "GET"):
                        self.record(sec, v, f"{row[0]} requests/s", rnd, row[1])
                        got = True
                if not got:
                    log(f"{sec} {v}: failed: {out[-300:]}")

    def run_shm(self, rnd):
        """The application-to-sidecar leg: 64 B ping-pong in four forms, then iperf3, each
        through every path in turn. leg = p50(path) - p50(direct) of the same form and round:
        what the capture path and the sidecar add (the sidecar's own hop to the echo server
        costs what the direct client's does)."""
        if not self.shm["ok"]:
            return
        t = self.args.t_lat
        for sec, pinned, polled in SHM_RR:
            if pinned:
                self.pin_shm("0")
            try:
                p50 = {}
                for v in SHM_VARIANTS:
                    host, prt = self.shm_target(v, "echo")
                    argv = [self.tool, "rr", host, str(prt), "64", str(t)]
                    if polled:
                        argv.append("poll")
                    if pinned:
                        argv = ["taskset", "-c", "0"] + argv
                    out, pct = self.measure(sec, v, rnd, argv, t + 10, pids=self.shm_pids(v),
                                            env=self.shm_env(v))
                    kv = self.parse_kv(out)
                    if "tps" not in kv:
                        log(f"{sec} {v}: failed: {out[-300:]}")
                        continue
                    p50[v] = kv["p50_us"]
                    self.record(sec, v, "p50 us", rnd, kv["p50_us"])
                    self.record(sec, v, "p99 us", rnd, kv["p99_us"])
                    self.record(sec, v, "transactions/s", rnd, kv["tps"])
                    if v != "direct" and kv["tps"] > 0:
                        self.record(sec, v, "proxy CPU us per transaction", rnd,
                                    pct / 100.0 * 1e6 / kv["tps"])
                if "direct" in p50:
                    for v in SHM_LEGS:
                        if v in p50:
                            self.record(sec, v, "leg p50 us", rnd, p50[v] - p50["direct"])
            finally:
                if pinned:
                    self.pin_shm(f"0-{os.cpu_count() - 1}")
        t = self.args.t_tput
        for v in SHM_VARIANTS:
            host, prt = self.shm_target(v, "iperf3")
            out, pct = self.measure("shm-tput-P1", v, rnd, ["iperf3", "-c", host, "-p", str(prt),
                                                            "-t", str(t), "-P", "1", "-J"],
                                    t + 15, pids=self.shm_pids(v), env=self.shm_env(v))
            try:
                # The shim's debug lines or iperf3's warnings may come before the JSON.
                doc, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
                gbps = doc["end"]["sum_received"]["bits_per_second"]
            except (ValueError, KeyError):
                log(f"shm-tput-P1 {v}: iperf3 failed: {out[-300:]}")
                continue
            self.record("shm-tput-P1", v, "Gbit/s", rnd, gbps / 1e9)

    def run_dpdk(self, rnd):
        """One round of the dpdk section: the phases in turn (backwards in even rounds), in each
        iperf3 then the 64 B ping-pong through each of its variants."""
        phases = DPDK_PHASES if rnd % 2 else DPDK_PHASES[::-1]
        for phase, variants in phases:
            if phase in self.dpdk["down"]:
                continue
            try:
                if not self.dpdk_begin(phase, rnd):
                    continue
                for kind in ("tput", "rr"):
                    for v in variants:
                        if phase == "kernel":
                            self.dpdk_tx("off" if v == "kernel-txoff" else "on")
                        self.dpdk_one(kind, v, rnd)
            finally:
                self.dpdk_end(phase, rnd)

    def dpdk_carried(self, before, stack, want):
        """Whether sidecar A's outbound connections since `before` ended on `stack` only (at
        least `want` of them; closes are counted a moment after the client is done): (ok, the
        counts by stack)."""
        deadline = time.time() + 3
        while True:
            after = self.dpdk_scrape(0)
            delta = {}
            for s in ("dp0", "kernel", "direct", "none"):
                delta[s] = ((metric_sum(after, "dmm_sidecar_connections_total",
                                        role="outbound", stack=s) or 0) -
                            (metric_sum(before, "dmm_sidecar_connections_total",
                                        role="outbound", stack=s) or 0))
            if delta[stack] >= want or time.time() > deadline:
                break
            time.sleep(0.1)
        ok = delta[stack] >= want and not any(n for s, n in delta.items() if s != stack)
        return ok, ", ".join(f"{s} {n:.0f}" for s, n in delta.items() if n) or "none"

    def dpdk_one(self, kind, v, rnd):
        """One measurement from namespace A: iperf3 -P1 (kind "tput") or the 64 B ping-pong
        ("rr"), straight to B (direct) or through sidecar A's forward listener. Through the
        sidecars, A's metrics must then show the connections ended on the variant's stack (dp0
        for xdp and memif, kernel for kernel), else nothing is recorded and the run fails."""
        svc = "iperf3" if kind == "tput" else "echo"
        if v == "direct":
            host, prt = DPDK_DATA[1], DPDK_SERVICES[svc]
        else:
            host, prt = "127.0.0.1", DPDK_FORWARD[svc]
        if kind == "tput":
            sec, t = "dpdk-tput-P1", self.args.t_dpdk_tput
            argv, timeout = ["iperf3", "-c", host, "-p", str(prt), "-t", str(t), "-P", "1",
                             "-J"], t + 15
        else:
            sec, t = "dpdk-rr64", self.args.t_dpdk_rr
            argv, timeout = [self.tool, "rr", host, str(prt), "64", str(t)], t + 10
        pids = []
        before = None
        if v != "direct":
            for p in self.dpdk["sidecars"].values():
                pids += descendants(p.pid)
            before = self.dpdk_scrape(0)
        mark = len(self.rows)
        out, pct = self.measure(sec, v, rnd, self.nsexec(0, argv), timeout, pids=pids)
        if kind == "tput":
            try:
                gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
                values = {"Gbit/s": gbps}
                if v != "direct" and pct >= 5:
                    values["Gbit/s per proxy core"] = gbps * 100.0 / pct
            except (ValueError, KeyError):
                log(f"{sec} {v}: iperf3 failed: {out[-300:]}")
                values = None
        else:
            kv = self.parse_kv(out)
            values = None
            if "tps" in kv:
                values = {"p50 us": kv["p50_us"], "p99 us": kv["p99_us"],
                          "transactions/s": kv["tps"]}
                if v != "direct" and kv["tps"] > 0:
                    values["proxy CPU us per transaction"] = pct / 100.0 * 1e6 / kv["tps"]
            else:
                log(f"{sec} {v}: failed: {out[-300:]}")
        if v != "direct":
            stack = "dp0" if v in ("xdp", "memif") else "kernel"
            ok, counts = self.dpdk_carried(before, stack, 2 if kind == "tput" else 1)
            tally = self.dpdk["carried"].setdefault(v, [0, 0])
            tally[0] += ok
            tally[1] += 1
            if not ok:
                del self.rows[mark:]
                self.dpdk_note(f"{sec} {v} round {rnd}: not recorded: sidecar A's connections "
                               f"ended on stacks {counts}, expected only {stack} (logs in "
                               f"{self.run_dir})", failed=True)
                return
        if values:
            for metric, x in values.items():
                self.record(sec, v, metric, rnd, x)

    def run_mem(self):
        n = self.args.mem_conns
        for v in self.variants:
            if v == "direct":
                continue
            a0 = rss_kb(self.hop_pids(v, 2))
            b0 = rss_kb(self.hop_pids(v, 1))
            holder = subprocess.Popen(
                [self.tool, "idle", "127.0.0.1", str(entry_port(v, "echo")), str(n), "60"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            line = holder.stdout.readline()
            if not line.startswith("READY"):
                log(f"mem {v}: the idle holder failed: {line.strip()}")
                holder.kill()
                holder.wait()
                continue
            time.sleep(0.5)
            a1 = rss_kb(self.hop_pids(v, 2))
            b1 = rss_kb(self.hop_pids(v, 1))
            holder.terminate()
            holder.wait()
            self.record("mem", v, "KB per idle connection, hop A", 1, (a1 - a0) / n)
            self.record("mem", v, "KB per idle connection, hop B", 1, (b1 - b0) / n)
            self.record("mem", v, "KB per idle connection per hop", 1, (a1 - a0 + b1 - b0) / n / 2)
            self.record("mem", v, "RSS MB both hops, idle", 1, (a0 + b0) / 1024)
            time.sleep(1.5)  # let the hops tear down before the next variant

    # -------------------------------------------------------------- main
    def run(self):
        start = time.time()
        sections = self.args.sections
        if "dpdk" in sections and not self.args.shell:
            ok, said = self.dpdk_available()
            if not ok:
                msg = (f"dpdk: {self.sidecar} has no dpdk stack kind (built without "
                       f"DMM_WITH_DPDK?): {said[-300:]}")
                if self.args.sections_given:
                    raise SystemExit(msg)
                log(msg + "; the dpdk section is skipped")
                sections.discard("dpdk")
        # The shared servers and the proxy variants serve every section but shm and dpdk.
        common = bool(sections - {"shm", "dpdk"}) or bool(self.args.shell)
        if common:
            self.start_servers()
            self.start_proxies()
            self.wait_listening()
        else:
            self.variants = []
        if "shm" in sections:
            self.start_shm()
        if "dpdk" in sections:
            if self.args.shell:
                log("dpdk: not set up with --shell (it runs in phases, each with its own "
                    "sidecars)")
            else:
                self.start_dpdk()
        time.sleep(0.5)
        if common:
            subprocess.run(["redis-cli", "-p", "6379", "set", "key:__rand_int__", "x"],
                           capture_output=True)
        if self.args.shell:
            # Exploration: the same namespace, servers and hops, then a command of yours.
            env = dict(os.environ, BENCH_TOOL=self.tool, BENCH_RUN=self.run_dir)
            for v in self.variants:
                for s in SERVICES:
                    env[f"PORT_{v}_{s}"] = str(entry_port(v, s))
                for hop in (1, 2):
                    env[f"PIDS_{v}_{'AB'[2 - hop]}"] = " ".join(map(str, self.hop_pids(v, hop)))
            if self.shm:
                env.update(SHM_ADDR=SHM_ADDR, SHM_PRELOAD_SOCKET=self.shm["preload"],
                           SHM_PRELOAD_LIB=self.preload_lib, SHM_ADMIN_SOCKET=self.shm["admin"],
                           PIDS_shm_sidecar=" ".join(map(str, self.shm_pids("shm"))))
                for s in SHM_SERVICES:
                    env[f"PORT_shm_tcp_{s}"] = str(SHM_FORWARD[s])
                    env[f"PORT_shm_{s}"] = str(SHM_SERVICES[s])
            subprocess.run(["bash", "-c", self.args.shell], env=env)
            self.elapsed = time.time() - start
            return
        if "shm" in sections:
            self.shm_warm_up()
        for rnd in range(1, self.args.rounds + 1):
            for sec, fn in (("tput", self.run_tput), ("lat", self.run_lat),
                            ("conn", self.run_conn), ("redis", self.run_redis),
                            ("shm", self.run_shm), ("dpdk", self.run_dpdk)):
                if sec in sections:
                    log(f"round {rnd}/{self.args.rounds}: {sec}")
                    fn(rnd)
        if "mem" in sections:
            log(f"memory per idle connection ({self.args.mem_conns} connections)")
            self.run_mem()
        self.elapsed = time.time() - start
        log(f"measured in {self.elapsed:.0f} s")


# ---------------------------------------------------------------- reporting

# The bar (bench/README.md): (section, metric, better, required ratio or absolute bound, label
# [, (variant, reference variant)]): without the pair, ours against the best peer.
BAR = [
    ("tput-P1", "Gbit/s", "higher", 1.3, "iperf3 1 stream, two hops"),
    ("tput-P1", "Gbit/s per proxy core", "higher", 1.3, "Gbit/s per proxy core (1 stream)"),
    ("rr64-pinned", "p50 us", "lower", 0.85, "64 B ping-pong p50, pinned to one core"),
    ("conn-wrk", "connections/s", "higher", 1.3, "new connections/s (wrk), two hops"),
    ("redis-P1", "GET requests/s", "higher", 1.2, "redis-benchmark GET pipeline 1"),
    ("redis-P1", "SET requests/s", "higher", 1.2, "redis-benchmark SET pipeline 1"),
    ("mem", "KB per idle connection per hop", "absolute", 1.0,
     "process memory per idle connection per hop (KB)"),
    ("shm-rr64-pinned", "leg p50 us", "lower", 0.5, "shm leg p50 vs iptables capture, pinned",
     ("shm", "ipt")),
    ("dpdk-tput-P1", "Gbit/s", "higher", 0.7, "dpdk af_xdp vs kernel stack, same veth, -P1",
     ("xdp", "kernel")),
    ("dpdk-tput-P1", "Gbit/s", "minimum", 6.0, "dpdk memif between the sidecars, -P1 (Gbit/s)",
     ("memif", None)),
]
# Not the bar: the same leg ratio in the other ping-pong forms, and the stage-1 path's.
SHM_INFO_FORMS = (("shm-rr64", "unpinned"), ("shm-rr64-pinned", "pinned"),
                  ("shm-rr64-poll", "poll, unpinned"), ("shm-rr64-poll-pinned", "poll, pinned"))
LOWER_IS_BETTER = ("us", "KB", "errors", "%")


def lower_better(metric):
    return any(metric.endswith(s) or s + " " in metric for s in LOWER_IS_BETTER)


def summarize(rows):
    data = {}
    for sec, v, metric, _, value in rows:
        data.setdefault(sec, {}).setdefault(metric, {}).setdefault(v, []).append(value)
    summary = {}
    for sec, metrics in data.items():
        for metric, by_variant in metrics.items():
            for v, values in by_variant.items():
                summary.setdefault(sec, {}).setdefault(metric, {})[v] = {
                    "median": statistics.median(values), "min": min(values), "max": max(values),
                    "n": len(values)}
    return summary


def fmt(x):
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def best_peer(by_variant, lower):
    peers = [(s["median"], v) for v, s in by_variant.items() if v in PEERS]
    if not peers:
        return None, None
    return (min if lower else max)(peers)


def is_shm(section):
    return section.startswith("shm-")


def is_dpdk(section):
    return section.startswith("dpdk-")


def section_variants(section, variants):
    """The columns of a section: the shm and dpdk sections have their own variants, not the
    proxies."""
    if is_dpdk(section):
        return list(DPDK_VARIANTS)
    return list(SHM_VARIANTS) if is_shm(section) else variants


SHM_RATIOS = (("tcp", "unix"), ("tcp", "shm"), ("ipt", "shm"))


def section_ratios(section):
    """The (reference, variant) pairs of a section's last columns; None: ours vs the best
    peer."""
    if is_dpdk(section):
        return DPDK_RATIOS
    return SHM_RATIOS if is_shm(section) else None


def ratio_of(mine, ref):
    """mine / ref of two medians, or None when it means nothing (a leg at or below zero)."""
    return mine / ref if ref > 0 and mine is not None else None


def table(summary, variants, ours):
    lines = []
    for sec, metrics in summary.items():
        pairs = section_ratios(sec)
        cols = section_variants(sec, variants)
        lines.append(f"== {sec}")
        header = f"{'metric':32s}" + "".join(f"{v:>22s}" for v in cols)
        header += ("".join(f"  {v + ' vs ' + b:>12s}" for b, v in pairs)
                   if pairs else
                   f"  {ours + ' vs best peer':>22s}")
        lines.append(header)
        for metric, by_variant in metrics.items():
            lower = lower_better(metric)
            row = f"{metric:32s}"
            for v in cols:
                s = by_variant.get(v)
                cell = "-" if s is None else (
                    fmt(s["median"]) if s["n"] == 1 else
                    f"{fmt(s['median'])} [{fmt(s['min'])}..{fmt(s['max'])}]")
                row += f" {cell:>21s}"  # a long cell still stands apart
            if "%" in metric or metric == "errors":
                pass
            elif pairs:
                for base, v in pairs:
                    b = by_variant.get(base)
                    r = b and by_variant.get(v) and ratio_of(by_variant[v]["median"],
                                                            b["median"])
                    row += f"  {r:>11.2f}x" if r is not None else f"  {'-':>12s}"
            else:
                peer, name = best_peer(by_variant, lower)
                mine = by_variant.get(ours)
                if peer and mine:
                    row += f"  {mine['median'] / peer:>13.2f}x {name:>8s}"
            lines.append(row)
        lines.append("")
    return lines


def bar_lines(summary, ours):
    dpdk = any(is_dpdk(sec) for sec in summary)
    lines = [f"== the bar ({ours} on the kernel stack vs the best peer in this run; "
             "shm vs ipt on the shm line" +
             ("; dpdk: xdp vs kernel over dpa/dpb, memif absolute)" if dpdk else ")")]
    verdicts = []
    for sec, metric, better, need, label, *pair in BAR:
        by_variant = summary.get(sec, {}).get(metric)
        mine_name, ref_name = pair[0] if pair else (ours, None)
        if not by_variant or mine_name not in by_variant or (
                ref_name and ref_name not in by_variant):
            lines.append(f"  {label:50s} not measured")
            continue
        mine = by_variant[mine_name]["median"]
        if ref_name:
            ref = by_variant[ref_name]["median"]
            r = ratio_of(mine, ref)
            ok = r is not None and (r <= need if better == "lower" else r >= need)
            req = ("<= " if better == "lower" else ">= ") + f"{need}x"
            shown = f"{r:.2f}x" if r is not None else "undefined"
            lines.append(f"  {label:50s} {fmt(mine):>8s} vs {ref_name} {fmt(ref):>8s} = "
                         f"{shown}  required {req}  {'MET' if ok else 'NOT MET'}")
        elif better == "absolute":
            ok = mine <= need
            lines.append(f"  {label:50s} {fmt(mine):>8s}  required <= {need}  "
                         f"{'MET' if ok else 'NOT MET'}")
        elif better == "minimum":
            ok = mine >= need
            lines.append(f"  {label:50s} {fmt(mine):>8s}  required >= {need}  "
                         f"{'MET' if ok else 'NOT MET'}")
        else:
            peer, name = best_peer(by_variant, better == "lower")
            if peer is None:
                lines.append(f"  {label:50s} no peer measured")
                continue
            ratio = mine / peer
            ok = ratio <= need if better == "lower" else ratio >= need
            req = ("<= " if better == "lower" else ">= ") + f"{need}x"
            lines.append(f"  {label:50s} {fmt(mine):>8s} vs {name} {fmt(peer):>8s} = "
                         f"{ratio:.2f}x  required {req}  {'MET' if ok else 'NOT MET'}")
        verdicts.append(ok)
    return lines, verdicts


def shm_info_lines(summary):
    """The leg of each path in every ping-pong form, and its ratio to the ipt and tcp legs."""
    lines = []
    for sec, form in SHM_INFO_FORMS:
        legs = summary.get(sec, {}).get("leg p50 us", {})
        if not legs:
            continue
        row = f"  {form:16s} leg p50"
        for v in SHM_LEGS:
            if v in legs:
                row += f" {v} {fmt(legs[v]['median'])}"
        row += " us"
        for base in ("ipt", "tcp"):
            if base not in legs or "shm" not in legs:
                continue
            r = ratio_of(legs["shm"]["median"], legs[base]["median"])
            row += f"; shm/{base} " + (f"{r:.2f}x" if r is not None else "undefined")
        lines.append(row + (" (shm/ipt is the bar line)" if sec == "shm-rr64-pinned" else ""))
    if lines:
        lines.insert(0, "== shm: the application-to-sidecar leg, p50(path) - p50(direct), "
                        "and shm's ratio to the ipt and tcp legs (informational but for the "
                        "bar line)")
    return lines


def charts(summary, variants, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (apt-get install python3-matplotlib): no charts")
        return []
    files = []
    for sec, metrics in summary.items():
        shown = [m for m in metrics if "%" not in m and m != "errors"]
        if not shown:
            continue
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
        cols = section_variants(sec, variants)
        # sidecars green, peers blue, direct grey; in the shm section the tcp path is the
        # reference (blue) and the preload paths green; in the dpdk section the kernel stack
        # is the reference and the dpdk stack green
        ours = ("unix", "shm") if is_shm(sec) else ("xdp", "memif") if is_dpdk(sec) else OURS
        for ax, metric in zip(axes[0], shown):
            by_variant = metrics[metric]
            names = [v for v in cols if v in by_variant]
            med = [by_variant[v]["median"] for v in names]
            err = [[by_variant[v]["median"] - by_variant[v]["min"] for v in names],
                   [by_variant[v]["max"] - by_variant[v]["median"] for v in names]]
            colors = ["tab:green" if v in ours else "tab:gray" if v == "direct" else "tab:blue"
                      for v in names]
            ax.bar(names, med, yerr=err, color=colors, capsize=3)
            ax.set_title(metric, fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        fig.suptitle(sec + " (median, min..max)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{sec}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def versions():
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {
        "kernel": os.uname().release, "cpus": os.cpu_count(),
        "iperf3": first(["iperf3", "--version"]), "wrk": first(["wrk", "-v"]),
        "haproxy": first(["haproxy", "-v"]), "nginx": first(["nginx", "-v"]),
        "redis": first(["redis-server", "--version"]),
    }


def report(bench, args):
    summary = summarize(bench.rows)
    variants = bench.variants
    with open(os.path.join(args.out, "raw.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "variant", "metric", "round", "value"])
        w.writerows(bench.rows)
    lines = [f"DMM sidecar benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
             f"rounds={args.rounds}, {'quick' if args.quick else 'full'} mode, "
             f"{bench.elapsed:.0f} s"]
    for k, v in versions().items():
        lines.append(f"  {k}: {v}")
    for v in variants:
        lines.append(f"  {v}: {VARIANTS[v][1]}")
    if bench.shm:
        for v, what in SHM_VARIANTS.items():
            lines.append(f"  shm section, {v}: {what}")
        lines.append(f"  shm section: servers on {SHM_ADDR} (on {bench.shm['device']}), one "
                     "dmm-sidecar, workers=1, [fallback] mode = direct (no peer sidecar)")
    if bench.dpdk:
        for v, what in DPDK_VARIANTS.items():
            lines.append(f"  dpdk section, {v}: {what}")
        lines.append(f"  dpdk section: namespaces A and B, control veth {DPDK_CTL[0]}-"
                     f"{DPDK_CTL[1]}, data veth dpa/dpb {DPDK_DATA[0]}-{DPDK_DATA[1]}; "
                     f"sidecars workers=1; iperf3 -t {args.t_dpdk_tput}, ping-pong "
                     f"{args.t_dpdk_rr} s; dp0 keys: {args.dpdk_stack_keys or 'defaults'}")
    lines.append("values: median [min..max] over rounds; ratio = ours / best peer (median); "
                 "proxy% = CPU of both hops plus kernel%, kernel% = the kernel's own threads "
                 "(kworkers: the kernel relay's sends; ksoftirqd), ours% = everything this run "
                 "started, others% = other tenants of the machine (noise), all in % of one core")
    if bench.shm:
        lines.append("shm-* sections: ratio = variant / tcp or ipt (median); proxy% = CPU of the one "
                     "sidecar; leg p50 = p50(path) - p50(direct) per round")
    if bench.dpdk:
        lines.append("dpdk-* sections: ratio = variant / kernel (median); proxy% = CPU of both "
                     "sidecars (their poll threads included)")
    lines.append("")
    lines += table(summary, variants, args.ours)
    bar, verdicts = bar_lines(summary, args.ours)
    lines += bar
    shm_info = shm_info_lines(summary)
    if shm_info:
        lines += [""] + shm_info
    if bench.shm:
        lines += ["", "== shm: the warm-up connections and what the sidecar said about them"]
        lines += ["  " + c.removeprefix("shm: ") for c in bench.shm["checks"]]
    dpdk_info = dpdk_info_lines(summary, bench) if bench.dpdk else []
    lines += dpdk_info
    others = [r[4] for r in bench.rows if r[2] == "others%"]
    if others:
        lines.append(f"  CPU used by other tenants during the measurements: median "
                     f"{statistics.median(others):.0f}%, max {max(others):.0f}% of one core")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(text)
    pngs = charts(summary, variants, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"date": datetime.datetime.now().isoformat(), "rounds": args.rounds,
                   "quick": args.quick, "seconds": bench.elapsed, "versions": versions(),
                   "variants": {v: VARIANTS[v][1] for v in variants}, "ours": args.ours,
                   "summary": summary, "bar": bar, "bar_met": all(verdicts) and bool(verdicts),
                   "shm": bench.shm and {
                       "variants": SHM_VARIANTS, "address": SHM_ADDR,
                       "device": bench.shm["device"], "checks": bench.shm["checks"],
                       "paths_ok": bench.shm["ok"], "legs": shm_info},
                   "dpdk": bench.dpdk and {
                       "variants": DPDK_VARIANTS, "control": DPDK_CTL, "data": DPDK_DATA,
                       "t_tput": args.t_dpdk_tput, "t_rr": args.t_dpdk_rr,
                       "stack_keys": args.dpdk_stack_keys, "down": bench.dpdk["down"],
                       "carried": bench.dpdk["carried"], "ports": bench.dpdk["ports"],
                       "checks": bench.dpdk["checks"],
                       "failed": bench.dpdk["failed"], "info": dpdk_info},
                   "charts": [os.path.basename(p) for p in pngs]}, f, indent=1)
    print(text)
    log(f"results in {args.out}: table.txt results.json raw.csv " +
        " ".join(os.path.basename(p) for p in pngs))


def dpdk_info_lines(summary, bench):
    """The dpdk section's figures in one place, and what was checked along the way."""
    tput = summary.get("dpdk-tput-P1", {}).get("Gbit/s", {})
    rr = summary.get("dpdk-rr64", {})
    lines = ["", "== dpdk: iperf3 -P1 and 64 B ping-pong (medians) per variant"]
    for v in DPDK_VARIANTS:
        row = f"  {v:14s}"
        row += f" {fmt(tput[v]['median']):>6s} Gbit/s" if v in tput else f" {'-':>6s} Gbit/s"
        for metric in ("p50 us", "p99 us"):
            x = rr.get(metric, {}).get(v)
            row += f"  {metric.split()[0]} {fmt(x['median']) if x else '-':>6s} us"
        if v in bench.dpdk["down"]:
            row += f"  (not measured: {bench.dpdk['down'][v]})"
        lines.append(row)
    for v, base in (("xdp", "kernel"), ("xdp", "kernel-txoff"), ("memif", "kernel")):
        if v in tput and base in tput:
            r = ratio_of(tput[v]["median"], tput[base]["median"])
            lines.append(f"  {v} / {base} throughput: {r:.2f}x")
    carried = bench.dpdk["carried"]
    lines.append("  carried by the variant's stack (sidecar A's metrics after each measurement): "
                 + (", ".join(f"{v} {ok} of {n}" for v, (ok, n) in carried.items())
                    or "nothing"))
    for port, (rexmit, drops, tx) in bench.dpdk["ports"].items():
        lines.append(f"  dp0 of {port}, all rounds: {tx:,.0f} frames sent, {rexmit:,.0f} TCP "
                     f"segments retransmitted, {drops:,.0f} frames dropped")
    if bench.dpdk["checks"]:
        lines.append("== dpdk: notes")
        lines += ["  " + c for c in bench.dpdk["checks"]]
    return lines


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 short rounds (about 3 minutes)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--sections",
                   help="comma-separated, of " + ",".join(SECTIONS) + " (default: all; dpdk "
                   "only when the sidecar has the dpdk stack kind)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ours", default="dmm", help="the sidecar variant the bar is judged on")
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--out")
    p.add_argument("--compare-sidecar", help="another dmm-sidecar binary, run as variant dmmb")
    p.add_argument("--compare-relay", help="[relay] keys for variant dmmb (default: "
                   "--sidecar-relay); with or without --compare-sidecar")
    p.add_argument("--sidecar-log-level", default="info")
    p.add_argument("--shell", help="set everything up, run this bash snippet instead of measuring "
                   "(env: PORT_<variant>_<service>, PIDS_<variant>_<A|B>, BENCH_TOOL)")
    p.add_argument("--sidecar-relay", default="",
                   help='extra [relay] keys for the sidecars, e.g. "splice = false; buffer_size = 131072"')
    p.add_argument("--mem-conns", type=int, default=8000, help=FD_HARD_LIMIT_NOTE)
    p.add_argument("--dpdk-stack-keys", default="",
                   help='extra keys for both sidecars\' dpdk [[stack]] dp0 in the dpdk section, '
                   'e.g. "busy_poll = true; idle_sleep_us = 20"')
    a = p.parse_args()
    a.sections_given = a.sections is not None
    a.sections = set((a.sections or ",".join(SECTIONS)).split(","))
    if a.sections - set(SECTIONS):
        p.error(f"unknown sections: {','.join(sorted(a.sections - set(SECTIONS)))}")
    a.variants = set(a.variants.split(",")) | {"direct"}
    if a.compare_sidecar or a.compare_relay is not None:
        a.compare_sidecar = os.path.abspath(a.compare_sidecar or
                                            os.path.join(a.build, "proxy", "dmm-sidecar"))
        if a.compare_relay is None:
            a.compare_relay = a.sidecar_relay
    else:
        a.variants.discard("dmmb")
    if a.rounds is None:
        a.rounds = 2 if a.quick else 5
    a.t_tput = 1 if a.quick else 2
    a.t_lat = 1 if a.quick else 2
    a.t_conn = 1 if a.quick else 2
    a.redis_n = 20000 if a.quick else 50000
    a.t_dpdk_tput = 2 if a.quick else 5
    a.t_dpdk_rr = 1 if a.quick else 2
    if a.quick:
        a.mem_conns = min(a.mem_conns, 3000)
    if a.out is None:
        a.out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dmm-bench",
                             datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    a.build = os.path.abspath(a.build)
    a.out = os.path.abspath(a.out)
    return a


def main():
    args = parse_args()
    if os.environ.get("DMM_BENCH_IN_NETNS") != "1":
        if os.geteuid() != 0:
            sys.exit("bench/run.py: run as root (it makes a network namespace)")
        tools = ["iperf3", "wrk", "haproxy", "nginx", "redis-server", "redis-benchmark",
                 "taskset", "unshare", "ss"]
        if "dpdk" in args.sections:
            tools += ["ip", "ethtool", "curl"]
        for tool in tools:
            if shutil.which(tool) is None:
                sys.exit(f"bench/run.py: {tool} is missing; tests/bootstrap.sh bench installs "
                         "everything")
        binaries = ["bench/dmm-bench-tool", "proxy/dmm-sidecar"]
        if "shm" in args.sections:
            binaries.append("preload/libdmm-preload.so")
        for binary in binaries:
            mode = os.R_OK if binary.endswith(".so") else os.X_OK
            if not os.access(os.path.join(args.build, binary), mode):
                sys.exit(f"bench/run.py: {args.build}/{binary} is not built "
                         "(tests/bootstrap.sh build)")
        env = dict(os.environ, DMM_BENCH_IN_NETNS="1")
        # A hard bound on the whole run; the namespace goes away with its last process.
        os.execvpe("timeout", ["timeout", "-k", "10", "1500", "unshare", "-n", sys.executable,
                               os.path.abspath(__file__)] + sys.argv[1:], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for k, v in (("net.ipv4.ip_local_port_range", "12000 65000"), ("net.ipv4.tcp_tw_reuse", "1"),
                 ("net.core.somaxconn", "8192"), ("net.ipv4.tcp_max_syn_backlog", "8192")):
        subprocess.run(["sysctl", "-q", "-w", f"{k}={v}"], check=True)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.makedirs(args.out, exist_ok=True)
    log(f"results -> {args.out} (rounds={args.rounds}, sections={','.join(sorted(args.sections))})")
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        bench.run()
    finally:
        # a second Ctrl-C must not leave the dpdk section's namespaces behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            bench.procs.stop()
        finally:
            bench.stop_dpdk()
    if not args.shell:
        report(bench, args)
    if bench.dpdk and bench.dpdk["failed"]:
        sys.exit("bench/run.py: the dpdk section failed (see its notes above)")


if __name__ == "__main__":
    main()
