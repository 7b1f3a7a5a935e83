#!/usr/bin/python3
"""The DMM sidecar soak test: hours of mixed traffic through sidecar pairs, with policy reloads
and peer restarts injected; errors, fallbacks by reason and the RSS curve.

    bench/soak.py --build BUILD_DIR [--duration 1h|10m|90s] [--out DIR] [--stacks kernel,dpdk]

Topology (the script re-executes itself in a network namespace of its own, unshare -n; the
dpdk pair's B side lives in a second namespace it makes with ip netns, deleted at the end):

    kernel : clients -> 127.0.0.1 [[forward]] sidecar A -> sidecar B (loopback tunnel) -> echo
             A and B each run two kernel instances, "kernel" and "kernel2"
    dpdk   : clients -> 127.0.0.1 [[forward]] sidecar A -> ctla/ctlb (handshake, kernel)
                                                        -> dpa/dpb (dp0: dpdk on net_af_packet)
                                                        -> sidecar B (namespace B) -> echo
             the kernel instance after dp0 in the policy

    rdma   : not run (the host has no RDMA; tests/rdma's QEMU guest is the only RDMA here)

Traffic, concurrently and continuously through every pair, every operation verified byte for
byte: short connections (connect, echo, close), bulk echoes of a few MiB, request/response on
kept-alive connections (one renewed every 30 s, one kept until it breaks), half-closed
connections (the client's FIN while the echo still flows back), reset connections (SO_LINGER 0
after an echo, or with data in flight), and iperf3 bursts.

Events, every --event-period, alternately: a policy reload of every sidecar (the policy file
switches between two valid versions; SIGHUP on one side, `dmm-sidecar ctl policy reload` on the
other, swapped each time) and a peer restart (every sidecar B stopped with SIGTERM by PID,
started again with the same config after --restart-gap). Client errors whose operation overlaps
a restart window (SIGTERM - 1 s .. B ready + --restart-grace) are expected; any other is not.

Output in --out (default /tmp/dmm-soak-<stamp>): soak.json (samples, events, errors, counters,
verdict), rss.png, summary.txt (also printed) and run/ (configs and logs). Exit status 1 when
RSS is not flat after warm-up, on an unexpected client error, a failed event, a sidecar that
died, or relays left open once traffic stopped. How to read it: bench/README.md, "The soak test".
"""

import argparse
import collections
import datetime
import errno
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PSK = "soak-pre-shared-key-0123456789abcdef"
STACKS = ("kernel", "dpdk", "rdma")
# Ports below the ephemeral range this script sets (20000-65000): a sidecar B restarting must
# find its tunnel port free, never taken by a client's connection meanwhile.
EPHEMERAL = "20000 65000"
ECHO_PORT = 7000
IPERF_PORT = 5201
# Per pair: A's forward listeners (echo, iperf3) and metrics on 127.0.0.1, B's tunnel and
# metrics ports.
PAIR_PORTS = {
    "kernel": {"fwd_echo": 14000, "fwd_iperf3": 14001, "metrics_a": 14008, "metrics_b": 14108,
               "tunnel": 14109},
    "dpdk": {"fwd_echo": 14200, "fwd_iperf3": 14201, "metrics_a": 14208, "metrics_b": 14308,
             "tunnel": 14309},
}
# The dpdk pair: sidecar A, the clients and this script in the script's namespace; sidecar B and
# its servers in namespace B. ctla/ctlb carry handshakes (and fallbacks), dpa/dpb are the DPDK
# ports' link (no kernel addresses).
DPDK_CTL = ("10.88.0.1", "10.88.0.2")
DPDK_DATA = ("10.89.0.1", "10.89.0.2")
DPDK_CTL_DEVS = ("ctla", "ctlb")
DPDK_DEVS = ("dpa", "dpb")

# The two policy versions a reload switches between, per pair: the same rule name would do,
# but a new name per version shows in the decisions by rule which version decided.
POLICIES = {
    "kernel": (
        '[[rule]]\nname = "soak-v1"\nmatch.ports = ["{echo}", "{iperf}"]\n'
        'stacks = ["kernel", "kernel2"]\nmode = "sequential"\nattempt_timeout = "2s"\n',
        '[[rule]]\nname = "soak-v2"\nmatch.ports = ["{echo}", "{iperf}"]\n'
        'stacks = ["kernel2", "kernel"]\nmode = "race"\nstagger = "2ms"\n'),
    "dpdk": (
        '[[rule]]\nname = "soak-v1"\nmatch.ports = ["{echo}", "{iperf}"]\n'
        'stacks = ["dp0", "kernel"]\nmode = "sequential"\nattempt_timeout = "2s"\n',
        '[[rule]]\nname = "soak-v2"\nmatch.ports = ["{echo}", "{iperf}"]\n'
        'stacks = ["dp0", "kernel"]\nmode = "race"\nstagger = "20ms"\nattempt_timeout = "3s"\n'),
}

CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 15.0
BULK_TIMEOUT = 60.0
KINDS = ("short", "bulk", "halfclose", "reset", "rr", "iperf3")


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_duration(text):
    """'1h', '10m', '90s', '1h30m', '250ms' or a number of seconds -> seconds (float)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 1h, 10m, 90s, 1m30s)")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def fmt_duration(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------- processes

class Procs:
    """Everything this run starts, stopped by PID at the end (as in bench/run.py)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.procs = []  # (name, Popen)

    def start(self, name, argv, **kw):
        out = open(os.path.join(self.run_dir, name + ".log"), "wb")
        # restore_signals=False: SIGPIPE stays ignored (Python ignores it), so that the echo
        # server survives writing to a connection a client has reset
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, restore_signals=False, **kw)
        out.close()
        self.procs.append((name, p))
        return p

    @staticmethod
    def stop_one(p, grace=5.0):
        """SIGTERM to one process this run started, SIGKILL after `grace` s; its exit status."""
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        return p.returncode

    def stop(self):
        for _, p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 5
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)


def sh(argv, timeout=30):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"soak: {' '.join(argv)} failed: {(r.stdout + r.stderr).strip()}")
    return r.stdout


def proc_status(pid):
    """(VmRSS in KiB, open fds, threads) of a process; None where unreadable."""
    rss = threads = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None, None, None
    return rss, fds, threads


# ---------------------------------------------------------------- metrics

def parse_metrics(text):
    """Prometheus text -> [(name, {label: value}, value)] (as in bench/run.py)."""
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


def metric_by(samples, name, keys):
    """{"k1=v1,k2=v2": sum} of `name` grouped by the label `keys`, nonzero only."""
    out = collections.Counter()
    for n, lbl, v in samples:
        if n == name and v:
            out[",".join(f"{k}={lbl.get(k, '')}" for k in keys)] += v
    return dict(out)


# Counters reported at the end, each grouped by these labels.
COUNTERS = {
    "dmm_sidecar_connections_total": ("role", "stack", "outcome"),
    "dmm_sidecar_fallbacks_total": ("reason", "action"),
    "dmm_sidecar_stack_attempts_total": ("stack", "outcome"),
    "dmm_sidecar_handshake_rejections_total": ("role", "reason"),
    "dmm_sidecar_policy_reloads_total": ("result",),
    "dmm_sidecar_policy_decisions_total": ("role", "rule"),
    "dmm_sidecar_breaker_transitions_total": ("stack", "state"),
    "dmm_sidecar_accept_errors_total": ("listener",),
    "dmm_sidecar_capture_refusals_total": ("reason",),
    "dmm_sidecar_splice_disabled_total": (),
    "dmm_sidecar_tunnel_reuses_total": ("role",),
    "dmm_sidecar_relay_bytes_total": ("role", "stack", "direction"),
    "dmm_sidecar_dpdk_tcp_retransmitted_segments_total": ("stack",),
    "dmm_sidecar_dpdk_port_dropped_total": ("stack", "reason"),
    "dmm_sidecar_dpdk_port_errors_total": ("stack", "direction"),
    "dmm_sidecar_dpdk_data_connections_total": ("stack", "result"),
}

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(url):
    """The parsed metrics page, or None when the sidecar does not answer."""
    try:
        with NO_PROXY.open(url, timeout=3) as r:
            return parse_metrics(r.read().decode())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- configuration

def policy_text(pair, version):
    return (f"# soak policy, version {version + 1} of 2 (bench/soak.py)\n" +
            POLICIES[pair][version].replace("{echo}", str(ECHO_PORT))
            .replace("{iperf}", str(IPERF_PORT)))


def sidecar_conf(pair, side, state_dir, args):
    """Sidecar A (side 0: [[forward]] listeners, no tunnel) or B (side 1: the tunnel) of `pair`."""
    ports = PAIR_PORTS[pair]
    metrics = ("127.0.0.1", ports["metrics_a"]) if side == 0 else \
        (DPDK_CTL[1] if pair == "dpdk" else "127.0.0.1", ports["metrics_b"])
    lines = [
        "[sidecar]", f"workers = {args.workers}", 'drain_timeout = "2s"',
        "[log]", f'level = "{args.sidecar_log_level}"', 'format = "plain"',
        "[capture]", "enabled = false",
        "[security]", f'psk = "{PSK}"',
        "[metrics]", f'listen = "{metrics[0]}:{metrics[1]}"',
        "[timeouts]", 'connect = "2s"', 'handshake = "2s"',
        "[fallback]", 'mode = "direct"', f'no_sidecar_ttl = "{args.no_sidecar_ttl}s"',
        "[admin]", f'socket = "{state_dir}/admin.sock"',
        "[policy]", f'dir = "{state_dir}/policy.d"',
        "[preload]", f'socket = "{state_dir}/preload.sock"',
    ]
    if pair == "kernel":
        lines += ["[[stack]]", 'name = "kernel"', 'kind = "kernel"',
                  "[[stack]]", 'name = "kernel2"', 'kind = "kernel"']
    else:
        lines += ["[[stack]]", 'name = "dp0"', 'kind = "dpdk"',
                  f'port = "{dpdk_port(args, side)}"', f'address = "{DPDK_DATA[side]}/24"',
                  "[[stack]]", 'name = "kernel"', 'kind = "kernel"']
    if side == 1:
        if pair == "kernel":
            lines += ["[tunnel]", f'listen = "127.0.0.1:{ports["tunnel"]}"',
                      "[inbound]", "allow_local = false",
                      "[[inbound.allow]]", 'cidr = "127.0.0.1/32"',
                      f'ports = ["{ECHO_PORT}", "{IPERF_PORT}"]']
        else:
            lines += ["[tunnel]", f'listen = "0.0.0.0:{ports["tunnel"]}"']
    else:
        host = "127.0.0.1" if pair == "kernel" else DPDK_CTL[1]
        lines += ["[tunnel]", "enabled = false", f"port = {ports['tunnel']}"]
        for svc, p in (("fwd_echo", ECHO_PORT), ("fwd_iperf3", IPERF_PORT)):
            lines += ["[[forward]]", f'listen = "127.0.0.1:{ports[svc]}"',
                      f'destination = "{host}:{p}"']
    return "\n".join(lines) + "\n"


def dpdk_port(args, side):
    if args.dpdk_port == "memif":
        return (f"net_memif0,role={('client', 'server')[side]},socket={args.memif_socket},"
                "socket-abstract=no")
    return f"net_af_packet0,iface={DPDK_DEVS[side]},framecnt=4096,qdisc_bypass=1"


# ---------------------------------------------------------------- client statistics

class Stats:
    """Client operations per (pair, kind): counts, bytes, errors by kind, and each error with
    the operation's start and end (to tell the expected ones, around peer restarts)."""

    MAX_ERRORS = 20000

    def __init__(self, t0):
        self.t0 = t0
        self.lock = threading.Lock()
        self.ops = collections.defaultdict(lambda: {"ops": 0, "ok": 0, "bytes": 0,
                                                    "errors": collections.Counter()})
        self.errors = []
        self.dropped = 0

    def ok(self, pair, kind, nbytes):
        with self.lock:
            s = self.ops[(pair, kind)]
            s["ops"] += 1
            s["ok"] += 1
            s["bytes"] += nbytes

    def error(self, pair, kind, what, t0, detail=""):
        t1 = time.time()
        with self.lock:
            s = self.ops[(pair, kind)]
            s["ops"] += 1
            s["errors"][what] += 1
            if len(self.errors) < self.MAX_ERRORS:
                self.errors.append({"pair": pair, "kind": kind, "error": what,
                                    "t0": round(t0 - self.t0, 3), "t1": round(t1 - self.t0, 3),
                                    "detail": detail[:200]})
            else:
                self.dropped += 1

    def totals(self, pair):
        with self.lock:
            return {k: s["ops"] for (p, k), s in self.ops.items() if p == pair}


class Interrupted(Exception):
    """SIGTERM (the run's `timeout`, or someone's kill) during the run."""


class OpError(Exception):
    """A client operation failed: `what` is "phase:kind" (connect:refused, io:reset, ...)."""

    def __init__(self, what, detail=""):
        super().__init__(what)
        self.what = what
        self.detail = detail


def classify(phase, exc):
    if isinstance(exc, OpError):
        return exc.what, exc.detail
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"{phase}:timeout", str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return f"{phase}:refused", str(exc)
    if isinstance(exc, ConnectionResetError):
        return f"{phase}:reset", str(exc)
    if isinstance(exc, BrokenPipeError):
        return f"{phase}:broken_pipe", str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return f"{phase}:{errno.errorcode.get(exc.errno, exc.errno)}", str(exc)
    return f"{phase}:{type(exc).__name__}", str(exc)


def connect(target):
    s = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(IO_TIMEOUT)
    return s


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(65536, n - len(buf)))
        if not chunk:
            raise OpError("io:eof", f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def reset_close(s):
    """Closes with a reset (SO_LINGER on, 0 s)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def stream_echo(target, data2, start, size, half_close):
    """Sends `size` bytes of data2 from `start` while reading the echo back, verifying each
    chunk. half_close: shut the write side as soon as everything is sent (the echo still flowing
    back); otherwise only once everything came back. Either way the server's end of stream must
    follow the last byte. Returns the bytes verified."""
    phase = "connect"
    s = connect(target)
    try:
        s.setblocking(False)
        phase = "io"
        sent = got = 0
        shut = False
        deadline = time.time() + BULK_TIMEOUT
        view = memoryview(data2)
        while True:
            if time.time() > deadline:
                raise OpError("io:timeout", f"{got} of {size} bytes back after {BULK_TIMEOUT} s")
            if sent == size and not shut and (half_close or got == size):
                s.shutdown(socket.SHUT_WR)
                shut = True
            r, w, _ = select.select([s], [s] if sent < size else [], [], 1.0)
            if w:
                try:
                    sent += s.send(view[start + sent:start + min(size, sent + 262144)])
                except BlockingIOError:
                    pass
            if r:
                try:
                    chunk = s.recv(262144)
                except BlockingIOError:
                    continue
                if not chunk:
                    if got < size:
                        raise OpError("io:eof", f"end of stream after {got} of {size} bytes")
                    if not shut:
                        raise OpError("io:early_eof", "end of stream before our shutdown")
                    return got
                if got + len(chunk) > size:
                    raise OpError("verify:too_many_bytes", f"{got + len(chunk)} > {size}")
                if chunk != view[start + got:start + got + len(chunk)]:
                    raise OpError("verify:mismatch", f"bytes {got}..{got + len(chunk)} differ")
                got += len(chunk)
    except Exception as e:  # noqa: BLE001 - every failure is classified and counted
        what, detail = classify(phase, e)
        raise OpError(what, detail) from e
    finally:
        s.close()


# ---------------------------------------------------------------- client loops

class Clients:
    """The client loops of one pair, each in a thread, until `stop` is set."""

    def __init__(self, pair, echo, iperf_port, stats, stop, args, data2):
        self.pair = pair
        self.echo = echo  # (host, port) of A's forward listener for the echo server
        self.iperf_port = iperf_port
        self.stats = stats
        self.stop = stop
        self.args = args
        self.data2 = data2  # bulk pattern, twice over (any window of bulk size is a slice)
        self.threads = []

    def start(self):
        loops = [("short", self.short_loop, ()), ("bulk", self.bulk_loop, ()),
                 ("halfclose", self.halfclose_loop, ()), ("reset", self.reset_loop, ()),
                 ("rr-renewed", self.rr_loop, (self.args.rr_conn_life,)),
                 ("rr-kept", self.rr_loop, (0,))]
        if not self.args.no_iperf3:
            loops.append(("iperf3", self.iperf3_loop, ()))
        for name, fn, a in loops:
            t = threading.Thread(target=self.guard, args=(name, fn, a), daemon=True,
                                 name=f"{self.pair}-{name}")
            t.start()
            self.threads.append(t)

    def guard(self, name, fn, a):
        try:
            fn(*a)
        except Exception as e:  # noqa: BLE001 - a loop must not die silently
            log(f"{self.pair} {name}: client loop crashed: {e!r}")
            self.stats.error(self.pair, name.split("-")[0], "client:crashed", time.time(), repr(e))

    def join(self, timeout):
        deadline = time.time() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.time()))
        return [t.name for t in self.threads if t.is_alive()]

    def paced(self, rate):
        """Yields until stop, about `rate` times per second (with jitter)."""
        rng = random.Random()
        nxt = time.time()
        while not self.stop.is_set():
            yield rng
            nxt += rng.uniform(0.5, 1.5) / rate
            delay = nxt - time.time()
            if delay > 0:
                self.stop.wait(delay)
            else:
                nxt = time.time()

    def short_loop(self):
        """connect, echo 1 B..8 KiB, close (FIN)."""
        for rng in self.paced(self.args.short_rate):
            t0 = time.time()
            phase = "connect"
            try:
                s = connect(self.echo)
                try:
                    phase = "io"
                    payload = rng.randbytes(rng.randint(1, 8192))
                    s.sendall(payload)
                    if recv_exact(s, len(payload)) != payload:
                        raise OpError("verify:mismatch")
                finally:
                    s.close()
                self.stats.ok(self.pair, "short", len(payload))
            except Exception as e:  # noqa: BLE001
                what, detail = classify(phase, e)
                self.stats.error(self.pair, "short", what, t0, detail)

    def bulk_loop(self):
        """A byte-exact echo of --bulk-mib MiB, the client reading while it writes."""
        size = len(self.data2) // 2
        for rng in self.paced(1.0 / self.args.bulk_pause):
            t0 = time.time()
            try:
                n = stream_echo(self.echo, self.data2, rng.randrange(size), size, False)
                self.stats.ok(self.pair, "bulk", n)
            except OpError as e:
                self.stats.error(self.pair, "bulk", e.what, t0, e.detail)

    def halfclose_loop(self):
        """1 B..256 KiB, the write side shut right after the last byte; the whole echo and the
        server's end of stream must still come back."""
        size = len(self.data2) // 2
        for rng in self.paced(self.args.halfclose_rate):
            t0 = time.time()
            n = rng.randint(1, min(size, 262144))
            try:
                got = stream_echo(self.echo, self.data2, rng.randrange(size), n, True)
                self.stats.ok(self.pair, "halfclose", got)
            except OpError as e:
                self.stats.error(self.pair, "halfclose", e.what, t0, e.detail)

    def reset_loop(self):
        """Alternately: echo 1 KiB (verified) then reset; or send 128 KiB and reset at once,
        data in flight both ways."""
        flip = False
        for rng in self.paced(self.args.reset_rate):
            t0 = time.time()
            phase = "connect"
            flip = not flip
            try:
                s = connect(self.echo)
                phase = "io"
                try:
                    if flip:
                        payload = rng.randbytes(1024)
                        s.sendall(payload)
                        if recv_exact(s, len(payload)) != payload:
                            raise OpError("verify:mismatch")
                    else:
                        s.setblocking(False)
                        payload = rng.randbytes(131072)
                        try:
                            s.send(payload)
                        except BlockingIOError:
                            pass
                finally:
                    reset_close(s)
                self.stats.ok(self.pair, "reset", len(payload))
            except Exception as e:  # noqa: BLE001
                what, detail = classify(phase, e)
                self.stats.error(self.pair, "reset", what, t0, detail)

    def rr_loop(self, life):
        """Request/response (1 B..2 KiB, verified) every --rr-interval on one kept-alive
        connection, renewed every `life` s (0: kept until it breaks); one op per transaction.
        The kept one waits out A's no_sidecar_ttl after a break before it reconnects, so that
        it goes through B again rather than staying a direct fallback connection."""
        rng = random.Random()
        s = None
        born = 0.0
        while not self.stop.is_set():
            t0 = time.time()
            phase = "connect"
            try:
                if s is None or (life and t0 - born > life):
                    if s is not None:
                        s.close()
                        s = None
                    s = connect(self.echo)
                    born = t0
                phase = "io"
                payload = rng.randbytes(rng.randint(1, 2048))
                s.sendall(payload)
                if recv_exact(s, len(payload)) != payload:
                    raise OpError("verify:mismatch")
                self.stats.ok(self.pair, "rr", len(payload))
            except Exception as e:  # noqa: BLE001
                what, detail = classify(phase, e)
                self.stats.error(self.pair, "rr", what, t0, detail)
                if s is not None:
                    s.close()
                    s = None
                self.stop.wait(0.2 if life else
                               self.args.restart_gap + self.args.no_sidecar_ttl + 2)
            self.stop.wait(self.args.rr_interval)
        if s is not None:
            s.close()

    def iperf3_loop(self):
        """iperf3 bursts (-t 3, -b rate) through A's forward listener to the iperf3 server."""
        for _ in self.paced(1.0 / self.args.iperf3_period):
            t0 = time.time()
            argv = ["iperf3", "-c", "127.0.0.1", "-p", str(self.iperf_port), "-t", "3", "-b",
                    self.args.iperf3_rate, "-J", "--connect-timeout", "3000"]
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=25)
            except subprocess.TimeoutExpired:
                self.stats.error(self.pair, "iperf3", "iperf3:timeout", t0)
                continue
            try:
                doc = json.loads(r.stdout)
            except ValueError:
                doc = {}
            got = doc.get("end", {}).get("sum_received", {}).get("bytes", 0)
            if r.returncode == 0 and got > 0 and "error" not in doc:
                self.stats.ok(self.pair, "iperf3", int(got))
            else:
                why = doc.get("error") or (r.stderr.strip() or f"exit {r.returncode}")
                self.stats.error(self.pair, "iperf3",
                                 "iperf3:" + re.sub(r"\d+", "N", why.split(":")[0])[:60], t0,
                                 why)


# ---------------------------------------------------------------- sidecars

class Sidecar:
    """One sidecar (A or B of a pair) across its restarts: one process per incarnation."""

    def __init__(self, soak, pair, side):
        self.soak = soak
        self.pair = pair
        self.side = side
        self.name = f"{pair}-{'AB'[side]}"
        self.dir = os.path.join(soak.run_dir, self.name)
        os.makedirs(os.path.join(self.dir, "policy.d"), exist_ok=True)
        self.conf = os.path.join(self.dir, "sidecar.toml")
        self.admin = os.path.join(self.dir, "admin.sock")
        ports = PAIR_PORTS[pair]
        host = DPDK_CTL[1] if (pair == "dpdk" and side == 1) else "127.0.0.1"
        self.url = f"http://{host}:{ports['metrics_a' if side == 0 else 'metrics_b']}/metrics"
        self.proc = None
        self.incarnation = 0
        self.pids = []  # every incarnation's pid, in order
        self.last = {}  # pid -> the last metrics scrape of that incarnation
        self.restarting = False
        self.termed = None  # the pid SIGTERM was sent to
        self.logs = []

    def write_policy(self, version):
        path = os.path.join(self.dir, "policy.d", "50-soak.toml")
        with open(path + ".tmp", "w") as f:
            f.write(policy_text(self.pair, version))
        os.replace(path + ".tmp", path)  # a reload never sees half a file

    def argv(self):
        cmd = [self.soak.sidecar, "-c", self.conf]
        return self.soak.nsexec(cmd) if (self.pair == "dpdk" and self.side == 1) else cmd

    def start(self):
        self.incarnation += 1
        name = f"{self.name}.{self.incarnation}"
        self.logs.append(os.path.join(self.soak.run_dir, name + ".log"))
        self.proc = self.soak.procs.start(name, self.argv())
        self.pids.append(self.proc.pid)
        return self.proc

    def scrape(self):
        """This incarnation's metrics (kept as its last), None when it does not answer."""
        p = self.proc
        m = scrape(self.url)
        if m is not None and p is not None:
            self.last[p.pid] = m
        return m

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout=30, link=True):
        """Until its metrics answer, its listeners listen and a dp0 instance is up (with its
        link up, unless not `link`); False when it exits first or time runs out, with what was
        missing in self.not_ready."""
        ports = PAIR_PORTS[self.pair]
        want = ([f"127.0.0.1:{ports['fwd_echo']}", f"127.0.0.1:{ports['fwd_iperf3']}"]
                if self.side == 0 else
                [f"127.0.0.1:{ports['tunnel']}" if self.pair == "kernel"
                 else f"0.0.0.0:{ports['tunnel']}"])
        deadline = time.time() + timeout
        self.not_ready = "no answer on /metrics"
        while time.time() < deadline:
            if not self.running():
                self.not_ready = f"exited with status {self.proc.returncode}"
                return False
            m = self.scrape()
            if m is not None:
                argv = ["ss", "-Hltn"]
                if self.pair == "dpdk" and self.side == 1:
                    argv = self.soak.nsexec(argv)
                out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
                missing = [w for w in want if w + " " not in out]
                up = metric_sum(m, "dmm_sidecar_stack_up", stack="dp0")
                link_up = metric_sum(m, "dmm_sidecar_dpdk_link_up", stack="dp0")
                if missing:
                    self.not_ready = f"not listening on {', '.join(missing)}"
                elif self.pair == "dpdk" and up != 1:
                    self.not_ready = "dp0 down (dmm_sidecar_stack_up 0)"
                elif self.pair == "dpdk" and link and link_up != 1:
                    self.not_ready = "dp0's link down (dmm_sidecar_dpdk_link_up 0)"
                else:
                    return True
            time.sleep(0.1)
        self.not_ready += f" after {timeout} s"
        return False

    def term(self):
        """SIGTERM by PID (its metrics scraped first), once: a second one would cut the drain."""
        p = self.proc
        if p is not None and p.poll() is None and self.termed != p.pid:
            self.scrape()
            os.kill(p.pid, signal.SIGTERM)
            self.termed = p.pid

    def stop(self, grace):
        """SIGTERM by PID unless sent already, its metrics scraped while it drains, SIGKILL
        after `grace` s; (exit status, SIGKILLed?)."""
        p = self.proc
        if p is None:
            return None, False
        self.term()
        deadline = time.time() + grace
        while p.poll() is None and time.time() < deadline:
            self.scrape()
            time.sleep(0.2)
        killed = False
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
        p.wait(timeout=10)
        # the EAL's runtime directory (its default --file-prefix), left behind by DPDK
        shutil.rmtree(f"/var/run/dpdk/dmm-sidecar-{p.pid}", ignore_errors=True)
        return p.returncode, killed

    def counters(self):
        """The counters of COUNTERS summed over every incarnation (each one's last scrape)."""
        out = {}
        for name, keys in COUNTERS.items():
            total = collections.Counter()
            for m in self.last.values():
                total.update(metric_by(m, name, keys))
            if total:
                out[name] = dict(total)
        return out


# ---------------------------------------------------------------- the soak

class Soak:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.run_dir = os.path.join(self.out, "run")
        os.makedirs(self.run_dir, exist_ok=True)
        self.procs = Procs(self.run_dir)
        self.sidecar = os.path.join(args.build, "proxy", "dmm-sidecar")
        self.tool = os.path.join(args.build, "bench", "dmm-bench-tool")
        self.ns = f"dmmsoak-{os.getpid()}-b"
        self.ns_made = False
        self.pairs = []
        self.sidecars = {}  # (pair, side) -> Sidecar
        self.clients = []
        self.stop_clients = threading.Event()
        self.stop_sampler = threading.Event()
        self.t0 = None
        self.samples = []
        self.events = []
        self.failures = []  # what failed besides client errors and the RSS verdict
        self.notes = []
        self.stats = None
        self.t_traffic_end = None
        self.policy_version = 0
        self.baseline = {}
        self.final = {}
        self.elapsed = None
        self.interrupted = None
        self.sampler_thread = None

    def now(self):
        return time.time() - self.t0

    def fail(self, what):
        log(f"FAILED: {what}")
        self.failures.append(what)

    def nsexec(self, argv):
        return ["ip", "netns", "exec", self.ns] + argv

    # -------------------------------------------------------------- setup
    def dpdk_available(self):
        """Whether this dmm-sidecar has the dpdk stack kind: (ok, what validate said)."""
        d = os.path.join(self.run_dir, "dpdk-kind-check")
        os.makedirs(os.path.join(d, "policy.d"), exist_ok=True)
        conf = os.path.join(d, "sidecar.toml")
        with open(conf, "w") as f:
            f.write(sidecar_conf("dpdk", 1, d, self.args))
        r = subprocess.run([self.sidecar, "--mode", "validate", "-c", conf], capture_output=True,
                           text=True, timeout=30)
        return r.returncode == 0, (r.stdout + r.stderr).strip()

    def start_kernel_servers(self):
        self.procs.start("kernel-echo", [self.tool, "echo", "127.0.0.1", str(ECHO_PORT)])
        self.procs.start("kernel-iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p",
                                           str(IPERF_PORT)])
        wait_listening(["ss", "-Hltn"], [f"127.0.0.1:{ECHO_PORT}", f"127.0.0.1:{IPERF_PORT}"],
                       "kernel pair's servers")

    def start_dpdk_net(self):
        """Namespace B, the control veth ctla/ctlb with addresses, the DPDK link dpa/dpb without
        (IPv6 and TX checksum offload off on all four ends), the servers in B."""
        sh(["ip", "netns", "add", self.ns])
        self.ns_made = True
        sh(["ip", "link", "add", DPDK_CTL_DEVS[0], "type", "veth", "peer", "name",
            DPDK_CTL_DEVS[1], "netns", self.ns])
        sh(["ip", "link", "add", DPDK_DEVS[0], "type", "veth", "peer", "name", DPDK_DEVS[1],
            "netns", self.ns])
        sh(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        sh(self.nsexec(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={EPHEMERAL}"]))
        for side in (0, 1):
            pre = [] if side == 0 else ["ip", "netns", "exec", self.ns]
            for dev in (DPDK_CTL_DEVS[side], DPDK_DEVS[side]):
                sh(pre + ["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"])
                if dev in DPDK_DEVS:  # as the dpdk stack asks of a veth (stacks/dpdk/README.md)
                    subprocess.run(pre + ["ethtool", "-K", dev, "tx", "off"],
                                   capture_output=True, timeout=30)
                sh(pre + ["ip", "link", "set", dev, "up"])
            sh(pre + ["ip", "addr", "add", f"{DPDK_CTL[side]}/24", "dev", DPDK_CTL_DEVS[side]])
        self.procs.start("dpdk-echo", self.nsexec([self.tool, "echo", "0.0.0.0", str(ECHO_PORT)]))
        self.procs.start("dpdk-iperf3", self.nsexec(["iperf3", "-s", "-p", str(IPERF_PORT)]))
        wait_listening(self.nsexec(["ss", "-Hltn"]), [f"0.0.0.0:{ECHO_PORT}", f":{IPERF_PORT}"],
                       "dpdk pair's servers")
        log(f"dpdk: namespace {self.ns} (sidecar B, servers); control {DPDK_CTL[0]}-"
            f"{DPDK_CTL[1]}, dp0 on {self.args.dpdk_port} {DPDK_DATA[0]}-{DPDK_DATA[1]}")

    def start_pair(self, pair):
        for side in (1, 0):
            # B first, serving, before A starts: it serves A's first handshake (a memif client
            # started before its server would wait for it, reconnecting)
            sc = Sidecar(self, pair, side)
            with open(sc.conf, "w") as f:
                f.write(sidecar_conf(pair, side, sc.dir, self.args))
            sc.write_policy(self.policy_version)
            check = subprocess.run([self.sidecar, "--mode", "validate", "-c", sc.conf],
                                   capture_output=True, text=True, timeout=30)
            if check.returncode != 0:
                raise SystemExit(f"soak: sidecar config {sc.conf} invalid:\n{check.stdout}"
                                 f"{check.stderr}")
            self.sidecars[(pair, side)] = sc
            sc.start()
            if side == 1 and not sc.wait_ready(link=False):
                raise SystemExit(f"soak: sidecar {sc.name} did not come up: {sc.not_ready}\n"
                                 f"{read_tail(sc.logs[-1], 600)}")
        for side in (1, 0):
            sc = self.sidecars[(pair, side)]
            if not sc.wait_ready():
                raise SystemExit(f"soak: sidecar {sc.name} did not come up: {sc.not_ready}\n"
                                 f"{read_tail(sc.logs[-1], 600)}")
        log(f"{pair}: sidecars A (pid {self.sidecars[(pair, 0)].proc.pid}) and B (pid "
            f"{self.sidecars[(pair, 1)].proc.pid}) up")

    # -------------------------------------------------------------- sampling
    def sample(self):
        """RSS, fds and threads of every sidecar, its connection gauges and a few counters."""
        row = {"t": round(self.now(), 2), "sidecars": {}}
        for (pair, side), sc in self.sidecars.items():
            p = sc.proc
            entry = {"pid": p.pid if p else None}
            if p is not None and p.poll() is None:
                rss, fds, threads = proc_status(p.pid)
                entry.update(rss_kb=rss, fds=fds, threads=threads)
                m = sc.scrape()
                if m is not None:
                    entry.update(
                        active_outbound=metric_sum(m, "dmm_sidecar_active_connections",
                                                   role="outbound"),
                        active_inbound=metric_sum(m, "dmm_sidecar_active_connections",
                                                  role="inbound"),
                        policy_version=metric_sum(m, "dmm_sidecar_policy_version"),
                        fallbacks=metric_sum(m, "dmm_sidecar_fallbacks_total"),
                        connections=metric_sum(m, "dmm_sidecar_connections_total"),
                        rss_metric_kb=(metric_sum(m, "process_resident_memory_bytes") or 0) / 1024)
                    if pair == "dpdk":
                        entry["dpdk_connections"] = metric_sum(m, "dmm_sidecar_dpdk_connections",
                                                               stack="dp0")
            row["sidecars"][sc.name] = entry
        row["client_ops"] = {pair: self.stats.totals(pair) for pair in self.pairs}
        self.samples.append(row)

    def sampler(self):
        while not self.stop_sampler.is_set():
            t = time.time()
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a sample lost is reported, not fatal
                log(f"sample failed: {e!r}")
            self.stop_sampler.wait(max(0.1, self.args.sample_interval - (time.time() - t)))

    # -------------------------------------------------------------- events
    def reload_event(self, n):
        """Switches every sidecar's policy to the other version and reloads it: SIGHUP on A and
        ctl on B in odd reloads, the other way round in even ones. Each sidecar's policy
        version and successful reloads must then have grown by one."""
        self.policy_version = 1 - self.policy_version
        ev = {"t": round(self.now(), 2), "kind": "reload", "n": n,
              "policy": self.policy_version + 1, "sidecars": {}}
        log(f"event: policy reload #{n} (to version {self.policy_version + 1})")
        for (pair, side), sc in self.sidecars.items():
            before = sc.scrape() or []
            sc.write_policy(self.policy_version)
            how = "sighup" if (side == 0) == (n % 2 == 1) else "ctl"
            res = {"how": how, "ok": False}
            if how == "sighup":
                os.kill(sc.proc.pid, signal.SIGHUP)
            else:
                r = subprocess.run([self.sidecar, "ctl", "--socket", sc.admin, "policy",
                                    "reload"], capture_output=True, text=True, timeout=40)
                res["ctl_status"] = r.returncode
                res["ctl_output"] = (r.stdout + r.stderr).strip()[-300:]
            want_v = (metric_sum(before, "dmm_sidecar_policy_version") or 0) + 1
            want_ok = (metric_sum(before, "dmm_sidecar_policy_reloads_total",
                                  result="success") or 0) + 1
            deadline = time.time() + 10
            while time.time() < deadline:
                m = sc.scrape() or []
                v = metric_sum(m, "dmm_sidecar_policy_version")
                ok = metric_sum(m, "dmm_sidecar_policy_reloads_total", result="success")
                if v == want_v and ok == want_ok:
                    res["ok"] = True
                    res["version"] = v
                    break
                time.sleep(0.1)
            if not res["ok"] or res.get("ctl_status", 0) != 0:
                res["ok"] = False
                self.fail(f"reload #{n} of {sc.name} by {how}: policy version or successful "
                          f"reloads did not grow by one ({res.get('ctl_output', '')})")
            ev["sidecars"][sc.name] = res
        ev["t_end"] = round(self.now(), 2)
        self.events.append(ev)

    def restart_event(self, n):
        """Stops every sidecar B with SIGTERM (by PID), waits --restart-gap, starts each again
        with the same config and waits until it serves. Clients keep running meanwhile."""
        ev = {"t": round(self.now(), 2), "kind": "restart", "n": n, "sidecars": {}}
        log(f"event: peer restart #{n}")
        bs = [sc for (pair, side), sc in self.sidecars.items() if side == 1]
        for sc in bs:
            sc.restarting = True
        try:
            for sc in bs:  # all at once, then each waited for
                ev["sidecars"][sc.name] = {"stop": round(self.now(), 2), "old_pid": sc.proc.pid}
                sc.term()
            for sc in bs:
                res = ev["sidecars"][sc.name]
                rc, killed = sc.stop(grace=self.args.stop_grace)
                res.update(exited=round(self.now(), 2), status=rc, killed=killed)
                if killed or rc not in (0, -signal.SIGTERM):
                    how = (f"did not exit within {self.args.stop_grace:.0f} s of SIGTERM"
                           if killed else f"exited with status {rc}")
                    self.fail(f"restart #{n}: {sc.name} (pid {res['old_pid']}) {how}")
            time.sleep(self.args.restart_gap)
            for sc in bs:
                ev["sidecars"][sc.name]["start"] = round(self.now(), 2)
                sc.start()
            for sc in bs:
                res = ev["sidecars"][sc.name]
                res["new_pid"] = sc.proc.pid
                if sc.wait_ready():
                    res["ready"] = round(self.now(), 2)
                else:
                    res["ready"] = None
                    res["not_ready"] = sc.not_ready
                    self.fail(f"restart #{n}: {sc.name} did not come back: {sc.not_ready}")
        finally:
            for sc in bs:
                sc.restarting = False
        ev["t_end"] = round(self.now(), 2)
        self.events.append(ev)

    def check_alive(self):
        """A sidecar that died on its own is a failure; it is started again so the run goes on."""
        for sc in self.sidecars.values():
            if sc.restarting or sc.proc is None or sc.proc.poll() is None:
                continue
            rc = sc.proc.returncode
            t = round(self.now(), 2)
            self.fail(f"{sc.name} (pid {sc.proc.pid}) exited on its own with status {rc} at "
                      f"{t} s: {read_tail(sc.logs[-1], 300)}")
            shutil.rmtree(f"/var/run/dpdk/dmm-sidecar-{sc.proc.pid}", ignore_errors=True)
            ev = {"t": t, "kind": "died", "sidecars": {sc.name: {"old_pid": sc.proc.pid,
                                                                 "status": rc, "stop": t}}}
            sc.start()
            ready = sc.wait_ready()
            ev["sidecars"][sc.name].update(new_pid=sc.proc.pid,
                                           ready=round(self.now(), 2) if ready else None)
            ev["t_end"] = round(self.now(), 2)
            self.events.append(ev)

    # -------------------------------------------------------------- main
    def run(self):
        args = self.args
        if "kernel" in args.stacks:
            self.start_kernel_servers()
        if "dpdk" in args.stacks:
            self.start_dpdk_net()
        for pair in ("kernel", "dpdk"):
            if pair in args.stacks:
                self.start_pair(pair)
                self.pairs.append(pair)
        # the idle baseline: fds and RSS before any traffic
        time.sleep(1)
        for sc in self.sidecars.values():
            rss, fds, threads = proc_status(sc.proc.pid)
            self.baseline[sc.name] = {"rss_kb": rss, "fds": fds, "threads": threads}
        self.t0 = time.time()
        self.stats = Stats(self.t0)
        pattern = random.Random(1).randbytes(int(args.bulk_mib * 1048576))
        data2 = pattern + pattern
        for pair in self.pairs:
            ports = PAIR_PORTS[pair]
            c = Clients(pair, ("127.0.0.1", ports["fwd_echo"]), ports["fwd_iperf3"], self.stats,
                        self.stop_clients, args, data2)
            c.start()
            self.clients.append(c)
        self.sampler_thread = threading.Thread(target=self.sampler, daemon=True, name="sampler")
        self.sampler_thread.start()
        log(f"traffic on {', '.join(self.pairs)} for {fmt_duration(args.duration)}; events "
            f"every {args.event_period:.0f} s (reload, restart, ...)")
        next_event, n_event, n_reload, n_restart = args.event_period, 0, 0, 0
        last_log = 0
        while self.now() < args.duration:
            self.check_alive()
            if self.now() >= next_event:
                # no event in the last half period: the run ends on steady traffic
                if self.now() <= args.duration - args.event_period / 2:
                    n_event += 1
                    if n_event % 2:
                        n_reload += 1
                        self.reload_event(n_reload)
                    else:
                        n_restart += 1
                        self.restart_event(n_restart)
                while next_event <= self.now():  # an event that overran skips the missed ones
                    next_event += args.event_period
            if self.now() - last_log >= 60:
                last_log = self.now()
                self.progress()
            time.sleep(0.2)
        self.t_traffic_end = self.now()
        log("traffic ends; waiting for the client loops")
        self.stop_clients.set()
        stuck = [n for c in self.clients for n in c.join(BULK_TIMEOUT + 30)]
        if stuck:
            self.fail(f"client loops still running {BULK_TIMEOUT + 30:.0f} s after the end: "
                      f"{', '.join(stuck)}")
        self.check_alive()
        # quiet: no traffic; every relay must end (the pooled tunnels' idle_timeout is 15 s)
        log(f"quiet for {args.quiet:.0f} s: every relay must end")
        time.sleep(args.quiet)
        self.stop_sampler.set()
        self.sampler_thread.join(30)
        self.sample()
        for sc in self.sidecars.values():
            m = sc.scrape() or []
            rss, fds, threads = proc_status(sc.proc.pid)
            left = {r: metric_sum(m, "dmm_sidecar_active_connections", role=r)
                    for r in ("outbound", "inbound")}
            self.final[sc.name] = {"rss_kb": rss, "fds": fds, "threads": threads,
                                   "active_connections": left}
            if sc.pair == "dpdk":
                self.final[sc.name]["dpdk_connections"] = metric_sum(
                    m, "dmm_sidecar_dpdk_connections", stack="dp0")
            if any(v for v in left.values()):
                self.fail(f"{sc.name}: relays still open {args.quiet:.0f} s after the traffic "
                          f"stopped: {left}")
            if sc.side == 0:
                # circuit breakers still open (or probing) toward a B that has been up since
                # the last restart: for information (bench/README.md, "Soak")
                r = subprocess.run([self.sidecar, "ctl", "--socket", sc.admin, "breakers"],
                                   capture_output=True, text=True, timeout=40)
                self.final[sc.name]["breakers"] = (r.stdout + r.stderr).strip()
        # sidecars stop last (A first), their metrics scraped while they drain
        for side in (0, 1):
            for (pair, s), sc in self.sidecars.items():
                if s == side:
                    rc, killed = sc.stop(grace=self.args.stop_grace)
                    if killed or rc not in (0, -signal.SIGTERM):
                        self.fail(f"{sc.name} at the end: "
                                  f"{'SIGKILLed' if killed else 'exit status %s' % rc}")
        self.elapsed = self.now()

    def progress(self):
        ops = {p: sum(self.stats.totals(p).values()) for p in self.pairs}
        with self.stats.lock:
            errs = sum(sum(s["errors"].values()) for s in self.stats.ops.values())
        rss = []
        for sc in self.sidecars.values():
            if sc.running():
                r, _, _ = proc_status(sc.proc.pid)
                rss.append(f"{sc.name} {r / 1024:.1f}" if r else f"{sc.name} ?")
        log(f"{fmt_duration(self.now())}: ops {ops}, client errors {errs}; RSS MiB "
            f"{', '.join(rss)}")

    def cleanup(self):
        """Processes by PID, then namespace B (its veths go with it), EAL directories."""
        self.stop_clients.set()
        self.stop_sampler.set()
        if self.sampler_thread is not None:
            self.sampler_thread.join(10)
        try:
            self.procs.stop()
        finally:
            for _, p in self.procs.procs:
                shutil.rmtree(f"/var/run/dpdk/dmm-sidecar-{p.pid}", ignore_errors=True)
            if self.ns_made:
                r = subprocess.run(["ip", "netns", "del", self.ns], capture_output=True,
                                   text=True, timeout=30)
                if r.returncode != 0:
                    log(f"ip netns del {self.ns}: {r.stderr.strip()}")
                self.ns_made = False


def wait_listening(argv, wants, what, timeout=15):
    deadline = time.time() + timeout
    missing = wants
    while time.time() < deadline:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        missing = [w for w in wants if w + " " not in out]
        if not missing:
            return
        time.sleep(0.1)
    raise SystemExit(f"soak: {what} not listening after {timeout} s: {missing}")


def read_tail(path, n):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------- analysis

def fit(points):
    """Least-squares line through [(t, y)]: (slope, intercept)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0
    return slope, my - slope * mt


def judge(points, t_from, t_to, args):
    """The leak criterion (bench/README.md, "Soak"): warm-up = the first 10% of the span, at
    least --warmup-min s, at most half the span; a least-squares line through the RSS samples
    after it; flat when its growth over the judged span is below max(--max-growth-mib,
    --max-growth-pct % of the fitted RSS at the end of the warm-up)."""
    span = t_to - t_from
    warm = min(max(0.1 * span, args.warmup_min), span / 2)
    tw = t_from + warm
    judged = [(t, y) for t, y in points if tw <= t <= t_to]
    res = {"from": round(t_from, 1), "to": round(t_to, 1), "warmup_end": round(tw, 1),
           "samples": len(judged)}
    if len(judged) < 5:
        res["flat"] = None
        res["why"] = f"too short to judge ({len(judged)} samples after warm-up, need 5)"
        return res
    slope, icpt = fit(judged)  # KiB per s
    at_warm = icpt + slope * tw
    growth = slope * (judged[-1][0] - tw)
    limit = max(args.max_growth_mib * 1024, args.max_growth_pct / 100.0 * at_warm)
    res.update(rss_warmup_end_kb=round(at_warm), rss_end_kb=judged[-1][1],
               rss_first_kb=points[0][1] if points else None,
               rss_peak_kb=max(y for _, y in judged), slope_kb_per_min=round(slope * 60, 2),
               growth_kb=round(growth), limit_kb=round(limit), flat=growth < limit)
    return res


def rss_series(samples, name, t_end, key="rss_kb"):
    """[(pid, [(t, value)])] of a sidecar's RSS (or `key`), one list per incarnation, up to
    t_end."""
    out = []
    for row in samples:
        e = row["sidecars"].get(name, {})
        if e.get(key) is None or row["t"] > t_end:
            continue
        if not out or out[-1][0] != e["pid"]:
            out.append((e["pid"], []))
        out[-1][1].append((row["t"], e[key]))
    return out


def fd_trend(samples, name, pids, t_from, t_to):
    """Open fds of the judged span (for information, not part of the verdict): first, last,
    max and the fitted slope per minute."""
    pts = [p for pid, s in rss_series(samples, name, t_to, "fds") if pid in pids for p in s
           if p[0] >= t_from]
    if len(pts) < 2:
        return {}
    return {"fds_first": pts[0][1], "fds_last": pts[-1][1], "fds_max": max(y for _, y in pts),
            "fds_slope_per_min": round(fit(pts)[0] * 60, 2)}


def restart_windows(events, pair, args):
    """[(from, to)] around each restart (or death) of the pair's sidecar B: SIGTERM - 1 s to
    B ready + --restart-grace."""
    out = []
    for ev in events:
        if ev["kind"] not in ("restart", "died"):
            continue
        for name, res in ev["sidecars"].items():
            if name.startswith(pair + "-"):
                end = res.get("ready") or ev.get("t_end", res["stop"])
                out.append((res["stop"] - 1.0, end + args.restart_grace))
    return out


def analyse(soak, args):
    """Everything the report says, as one dict (soak.json)."""
    stats = soak.stats
    windows = {p: restart_windows(soak.events, p, args) for p in soak.pairs}
    unexpected = collections.Counter()
    for e in stats.errors:
        inside = any(e["t0"] <= b and e["t1"] >= a for a, b in windows[e["pair"]])
        # corrupted bytes are never expected, restart or not
        e["expected"] = inside and not e["error"].startswith("verify:")
        if not e["expected"]:
            unexpected[(e["pair"], e["kind"], e["error"])] += 1
    ops = {}
    for (pair, kind), s in sorted(stats.ops.items()):
        exp = sum(1 for e in stats.errors if e["pair"] == pair and e["kind"] == kind and
                  e["expected"])
        nerr = sum(s["errors"].values())
        ops[f"{pair}/{kind}"] = {"ops": s["ops"], "ok": s["ok"], "bytes": s["bytes"],
                                 "errors": nerr, "expected_errors": exp,
                                 "unexpected_errors": nerr - exp,
                                 "errors_by_kind": dict(s["errors"])}
    rss = {}
    t_end = soak.t_traffic_end
    for sc in soak.sidecars.values():
        series = rss_series(soak.samples, sc.name, t_end)
        if sc.side == 0 or not series:
            pts = [p for _, s in series for p in s]
            rss[sc.name] = {"judged": "whole run", "pids": [pid for pid, _ in series],
                            **judge(pts, 0.0, t_end, args)}
            pids = [pid for pid, _ in series]
        else:
            # B restarts: judged on its longest uninterrupted incarnation
            segs = [{"pid": pid, "from": s[0][0], "to": s[-1][0], "rss_end_kb": s[-1][1],
                     "rss_peak_kb": max(y for _, y in s)} for pid, s in series]
            pid, pts = max(series, key=lambda x: x[1][-1][0] - x[1][0][0])
            rss[sc.name] = {"judged": f"longest incarnation (pid {pid})", "segments": segs,
                            **judge(pts, pts[0][0], pts[-1][0], args)}
            pids = [pid]
        r = rss[sc.name]
        if r.get("flat") is not None:
            r.update(fd_trend(soak.samples, sc.name, pids, r["warmup_end"], r["to"]))
    judged = [r["flat"] for r in rss.values() if r["flat"] is not None]
    a_judged = [rss[n]["flat"] for n in rss if n.endswith("-A")]
    flat = bool(judged) and all(judged) and None not in a_judged
    counters = {sc.name: sc.counters() for sc in soak.sidecars.values()}
    n_unexp = sum(unexpected.values())
    return {
        "duration_s": round(t_end, 1), "elapsed_s": round(soak.elapsed, 1),
        "pairs": soak.pairs, "notes": soak.notes,
        "events": soak.events, "windows": windows,
        "ops": ops, "unexpected_errors": {"/".join(k): v for k, v in unexpected.items()},
        "errors": stats.errors, "errors_not_recorded": stats.dropped,
        "fallbacks": {n: c.get("dmm_sidecar_fallbacks_total", {}) for n, c in counters.items()
                      if n.endswith("-A")},
        "counters": counters, "rss": rss, "baseline": soak.baseline, "final": soak.final,
        "logs": {sc.name: log_summary(sc.logs) for sc in soak.sidecars.values()},
        "failures": soak.failures, "interrupted": soak.interrupted,
        "verdict": {"rss_flat": flat, "unexpected_client_errors": n_unexp,
                    "failures": len(soak.failures),
                    "pass": flat and n_unexp == 0 and not soak.failures and
                    not soak.interrupted},
        "samples": soak.samples,
    }


def log_summary(paths):
    """Lines per level over a sidecar's logs, and its most frequent warnings and errors (numbers
    masked so that repeats of one message count together)."""
    levels = collections.Counter()
    msgs = collections.Counter()
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    m = re.match(r"^\S+ (trace|debug|info|warning|error|critical) (.*)", line)
                    if not m:
                        continue
                    levels[m.group(1)] += 1
                    if m.group(1) in ("warning", "error", "critical"):
                        msgs[m.group(1) + ": " + re.sub(r"\d+", "N", m.group(2))[:160]] += 1
        except OSError:
            pass
    return {"levels": dict(levels), "top": msgs.most_common(8)}


# ---------------------------------------------------------------- report

def summary_lines(res, args):
    mib = lambda kb: f"{kb / 1024:.1f}"  # noqa: E731
    lines = [f"soak: {fmt_duration(res['duration_s'])} of traffic ({res['elapsed_s']:.0f} s in "
             f"all) on {', '.join(res['pairs'])}; workers = {args.workers}"]
    lines += ["  " + n for n in res["notes"]]
    reloads = [e for e in res["events"] if e["kind"] == "reload"]
    restarts = [e for e in res["events"] if e["kind"] == "restart"]
    died = [e for e in res["events"] if e["kind"] == "died"]
    gaps = [r["ready"] - r["stop"] for e in restarts for r in e["sidecars"].values()
            if r.get("ready")]
    back = sum(1 for e in restarts for r in e["sidecars"].values() if not r.get("ready"))
    out = (f"B out for {min(gaps):.1f}-{max(gaps):.1f} s, SIGTERM to ready" if gaps else "")
    out += (", " if gaps and back else "") + (f"{back} not back" if back else "")
    lines.append(f"events: {len(reloads)} policy reloads ("
                 f"{sum(all(r['ok'] for r in e['sidecars'].values()) for e in reloads)} ok on "
                 f"every sidecar), {len(restarts)} peer restarts ({out or 'none'}), "
                 f"{len(died)} sidecars died")
    lines.append("  at " + ", ".join(f"{e['t']:.0f} s {e['kind']}" for e in res["events"]))
    lines.append("")
    lines.append(f"{'client operations':<22} {'ops':>9} {'errors':>7} {'in restart':>10} "
                 f"{'unexpected':>10}  MiB moved  errors by kind")
    for key, o in res["ops"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(o["errors_by_kind"].items()))
        lines.append(f"  {key:<20} {o['ops']:>9} {o['errors']:>7} {o['expected_errors']:>10} "
                     f"{o['unexpected_errors']:>10}  {o['bytes'] / 1048576:>9.1f}  {kinds}")
    if res["unexpected_errors"]:
        lines.append("unexpected client errors (outside the restart windows, or corrupted "
                     "bytes):")
        lines += [f"  {k}: {v}" for k, v in sorted(res["unexpected_errors"].items())]
        for e in [e for e in res["errors"] if not e["expected"]][:10]:
            lines.append(f"    at {e['t0']:.1f}-{e['t1']:.1f} s {e['pair']}/{e['kind']} "
                         f"{e['error']} {e['detail']}")
    lines.append("")
    lines.append("sidecar A, fallbacks by reason (action):")
    for name, fb in res["fallbacks"].items():
        txt = ", ".join(f"{k.split(',')[0].split('=')[1]} {v:.0f} "
                        f"({k.split(',')[1].split('=')[1]})" for k, v in sorted(fb.items()))
        lines.append(f"  {name}: {txt or 'none'}")
    for name, c in res["counters"].items():
        conns = c.get("dmm_sidecar_connections_total", {})
        role = "outbound" if name.endswith("-A") else "inbound"
        txt = ", ".join(f"{k.split(',')[1].split('=')[1]}/{k.split(',')[2].split('=')[1]} "
                        f"{v:.0f}" for k, v in sorted(conns.items(), key=lambda x: -x[1])
                        if f"role={role}" in k)
        lines.append(f"{name} connections ended ({role}, stack/outcome): {txt or 'none'}")
        att = c.get("dmm_sidecar_stack_attempts_total", {})
        if att:
            lines.append(f"{name} stack attempts (stack/outcome): " + ", ".join(
                f"{k.split(',')[0].split('=')[1]}/{k.split(',')[1].split('=')[1]} {v:.0f}"
                for k, v in sorted(att.items(), key=lambda x: -x[1])))
        other = []
        for metric in ("dmm_sidecar_handshake_rejections_total",
                       "dmm_sidecar_accept_errors_total", "dmm_sidecar_breaker_transitions_total",
                       "dmm_sidecar_splice_disabled_total",
                       "dmm_sidecar_dpdk_tcp_retransmitted_segments_total",
                       "dmm_sidecar_dpdk_port_dropped_total", "dmm_sidecar_dpdk_port_errors_total",
                       "dmm_sidecar_dpdk_data_connections_total"):
            for k, v in sorted(c.get(metric, {}).items()):
                other.append(f"{metric.replace('dmm_sidecar_', '')}{{{k}}} {v:.0f}")
        if other:
            lines.append(f"{name} also: " + "; ".join(other))
    lines.append("")
    lines.append(f"RSS (MiB; warm-up = 10% of the span, >= {args.warmup_min:.0f} s, <= half; "
                 f"fitted growth after it < max({args.max_growth_mib:g} "
                 f"MiB, {args.max_growth_pct:g}% of RSS at warm-up end)):")
    for name, r in res["rss"].items():
        base = res["baseline"].get(name, {})
        fin = res["final"].get(name, {})
        head = f"  {name:<9} {r['judged']}: "
        if r["flat"] is None:
            lines.append(head + r.get("why", "not judged"))
            continue
        lines.append(head + f"idle start {mib(base.get('rss_kb') or 0)}, warm-up end "
                     f"{mib(r['rss_warmup_end_kb'])} (fitted, at {r['warmup_end']:.0f} s), end "
                     f"{mib(r['rss_end_kb'])}, peak {mib(r['rss_peak_kb'])}; slope "
                     f"{r['slope_kb_per_min']:+.1f} KiB/min, growth {r['growth_kb'] / 1024:+.2f} "
                     f"(limit {r['limit_kb'] / 1024:.1f}): {'flat' if r['flat'] else 'GROWING'}")
        if r.get("fds_first") is not None:
            lines.append(f"            fds after warm-up: {r['fds_first']} -> {r['fds_last']} "
                         f"(max {r['fds_max']}, slope {r['fds_slope_per_min']:+.2f}/min)")
        if r.get("segments"):
            lines.append("            incarnations (pid from-to s, RSS end/peak MiB): " + "; ".join(
                f"{s['pid']} {s['from']:.0f}-{s['to']:.0f} {mib(s['rss_end_kb'])}/"
                f"{mib(s['rss_peak_kb'])}" for s in r["segments"]))
        if fin:
            left = fin["active_connections"]
            txt = (f"            after {args.quiet:.0f} s quiet: RSS {mib(fin['rss_kb'] or 0)}, "
                   f"fds {fin['fds']} (idle start {base.get('fds')}), threads {fin['threads']}, "
                   f"relays open {left['outbound'] or 0:.0f} out, {left['inbound'] or 0:.0f} in")
            if fin.get("dpdk_connections") is not None:
                txt += f", dp0 connections {fin['dpdk_connections']:.0f}"
            lines.append(txt)
            if fin.get("breakers"):
                lines.append("            ctl breakers at the end: " +
                             " | ".join(fin["breakers"].splitlines()))
    lines.append("")
    for name, lg in res["logs"].items():
        lv = lg["levels"]
        if lg["top"]:
            lines.append(f"{name} log: " + ", ".join(f"{k} {v}" for k, v in sorted(lv.items())))
            lines += [f"    {n:>6} x {m}" for m, n in lg["top"]]
    if res["failures"]:
        lines.append("failures:")
        lines += ["  " + f for f in res["failures"]]
    v = res["verdict"]
    lines.append("")
    short = any(r["flat"] is None for n, r in res["rss"].items() if n.endswith("-A"))
    lines.append(f"RSS flat after warm-up: {'yes' if v['rss_flat'] else 'no'}"
                 + (" (sidecar A's run too short to judge)" if short else ""))
    lines.append(f"unexpected client errors: {v['unexpected_client_errors']}; other failures: "
                 f"{v['failures']}")
    if res["interrupted"]:
        lines.append(f"soak: INTERRUPTED ({res['interrupted']}) after "
                     f"{fmt_duration(res['duration_s'])} of traffic: a partial report")
    else:
        lines.append(f"soak: {'PASS' if v['pass'] else 'FAIL'}")
    return lines


def chart(res, path):
    """rss.png: RSS of A and B per pair over time, events as vertical lines, warm-up shaded."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (apt-get install python3-matplotlib): no chart")
        return None
    pairs = res["pairs"]
    fig, axes = plt.subplots(len(pairs), 1, figsize=(10, 3.6 * len(pairs)), squeeze=False)
    for ax, pair in zip(axes[:, 0], pairs):
        top = 1.0
        for side, color in (("A", "tab:green"), ("B", "tab:blue")):
            name = f"{pair}-{side}"
            first = True
            for pid, pts in rss_series(res["samples"], name, float("inf")):
                ax.plot([t / 60 for t, _ in pts], [y / 1024 for _, y in pts], color=color,
                        label=f"sidecar {side}" if first else None, linewidth=1.2)
                top = max([top] + [y / 1024 for _, y in pts])
                first = False
            r = res["rss"].get(name, {})
            if side == "A" and r.get("warmup_end") is not None:
                ax.axvspan(0, r["warmup_end"] / 60, color="0.9", label="A's warm-up")
        for ev in res["events"]:
            color = {"reload": "tab:orange", "restart": "tab:red"}.get(ev["kind"], "black")
            ax.axvline(ev["t"] / 60, color=color, linestyle="--" if ev["kind"] == "reload"
                       else "-", linewidth=0.8)
        ax.axvline(res["duration_s"] / 60, color="0.4", linestyle=":", linewidth=1)
        ax.plot([], [], color="tab:orange", linestyle="--", label="policy reload")
        ax.plot([], [], color="tab:red", label="peer restart (B)")
        ax.set_title(f"{pair} pair: RSS (traffic stops at the dotted line)", fontsize=10)
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS MiB")
        ax.set_ylim(0, top * 1.3)  # room for the legend above the curves
        ax.legend(fontsize=8, loc="upper center", ncol=5)
        ax.grid(alpha=0.3)
    verdict = "flat" if res["verdict"]["rss_flat"] else "NOT flat"
    fig.suptitle(f"dmm-sidecar soak, {fmt_duration(res['duration_s'])}: RSS {verdict} after "
                 "warm-up", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(soak, args):
    res = analyse(soak, args)
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("build",)}
    res["settings"]["build"] = args.build
    res["version"] = subprocess.run([soak.sidecar, "--version"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
    png = chart(res, os.path.join(args.out, "rss.png"))
    lines = summary_lines(res, args)
    lines.insert(1, f"  {res['version']}; results in {args.out}"
                 + (" (rss.png, soak.json)" if png else " (soak.json)"))
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return res["verdict"]["pass"]


# ---------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"),
                   help="the build directory: proxy/dmm-sidecar, bench/dmm-bench-tool")
    p.add_argument("--duration", type=parse_duration, default=3600.0,
                   help="traffic time: 1h (default), 10m, 90s, 1h30m")
    p.add_argument("--out", help="default /tmp/dmm-soak-<stamp>")
    p.add_argument("--stacks", help="comma-separated, of kernel,dpdk (default: every stack this "
                   "build and host have; rdma is never run here)")
    p.add_argument("--event-period", type=parse_duration, default=60.0,
                   help="time between injected events, reload and restart alternately (60s)")
    p.add_argument("--restart-gap", type=parse_duration, default=2.0,
                   help="how long B stays stopped in a peer restart (2s)")
    p.add_argument("--restart-grace", type=parse_duration, default=5.0,
                   help="client errors up to this long after B is back are expected (5s)")
    p.add_argument("--stop-grace", type=parse_duration, default=10.0,
                   help="SIGKILL (and a failure) when a sidecar has not exited this long after "
                   "SIGTERM (10s; its drain_timeout is 2s)")
    p.add_argument("--sample-interval", type=parse_duration, default=5.0)
    p.add_argument("--quiet", type=parse_duration, default=20.0,
                   help="time without traffic at the end before the last sample (20s: more "
                   "than the pooled tunnels' idle_timeout)")
    p.add_argument("--warmup-min", type=parse_duration, default=60.0,
                   help="the warm-up is 10%% of the span, at least this (60s), at most half")
    p.add_argument("--max-growth-mib", type=float, default=2.0)
    p.add_argument("--max-growth-pct", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="[sidecar] workers of every sidecar")
    p.add_argument("--no-sidecar-ttl", type=int, default=5,
                   help="[fallback] no_sidecar_ttl, seconds (5)")
    p.add_argument("--dpdk-port", choices=("af_packet", "memif"), default="af_packet",
                   help="the dp0 instances' DPDK port (af_packet on the veth dpa/dpb)")
    p.add_argument("--sidecar-log-level", default="warning")
    p.add_argument("--short-rate", type=float, default=20.0,
                   help="short connections per second per pair (20)")
    p.add_argument("--halfclose-rate", type=float, default=2.0)
    p.add_argument("--reset-rate", type=float, default=2.0)
    p.add_argument("--bulk-mib", type=float, default=4.0, help="size of each bulk echo (4)")
    p.add_argument("--bulk-pause", type=float, default=1.0,
                   help="seconds between bulk echoes per pair (1)")
    p.add_argument("--rr-interval", type=float, default=0.01,
                   help="pause between request/response transactions (0.01 s)")
    p.add_argument("--rr-conn-life", type=float, default=30.0,
                   help="seconds the renewed request/response connection lives (30)")
    p.add_argument("--iperf3-period", type=float, default=20.0,
                   help="seconds between iperf3 bursts (-t 3) per pair (20)")
    p.add_argument("--iperf3-rate", default="200M", help="iperf3 -b (200M)")
    p.add_argument("--no-iperf3", action="store_true")
    a = p.parse_args()
    a.build = os.path.abspath(a.build)
    if a.out is None:
        a.out = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                             "dmm-soak-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    a.out = os.path.abspath(a.out)
    a.stacks_given = a.stacks is not None
    a.stacks = (a.stacks or "kernel,dpdk").split(",")
    bad = set(a.stacks) - set(STACKS)
    if bad:
        p.error(f"unknown stacks: {','.join(sorted(bad))} (of {','.join(STACKS)})")
    if a.duration < 30 or a.event_period < 10:
        p.error("--duration at least 30s, --event-period at least 10s")
    a.memif_socket = os.path.join(a.out, "run", "memif.sock")
    return a


def main():
    args = parse_args()
    if os.environ.get("DMM_SOAK_IN_NETNS") != "1":
        if os.geteuid() != 0:
            sys.exit("bench/soak.py: run as root (it makes network namespaces)")
        for tool in ["iperf3", "unshare", "ss", "ip", "ethtool", "timeout"]:
            if shutil.which(tool) is None:
                sys.exit(f"bench/soak.py: {tool} is missing (tests/bootstrap.sh bench installs "
                         "everything)")
        for binary in ("bench/dmm-bench-tool", "proxy/dmm-sidecar"):
            if not os.access(os.path.join(args.build, binary), os.X_OK):
                sys.exit(f"bench/soak.py: {args.build}/{binary} is not built")
        env = dict(os.environ, DMM_SOAK_IN_NETNS="1")
        # A hard bound on the whole run; this namespace goes away with its last process.
        bound = int(args.duration + args.quiet + BULK_TIMEOUT + 300)
        os.execvpe("timeout", ["timeout", "-k", "15", str(bound), "unshare", "-n",
                               sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)
    sh(["ip", "link", "set", "lo", "up"])
    for k, v in (("net.ipv4.ip_local_port_range", EPHEMERAL), ("net.ipv4.tcp_tw_reuse", "1"),
                 ("net.core.somaxconn", "8192"), ("net.ipv4.tcp_max_syn_backlog", "8192")):
        sh(["sysctl", "-q", "-w", f"{k}={v}"])
    os.makedirs(args.out, exist_ok=True)
    soak = Soak(args)
    notes = soak.notes
    if "rdma" in args.stacks:
        args.stacks.remove("rdma")
    notes.append("rdma: not available on this host (RDMA runs only in the Soft-RoCE guest of "
                 "tests/rdma: bench/rdma/run.sh); not soaked")
    if "dpdk" in args.stacks:
        ok, said = soak.dpdk_available()
        if not ok:
            msg = (f"dpdk: {soak.sidecar} has no dpdk stack kind (built without DMM_WITH_DPDK?)"
                   f": {said[-300:]}")
            if args.stacks_given:
                sys.exit("bench/soak.py: " + msg)
            notes.append(msg + "; not soaked")
            args.stacks.remove("dpdk")
    if not args.stacks:
        sys.exit("bench/soak.py: no stack to soak")
    for n in notes:
        log(n)
    log(f"results -> {args.out} (stacks {','.join(args.stacks)}, duration "
        f"{fmt_duration(args.duration)})")
    def on_sigterm(*_):
        raise Interrupted("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        soak.run()
    except (KeyboardInterrupt, Interrupted) as e:
        soak.interrupted = str(e) if isinstance(e, Interrupted) else "Ctrl-C"
        log(f"interrupted ({soak.interrupted}): cleaning up")
    finally:
        # a second Ctrl-C must not leave namespace B behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        soak.cleanup()
    if soak.interrupted:
        if soak.stats is None:
            sys.exit(130)
        # what was collected until then, marked as interrupted (never a pass)
        soak.t_traffic_end = soak.t_traffic_end or soak.now()
        soak.elapsed = soak.now()
    ok = report(soak, args)
    sys.exit(130 if soak.interrupted else 0 if ok else 1)


if __name__ == "__main__":
    main()
