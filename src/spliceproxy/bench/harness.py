"""Measurements: interleaved rounds over every path, medians and ratios.

Every headline figure is a ratio between paths measured in the same run;
timing figures are medians of per-round ratios, so a neighbour's load that
slows one round slows every path of that round alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import resource
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.launch import proxy_argv, spawn_dockerd
from spliceproxy.bench.loadgen import check, load
from spliceproxy.bench.paths import SPIN, Paths, find_docker_proxy, find_spliceproxy

GIB = 1 << 30

# Exchanges per path before each latency round is measured.
RR_WARMUP = 200
UDP_WARMUP = 50


@dataclass
class Profile:
    name: str
    rounds: int
    lat_rounds: int  # rounds of the latency and connection-rate groups (rr, crr, udp)
    bulk_bytes: int
    streams: int
    stream_bytes: int
    rr_iters: int
    crr_count: int
    udp_iters: int
    burst_count: int
    scale_conns: int
    churn_count: int
    spawns: int
    ports_rounds: int  # rounds of the ports group's many-mapping figures
    ports_ranges: tuple  # mapping counts measured all alive at once (ports group)
    strace_bytes: int
    strace_conns: int
    strace_rounds: int
    loopback_groups: tuple


# crr_count x lat_rounds stays well below the ~28k ephemeral ports: docker-proxy,
# haproxy and socat each leave a TIME_WAIT socket per connection in the host
# namespace towards the one container port, and a larger count made the later
# paths fail to connect at all.  Many short rounds rather than a few long
# ones: each per-round ratio pairs measurements close in time, so a
# neighbour's burst of load hits both sides of it; 7 rounds of 256 MiB left
# 4-stream throughput (near 1x docker-proxy) conclusive in opposite
# directions in two runs.
PROFILES = {
    "quick": Profile("quick", rounds=13, lat_rounds=11, bulk_bytes=128 << 20, streams=4,
                     stream_bytes=32 << 20,
                     rr_iters=1000, crr_count=200, udp_iters=1000, burst_count=10000,
                     scale_conns=1000, churn_count=30000, spawns=8, ports_rounds=3,
                     ports_ranges=(100,), strace_bytes=64 << 20,
                     strace_conns=100, strace_rounds=3,
                     loopback_groups=("bulk", "rr", "crr", "udp")),
    "full": Profile("full", rounds=15, lat_rounds=15, bulk_bytes=512 << 20, streams=4,
                    stream_bytes=128 << 20,
                    rr_iters=5000, crr_count=400, udp_iters=3000, burst_count=50000,
                    scale_conns=10000, churn_count=100000, spawns=20, ports_rounds=3,
                    ports_ranges=(100, 1000), strace_bytes=256 << 20,
                    strace_conns=500, strace_rounds=3,
                    loopback_groups=("bulk", "rr", "crr", "udp")),
}

# metric -> (unit, better, description)
METRICS = {
    "bulk_1": ("Gbit/s", "higher", "one TCP stream"),
    "bulk_n": ("Gbit/s", "higher", "parallel TCP streams, aggregate"),
    "cpu_per_gb": ("s/GB", "lower", "proxy CPU seconds per GB relayed"),
    "cpu_per_gb_n": ("s/GB", "lower", "proxy CPU seconds per GB, parallel streams"),
    "syscalls_per_gib": ("calls", "lower", "proxy system calls per GiB relayed"),
    "rr_p50": ("us", "lower", "1-byte TCP ping-pong p50"),
    "rr_p99": ("us", "lower", "1-byte TCP ping-pong p99"),
    "rr_added_p50": ("us", "lower", "p50 latency added over native"),
    "rr_added_p99": ("us", "lower", "p99 latency added over native"),
    "rr_cpu_us": ("us", "lower", "proxy CPU per 1-byte TCP round trip"),
    "crr_rate": ("conn/s", "higher", "connect, 1-byte exchange, close"),
    "syscalls_per_conn": ("calls", "lower", "proxy system calls per connection"),
    "udp_rr_p50": ("us", "lower", "64-byte UDP ping-pong p50"),
    "udp_rr_p99": ("us", "lower", "64-byte UDP ping-pong p99"),
    "udp_added_p50": ("us", "lower", "UDP p50 latency added over native"),
    "udp_cpu_us": ("us", "lower", "proxy CPU per 64-byte UDP round trip"),
    "udp_pps": ("pkt/s", "higher", "64-byte datagrams echoed per second, 64 in flight"),
    "udp_loss_pct": ("%", "lower", "datagrams lost in the burst"),
    "scale_served_pct": ("%", "higher", "concurrent connections served"),
    "rss_per_conn_kib": ("KiB", "lower", "proxy RSS per idle connection"),
    "fds_per_conn": ("fds", "lower", "proxy fds per connection"),
    "threads": ("threads", "lower", "proxy threads with connections open"),
    "churn_rate": ("conn/s", "higher", "connect-exchange-close rate over the whole churn run"),
    "churn_hold": ("ratio", "higher", "churn rate of the last tenth over the first tenth"),
    "churn_done_pct": ("%", "higher", "churn connections completed"),
    "churn_time_wait": ("sockets", "lower", "TIME_WAIT sockets the churn left behind"),
    "spawn_ms": ("ms", "lower", "spawn to ready (status pipe)"),
    "idle_rss_mib": ("MiB", "lower", "idle RSS of one process"),
    "port_uss_kib": ("KiB", "lower", "private memory (USS) of one published port's process"),
    "port_spawn_ms": ("ms", "lower", "spawn to ready (status pipe), engine running"),
    "ports100_uss_mib": ("MiB", "lower", "USS of every proxy process, 100 mappings"),
    "ports1000_uss_mib": ("MiB", "lower", "USS of every proxy process, 1,000 mappings"),
    "ports100_spawn_ms": ("ms", "lower", "spawn to ready of 100 mappings back to back, summed"),
    "ports1000_spawn_ms": ("ms", "lower",
                           "spawn to ready of 1,000 mappings back to back, summed"),
    "strace_syscalls_per_gib": ("calls", "lower", "system calls per GiB (strace -c)"),
    "strace_syscalls_per_conn": ("calls", "lower", "system calls per connection (strace -c)"),
}
REFS = ("native", "iptables", "docker-proxy")
# The plain relay, reference of the same engine run with a setting changed
# (spliceproxy-spin): its ratios to it are in every result too.
PLAIN = "spliceproxy"
# Figures that do not drift with timing: counted, not timed, so one round is
# a measurement.  System calls per GiB are not among them: how much each
# splice moves depends on scheduling.
COUNTS = frozenset(("syscalls_per_conn", "udp_loss_pct", "scale_served_pct",
                    "rss_per_conn_kib", "fds_per_conn", "threads", "churn_done_pct",
                    "churn_time_wait", "idle_rss_mib", "strace_syscalls_per_conn",
                    "port_uss_kib", "ports100_uss_mib", "ports1000_uss_mib"))
MIN_TIMING_ROUNDS = 3
# Groups measured exchange by exchange over all paths at once, pinned to one CPU.
INTERLEAVED = ("rr", "crr", "udp")
BARE = "python-bare"
BARE_SRC = ("import os,socket\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\n"
            "os.write(3,b'0\\n')\nimport select\nselect.select([], [], [])\n")


def quartiles(vals: list) -> tuple[float, float, float]:
    """(q1, median, q3) with the inclusive method; one value is its own spread."""
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q1, q2, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Ratio:
    """A path's figure over a reference's, round by round.

    value is the median of the per-round ratios (each round measures both
    paths side by side), q1..q3 their interquartile range, of_medians the
    ratio of the two medians shown beside it.  The ratio is conclusive only
    when the whole IQR lies on one side of 1 and the ratio of medians agrees
    in direction: a table never shows a conclusive 0.68x next to medians of
    14.6 and 14.7.
    """

    value: float
    q1: float
    q3: float
    of_medians: float | None
    n: int
    count: bool = False  # a deterministic count: one round is a measurement, not a sample

    @property
    def conclusive(self) -> bool:
        if self.n < MIN_TIMING_ROUNDS and not self.count:
            return False  # a timing figure measured once has no known spread
        if self.q1 <= 1.0 <= self.q3:
            return False
        if self.of_medians is not None and (self.of_medians - 1.0) * (self.value - 1.0) <= 0:
            return False
        return True

    @property
    def direction(self) -> int:
        """+1 above 1, -1 below, 0 when inconclusive."""
        if not self.conclusive:
            return 0
        return 1 if self.value > 1.0 else -1

    def as_dict(self) -> dict:
        return {"value": self.value, "q1": self.q1, "q3": self.q3, "iqr": self.q3 - self.q1,
                "of_medians": self.of_medians, "rounds": self.n,
                "conclusive": self.conclusive}


@dataclass
class Results:
    profile: str
    # variant -> metric -> path -> [values], and the round each value came from
    variants: dict = field(default_factory=dict)
    round_of: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    paths: list = field(default_factory=list)
    started: float = 0.0
    elapsed: float = 0.0
    seed: int = 0
    orders: dict = field(default_factory=dict)  # "variant:group" -> [path order per round]
    method: dict = field(default_factory=dict)

    def add(self, variant: str, metric: str, path: str, value, rnd: int = 0) -> None:
        if value is None:
            return
        self.variants.setdefault(variant, {}).setdefault(metric, {}).setdefault(
            path, []).append(float(value))
        self.round_of.setdefault(variant, {}).setdefault(metric, {}).setdefault(
            path, []).append(rnd)

    def median(self, variant: str, metric: str, path: str):
        vals = self.variants.get(variant, {}).get(metric, {}).get(path)
        return statistics.median(vals) if vals else None

    def ratio_stats(self, variant: str, metric: str, path: str, ref: str) -> Ratio | None:
        """Per-round ratios path/ref, paired by round (rounds measured side by side)."""
        m = self.variants.get(variant, {}).get(metric, {})
        a, b = m.get(path), m.get(ref)
        if not a or not b or path == ref:
            return None
        if "added" in metric and ref != "docker-proxy":
            return None  # added latency over native/iptables is ~0: no meaningful ratio
        ro = self.round_of.get(variant, {}).get(metric, {})
        ra = dict(zip(ro.get(path, range(len(a))), a))
        rb = dict(zip(ro.get(ref, range(len(b))), b))
        pairs = [ra[r] / rb[r] for r in sorted(ra) if r in rb and rb[r]]
        mb = statistics.median(b)
        of_medians = statistics.median(a) / mb if mb else None
        if not pairs:
            if of_medians is None:
                return None
            pairs = [of_medians]
        q1, q2, q3 = quartiles(pairs)
        return Ratio(q2, q1, q3, of_medians, len(pairs), metric in COUNTS)

    def ratio(self, variant: str, metric: str, path: str, ref: str):
        """Median of per-round ratios path/ref."""
        r = self.ratio_stats(variant, metric, path, ref)
        return r.value if r is not None else None

    def to_dict(self) -> dict:
        out = {"profile": self.profile, "paths": self.paths, "skipped": self.skipped,
               "notes": self.notes, "elapsed_s": round(self.elapsed, 1), "seed": self.seed,
               "orders": self.orders, "method": self.method, "metrics": {}}
        for variant, metrics in self.variants.items():
            for metric, per_path in metrics.items():
                for path, vals in per_path.items():
                    stats = {ref: self.ratio_stats(variant, metric, path, ref)
                             for ref in REFS + (BARE, PLAIN)}
                    stats = {k: v for k, v in stats.items() if v is not None}
                    q1, _q2, q3 = quartiles(vals)
                    out["metrics"].setdefault(variant, {}).setdefault(metric, {})[path] = {
                        "median": statistics.median(vals), "q1": q1, "q3": q3,
                        "rounds": vals,
                        "round_index": self.round_of.get(variant, {}).get(metric, {}).get(
                            path, []),
                        "unit": METRICS[metric][0], "better": METRICS[metric][1],
                        "ratios": {k: v.value for k, v in stats.items()},
                        "ratio_spread": {k: v.as_dict() for k, v in stats.items()}}
        return out


@dataclass(frozen=True)
class Group:
    """One row of the group table: how a group of metrics is measured.

    run(harness, group, variant) measures it; phase orders the groups (0 the
    throughput and latency groups, then groups that can hurt later ones: scale
    can end a proxy that runs out of descriptors, churn fills TIME_WAIT);
    variants are those it applies to; quick_loopback_only: on loopback only
    when the profile lists it in loopback_groups.  A new group (e.g. the host
    engine's per-port cost) is one entry here and one run function.
    """

    run: object
    phase: int = 0
    variants: tuple = ("external", "loopback")
    quick_loopback_only: bool = True


def _rounds(h, group, variant):
    h.run_group(group, variant)


GROUPS = {
    "bulk": Group(_rounds),
    "bulkn": Group(_rounds),
    "rr": Group(_rounds),
    "crr": Group(_rounds),
    "udp": Group(_rounds),
    "strace": Group(lambda h, g, v: h.run_strace(v)),
    "scale": Group(lambda h, g, v: h.run_scale(v), phase=1, quick_loopback_only=False),
    "spawn": Group(lambda h, g, v: h.run_spawn(), phase=2, variants=("process",)),
    "churn": Group(lambda h, g, v: h.run_churn(v), phase=3, variants=("external",)),
    "ports": Group(lambda h, g, v: h.run_ports(), phase=2, variants=("process",)),
}
# The ports group's paths besides docker-proxy: `spliceproxy` is engine mode
# (SPLICEPROXY_ENGINE=1, the installed command is the stub that hands the
# port to the engine), and the same command standalone (SPLICEPROXY_ENGINE=0,
# one relay process per port).
PORTS_STANDALONE = "spliceproxy-standalone"


def raise_nofile() -> int:
    """Raise the fd limit as far as allowed (dockerd runs with LimitNOFILE=infinity)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1 << 20, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
        except (ValueError, OSError):
            continue
    return soft


def _pct(vals: list, q: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))]


class Harness:
    """Owns the topology, the backend servers and the proxies for one run."""

    def __init__(self, profile: str = "quick", *, spliceproxy=None, docker_proxy=None,
                 peers: bool = True, proxy_env=None, only=None, variants=None,
                 netns: bool | None = None, progress=None, seed: int | None = None,
                 subnet: str = topo_mod.SUBNET, netns_prefix: str = topo_mod.PREFIX,
                 spin: str = SPIN):
        self.spin = spin
        # A copy: callers tune rounds on it without changing the table.
        self.p = dataclasses.replace(PROFILES[profile])
        self.progress = progress or (lambda msg: None)
        self.root = os.geteuid() == 0 if netns is None else netns
        self.ffi, self.lib = load()
        self.res = Results(profile)
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
        self.rng = random.Random(self.seed)
        self.res.seed = self.seed
        topo_mod.plan(subnet)  # ConfigError now, before anything starts
        topo_mod.check_prefix(netns_prefix)
        self.subnet, self.netns_prefix = subnet, netns_prefix
        self.dead: set = set()  # paths whose process died (scale test): not measured further
        self.topo = None
        self.ports_engine_dir: str | None = None  # the ports group's engine, once started
        self.sp_exe = find_spliceproxy(spliceproxy)
        self.dp_exe = find_docker_proxy(docker_proxy)
        self.peers, self.proxy_env, self.only = peers, proxy_env, only
        want = variants or ("external", "loopback")
        if not self.root and "external" in want:
            self.res.notes.append("not root: no network namespaces, so no external client, "
                                  "no iptables DNAT path; loopback paths only")
            want = tuple(v for v in want if v != "external")
        self.wanted_variants = want

    # -- setup ---------------------------------------------------------------
    def __enter__(self) -> Harness:
        raise_nofile()
        try:
            if self.root:
                self.progress("building namespaces")
                self.topo = topo_mod.Topology(subnet=self.subnet,
                                              prefix=self.netns_prefix).setup()
            self.paths = Paths(self.topo, spliceproxy=self.sp_exe, docker_proxy=self.dp_exe,
                               peers=self.peers, proxy_env=self.proxy_env, only=self.only,
                               spin=self.spin)
            self.paths.start(self.progress)
        except BaseException:
            self.__exit__()
            raise
        self.res.paths = list(self.paths.runtimes)
        self.res.skipped = dict(self.paths.skipped)
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "paths", None) is not None:
            self.paths.stop()
        if self.topo is not None:
            self.topo.teardown()
            self.topo = None

    # -- helpers -------------------------------------------------------------
    def _where(self, rt, variant):
        ep = rt.external if variant == "external" else rt.loopback
        ns = self.paths.client_ns if variant == "external" else self.paths.host_ns
        return ep, ns

    def _paths_for(self, variant: str, need: str):
        for name, rt in self.paths.runtimes.items():
            ep, _ns = self._where(rt, variant)
            if ep is not None and getattr(ep, need) is not None:
                yield name, rt

    def _connect(self, addr, ns, proto=socket.SOCK_STREAM) -> socket.socket:
        with topo_mod.in_netns(ns):
            s = socket.socket(socket.AF_INET, proto)
        if proto == socket.SOCK_STREAM:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(30)
        s.connect(addr)
        s.settimeout(None)
        return s

    def _stats(self, rt, role):
        path = rt.stats_files.get(role)
        if not path:
            return None
        from spliceproxy.stats import read_stats_file

        # The engine writes its counters at most every 100 ms and within that
        # interval after the last change: wait one interval (with a margin)
        # so the reading includes everything done before this call.
        time.sleep(0.15)
        try:
            return read_stats_file(path)
        except (OSError, ValueError):
            return None

    # -- metric groups (one round, one path) ---------------------------------
    def bulk_once(self, rt, variant: str, streams: int, nbytes: int) -> dict:
        ep, ns = self._where(rt, variant)
        socks = [self._connect(ep.sink, ns) for _ in range(streams)]
        pid = rt.pid("sink")
        cpu0 = procs.cpu_seconds(pid, rt.tree) if pid else None
        st0 = self._stats(rt, "sink")
        errs = []

        def one(s):
            rc = self.lib.lg_bulk_send(s.fileno(), nbytes, 1 << 17)
            if rc < 0:
                errs.append(rc)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        for s in socks:
            s.close()
        if errs:
            raise OSError(-errs[0], "bulk transfer via %s: %s" % (rt.name,
                                                                   os.strerror(-errs[0])))
        total = nbytes * streams
        out = {"gbps": total * 8 / dt / 1e9}
        if pid:
            time.sleep(0.02)
            out["cpu_per_gb"] = (procs.cpu_seconds(pid, rt.tree) - cpu0) / (total / 1e9)
        st1 = self._stats(rt, "sink")
        if st0 and st1:
            out["syscalls_per_gib"] = (st1["syscalls"] - st0["syscalls"]) / (total / GIB)
        return out

    def rr_once(self, rt, variant: str, iters: int | None = None) -> dict:
        ep, ns = self._where(rt, variant)
        s = self._connect(ep.echo, ns)
        n = iters or self.p.rr_iters
        lat = self.ffi.new("double[]", n)
        try:
            check(self.lib.lg_rr(s.fileno(), 200, 1, lat), "rr warmup")
            check(self.lib.lg_rr(s.fileno(), n, 1, lat), "rr via " + rt.name)
        finally:
            s.close()
        vals = [lat[i] / 1e3 for i in range(n)]
        return {"p50": _pct(vals, 0.5), "p99": _pct(vals, 0.99)}

    def crr_once(self, rt, variant: str, count: int | None = None) -> dict:
        ep, ns = self._where(rt, variant)
        n = count or self.p.crr_count
        lat = self.ffi.new("double[]", n)
        st0 = self._stats(rt, "echo")
        t0 = time.perf_counter()
        with topo_mod.in_netns(ns):
            done = check(self.lib.lg_connect_rate(socket.AF_INET, ep.echo[0].encode(),
                                                  ep.echo[1], n, lat), "crr via " + rt.name)
        dt = time.perf_counter() - t0
        out = {"rate": done / dt}
        time.sleep(0.05)  # let the proxy finish closing the last pairs
        st1 = self._stats(rt, "echo")
        if st0 and st1 and done:
            out["syscalls_per_conn"] = (st1["syscalls"] - st0["syscalls"]) / done
        return out

    def udp_once(self, rt, variant: str) -> dict:
        ep, ns = self._where(rt, variant)
        s = self._connect(ep.udp, ns, socket.SOCK_DGRAM)
        n = self.p.udp_iters
        lat = self.ffi.new("double[]", n)
        el = self.ffi.new("double *")
        try:
            self.lib.lg_udp_rr(s.fileno(), 50, 64, 200, lat)
            got = check(self.lib.lg_udp_rr(s.fileno(), n, 64, 200, lat), "udp rr")
            vals = [lat[i] / 1e3 for i in range(n) if lat[i] >= 0]
            burst = self.p.burst_count
            rep = check(self.lib.lg_udp_burst(s.fileno(), burst, 64, 64, 200, el), "udp burst")
        finally:
            s.close()
        out = {"pps": rep / el[0] if el[0] else 0.0, "loss": 100.0 * (burst - rep) / burst}
        if vals and got:
            out.update(p50=_pct(vals, 0.5), p99=_pct(vals, 0.99))
        return out

    # -- runs ----------------------------------------------------------------
    def _order(self, variant: str, group: str, paths: list) -> list:
        """This round's path order: shuffled with the run's seeded generator, recorded."""
        order = list(paths)
        self.rng.shuffle(order)
        self.res.orders.setdefault("%s:%s" % (variant, group), []).append(
            [name for name, _rt in order])
        return order

    def run_group(self, group: str, variant: str) -> None:
        need = {"udp": "udp", "bulk": "sink", "bulkn": "sink"}.get(group, "echo")
        paths = list(self._paths_for(variant, need))
        if group == "udp" and "native" not in dict(paths):
            return
        if not paths:
            return
        rounds = self.p.lat_rounds if group in INTERLEAVED else self.p.rounds
        for r in range(rounds):
            order = self._order(variant, group, paths)
            if group in INTERLEAVED:
                self.progress("%s %s round %d/%d: %s, exchange by exchange"
                              % (variant, group, r + 1, rounds, " ".join(n for n, _ in order)))
                try:
                    with self._pinned(order, "udp" if group == "udp" else "echo"):
                        getattr(self, "_%s_round" % group)(variant, order, r)
                except OSError as exc:
                    self.res.notes.append("%s %s round %d failed: %s" % (variant, group, r + 1,
                                                                         exc))
                if group == "udp":
                    for name, rt in order:
                        self._burst(variant, name, rt, r)
                continue
            for name, rt in order:
                self.progress("%s %s round %d/%d: %s" % (variant, group, r + 1, rounds, name))
                try:
                    self._one(group, variant, name, rt, r)
                except OSError as exc:
                    self.res.notes.append("%s %s via %s failed: %s" % (variant, group, name, exc))

    # Latency and connection rate: one CPU for the client thread, the
    # container's servers and the proxies, so no hop waits for an idle vCPU
    # to wake (tens of microseconds on this kind of VM, halt-polling off).
    def _pin_cpu(self) -> int:
        return max(os.sched_getaffinity(0))

    @contextlib.contextmanager
    def _pinned(self, order, role: str):
        cpu = self._pin_cpu()
        saved = {}

        def pin(pid):
            for tid in procs.tasks(pid):
                try:
                    saved.setdefault(tid, os.sched_getaffinity(tid))
                    os.sched_setaffinity(tid, {cpu})
                except OSError:
                    pass  # a thread that just exited

        me = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})  # this thread only
        try:
            for proc in self.paths.server_procs:
                pin(proc.pid)
            for _name, rt in order:
                pid = rt.pid(role)
                if pid:
                    pin(pid)  # socat's per-connection children inherit it
            yield cpu
        finally:
            os.sched_setaffinity(0, me)
            for tid, mask in saved.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, mask)

    def _multi_socks(self, variant, order, attr, proto=socket.SOCK_STREAM):
        socks = []
        try:
            for _name, rt in order:
                ep, ns = self._where(rt, variant)
                socks.append(self._connect(getattr(ep, attr), ns, proto))
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    def _cpu(self, order, role: str) -> dict:
        """CPU seconds now of each path's proxy process serving role."""
        out = {}
        for name, rt in order:
            pid = rt.pid(role)
            if pid:
                with contextlib.suppress(OSError):
                    out[name] = procs.cpu_seconds(pid, rt.tree)
        return out

    def _add_cpu(self, variant, metric, order, role, cpu0, exchanges, r) -> None:
        """Proxy CPU per round trip (us) over the round: what a busy-poll costs shows
        here, since its polls between one exchange and the next are counted too."""
        cpu1 = self._cpu(order, role)
        for name, c0 in cpu0.items():
            if name in cpu1:
                self.res.add(variant, metric, name, (cpu1[name] - c0) * 1e6 / exchanges, r)

    def _rr_round(self, variant, order, r) -> None:
        self._exchange_round(variant, order, r, "echo", socket.SOCK_STREAM, RR_WARMUP,
                             self.p.rr_iters,
                             lambda fds, k, n, lat: self.lib.lg_rr_multi(fds, k, n, 1, lat),
                             {"p50": "rr_p50", "p99": "rr_p99", "added_p50": "rr_added_p50",
                              "added_p99": "rr_added_p99", "cpu": "rr_cpu_us"})

    def _udp_round(self, variant, order, r) -> None:
        self._exchange_round(variant, order, r, "udp", socket.SOCK_DGRAM, UDP_WARMUP,
                             self.p.udp_iters,
                             lambda fds, k, n, lat: self.lib.lg_udp_rr_multi(fds, k, n, 64, 200,
                                                                             lat),
                             {"p50": "udp_rr_p50", "p99": "udp_rr_p99",
                              "added_p50": "udp_added_p50", "cpu": "udp_cpu_us"})

    def _exchange_round(self, variant, order, r, role, proto, warmup, n, call, names) -> None:
        """One request/response round over every path, exchange by exchange.

        Warm-up, the proxies' CPU reading, the measured exchanges, then each
        path's percentiles and what it adds over native.  call(fds, k, n, lat)
        is the load generator's loop (TCP or UDP; a lost UDP reply records a
        negative latency and is left out); names maps p50, p99, added_p50,
        added_p99 and cpu to this group's metrics (a missing one is not
        recorded).
        """
        k = len(order)
        socks = self._multi_socks(variant, order, role, proto)
        fds = self.ffi.new("int[]", [s.fileno() for s in socks])
        # The warm-up writes its latencies into the same buffer: room for both.
        lat = self.ffi.new("double[]", max(n, warmup) * k)
        what = names["p50"].rsplit("_", 1)[0]
        try:
            check(call(fds, k, warmup, lat), what + " warmup")
            cpu0 = self._cpu(order, role)
            check(call(fds, k, n, lat), what)
            self._add_cpu(variant, names["cpu"], order, role, cpu0, n, r)
        finally:
            for s in socks:
                s.close()
        got = {}
        for j, (name, _rt) in enumerate(order):
            vals = [lat[j * n + i] / 1e3 for i in range(n) if lat[j * n + i] >= 0]
            if vals:
                got[name] = (_pct(vals, 0.5), _pct(vals, 0.99))
        nat = got.get("native")
        for name, (p50, p99) in got.items():
            self.res.add(variant, names["p50"], name, p50, r)
            self.res.add(variant, names["p99"], name, p99, r)
            if nat and name != "native":
                for q, mine, ref in (("added_p50", p50, nat[0]), ("added_p99", p99, nat[1])):
                    if q in names:
                        self.res.add(variant, names[q], name, max(0.0, mine - ref), r)

    def _crr_round(self, variant, order, r) -> None:
        n, k = self.p.crr_count, len(order)
        ns = self._where(order[0][1], variant)[1]
        eps = [self._where(rt, variant)[0].echo for _name, rt in order]
        ips = [self.ffi.new("char[]", ep[0].encode()) for ep in eps]
        ipv = self.ffi.new("const char *[]", ips)
        ports = self.ffi.new("int[]", [ep[1] for ep in eps])
        lat = self.ffi.new("double[]", n * k)
        st0 = {name: self._stats(rt, "echo") for name, rt in order}
        with topo_mod.in_netns(ns):
            done = check(self.lib.lg_connect_rate_multi(socket.AF_INET, ipv, ports, k, n,
                                                        self.rng.randrange(1, 1 << 32), lat),
                         "crr")
        if done < n:
            raise OSError("crr stopped after %d of %d connections per path" % (done, n))
        time.sleep(0.05)  # let the proxies finish closing the last pairs
        for j, (name, rt) in enumerate(order):
            total = sum(lat[j * n + i] for i in range(n)) / 1e9
            self.res.add(variant, "crr_rate", name, n / total if total else None, r)
            st1 = self._stats(rt, "echo")
            if st0[name] and st1:
                self.res.add(variant, "syscalls_per_conn", name,
                             (st1["syscalls"] - st0[name]["syscalls"]) / n, r)

    def _burst(self, variant, name, rt, r) -> None:
        ep, ns = self._where(rt, variant)
        el = self.ffi.new("double *")
        burst = self.p.burst_count
        try:
            s = self._connect(ep.udp, ns, socket.SOCK_DGRAM)
            try:
                rep = check(self.lib.lg_udp_burst(s.fileno(), burst, 64, 64, 200, el),
                            "udp burst")
            finally:
                s.close()
        except OSError as exc:
            self.res.notes.append("%s udp burst via %s failed: %s" % (variant, name, exc))
            return
        self.res.add(variant, "udp_pps", name, rep / el[0] if el[0] else 0.0, r)
        self.res.add(variant, "udp_loss_pct", name, 100.0 * (burst - rep) / burst, r)

    def _one(self, group, variant, name, rt, r) -> None:
        add = self.res.add
        if group == "bulk":
            o = self.bulk_once(rt, variant, 1, self.p.bulk_bytes)
            add(variant, "bulk_1", name, o["gbps"], r)
            add(variant, "cpu_per_gb", name, o.get("cpu_per_gb"), r)
            add(variant, "syscalls_per_gib", name, o.get("syscalls_per_gib"), r)
        elif group == "bulkn":
            o = self.bulk_once(rt, variant, self.p.streams, self.p.stream_bytes)
            add(variant, "bulk_n", name, o["gbps"], r)
            add(variant, "cpu_per_gb_n", name, o.get("cpu_per_gb"), r)

    def run_scale(self, variant: str) -> None:
        # A proxy needs at least two fds per connection; the hard fd limit of
        # the machine caps how many one process can hold.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        n = min(self.p.scale_conns, (limit - 256) // 2)
        if n < self.p.scale_conns:
            self.res.notes.append("scale: %d connections (hard fd limit %d)" % (n, limit))
        for name, rt in self._paths_for(variant, "echo"):
            pid = rt.pid("echo")
            if pid is None or rt.tree or name in self.dead:
                continue
            m = min(n, self.paths.haproxy_maxconn - 50) if name == "haproxy" else n
            self.progress("%s scale: %d connections via %s" % (variant, m, name))
            ep, ns = self._where(rt, variant)
            rss0, fd0 = procs.rss_bytes(pid), procs.fd_count(pid)
            fds = self.ffi.new("int[]", m)
            with topo_mod.in_netns(ns):
                got = self.lib.lg_open_many(socket.AF_INET, ep.echo[0].encode(), ep.echo[1],
                                            m, fds)
            try:
                if got < 0:
                    self.res.notes.append("scale via %s: %s" % (name, os.strerror(-got)))
                    continue
                time.sleep(0.2)
                self.res.add(variant, "scale_served_pct", name, 100.0 * got / m)
                if not procs.alive(pid):
                    # docker-proxy needs about six descriptors per connection
                    # and exits on EMFILE (moby #6402).
                    self.res.notes.append(
                        "scale: %s exited after serving %d of %d connections (descriptor limit?);"
                        " it is not measured further" % (name, got, m))
                    self.dead.add(name)
                    continue
                rss1, fd1 = procs.rss_bytes(pid), procs.fd_count(pid)
                self.res.add(variant, "rss_per_conn_kib", name, (rss1 - rss0) / 1024 / m)
                self.res.add(variant, "fds_per_conn", name, (fd1 - fd0) / m)
                self.res.add(variant, "threads", name, procs.thread_count(pid))
            finally:
                if got >= 0:  # on -errno the generator already closed them
                    self.lib.lg_close_many(fds, m)
            time.sleep(0.3)

    def run_spawn(self) -> None:
        """Spawn-to-ready and idle RSS of a fresh proxy, against a bare interpreter."""
        cands = []
        if self.sp_exe and "spliceproxy" in self.paths.runtimes:
            cands.append(("spliceproxy", self.sp_exe))
        if self.dp_exe and "docker-proxy" in self.paths.runtimes:
            cands.append(("docker-proxy", self.dp_exe))
        if not cands:
            return
        cands.append((BARE, None))
        port = 9000
        for i in range(self.p.spawns):
            order = list(cands)
            self.rng.shuffle(order)
            self.res.orders.setdefault("process:spawn", []).append([n for n, _e in order])
            for name, exe in order:
                self.progress("spawn %d/%d: %s" % (i + 1, self.p.spawns, name))
                port += 1
                if exe is None:
                    argv = [sys.executable, "-I", "-S", "-c", BARE_SRC]
                else:
                    argv = self.paths._argv(exe, port)
                lp = self._spawn_measured(argv)
                try:
                    time.sleep(0.05)
                    self.res.add("process", "spawn_ms", name, lp.ready_s * 1e3, i)
                    self.res.add("process", "idle_rss_mib", name,
                                 procs.rss_bytes(lp.pid) / 2**20, i)
                finally:
                    lp.stop()

    def run_ports(self) -> None:
        """The host engine's cost per published port, against docker-proxy (issue 12).

        Every proxy is started as dockerd starts it, by the one spawner
        (spawn_dockerd: clone with CLONE_VM | CLONE_VFORK, status pipe on fd
        3, stdio on /dev/null), on 127.0.0.1 with the TCP backend; nothing is
        relayed.  spliceproxy runs in engine mode with an engine of its own
        (private socket, never idle-exits during the group, stopped at the
        end) that is already running, as on a host with published ports;
        spliceproxy-standalone is the same command with SPLICEPROXY_ENGINE=0:
        - port_spawn_ms, port_uss_kib: one start after the other, the paths
          shuffled per round; the USS of the stub (private memory, what a
          port adds) against docker-proxy's process;
        - portsN_uss_mib: N mappings alive at once, every proxy process
          (stubs and the engine) summed, against N docker-proxy processes,
          the two alternated per round;
        - portsN_spawn_ms: the spawn-to-ready times of those N starts, one
          right after the other as dockerd starts a port range, summed.
        """
        import shutil
        import tempfile

        from spliceproxy import engine_status

        if not self.sp_exe or not self.dp_exe:
            self.res.notes.append("ports group: needs spliceproxy and docker-proxy")
            return
        sockdir = tempfile.mkdtemp(prefix="spliceproxy-bench-engine-")
        self.ports_engine_dir = sockdir  # its engine's command line names it
        sock = os.path.join(sockdir, "engine.sock")
        base = dict(self.paths.proxy_env if self.paths.proxy_env is not None else os.environ)
        env = dict(base, SPLICEPROXY_ENGINE="1", SPLICEPROXY_ENGINE_SOCKET=sock,
                   SPLICEPROXY_ENGINE_IDLE_EXIT="never")
        kinds = {"spliceproxy": (self.sp_exe, env),
                 PORTS_STANDALONE: (self.sp_exe, dict(base, SPLICEPROXY_ENGINE="0")),
                 "docker-proxy": (self.dp_exe, base)}
        alive: list = []

        def start(name):
            # A port the kernel says is free now (the host namespace may be
            # the machine's own, with other listeners).
            with topo_mod.in_netns(self.paths.host_ns):
                probe = socket.socket()
            with probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            exe, e = kinds[name]
            argv = proxy_argv(exe, "tcp", "127.0.0.1", port, self.paths.backend_ip,
                              self.paths.echo_port)
            lp = self._spawn_measured(argv, env=e)
            alive.append(lp)
            return lp

        def stop_all():
            for lp in alive:
                with contextlib.suppress(ProcessLookupError):
                    lp.proc.send_signal(2)
            for lp in alive:
                with contextlib.suppress(Exception):
                    lp.stop()
            alive.clear()

        engine_pid = None
        try:
            warm = start("spliceproxy")  # starts the engine; not measured
            engine_pid = engine_status.query(sock)["engine"]["pid"]
            for i in range(self.p.spawns):
                order = list(kinds)
                self.rng.shuffle(order)
                self.res.orders.setdefault("process:ports", []).append(order)
                for name in order:
                    self.progress("ports spawn %d/%d: %s" % (i + 1, self.p.spawns, name))
                    lp = start(name)
                    self.res.add("process", "port_spawn_ms", name, lp.ready_s * 1e3, i)
                    time.sleep(0.05)
                    self.res.add("process", "port_uss_kib", name, procs.uss_bytes(lp.pid) / 1024,
                                 i)
                    lp.stop()
                    alive.remove(lp)
            warm.stop()
            alive.remove(warm)
            for n in self.p.ports_ranges:
                metric = "ports%d_uss_mib" % n
                for r in range(self.p.ports_rounds):
                    order = ["spliceproxy", "docker-proxy"]
                    self.rng.shuffle(order)
                    self.res.orders.setdefault("process:%s" % metric, []).append(order)
                    for name in order:
                        self.progress("ports %d mappings, round %d/%d: %s"
                                      % (n, r + 1, self.p.ports_rounds, name))
                        started = [start(name) for _ in range(n)]
                        # Back to back, as dockerd starts a port range: the
                        # engine is busy, not waking from idle as it is for
                        # port_spawn_ms, one start 50 ms after the last.
                        self.res.add("process", "ports%d_spawn_ms" % n, name,
                                     sum(lp.ready_s for lp in started) * 1e3, r)
                        pids = [lp.pid for lp in started]
                        time.sleep(0.2)
                        if name != "docker-proxy":
                            pids.append(engine_pid)
                        self.res.add("process", metric, name,
                                     sum(procs.uss_bytes(p) for p in pids) / 2**20, r)
                        stop_all()
        except (OSError, RuntimeError, engine_status.StatusError) as exc:
            self.res.notes.append("ports group failed: %s" % exc)
        finally:
            stop_all()
            if engine_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(engine_pid, 15)
                deadline = time.monotonic() + 5
                while procs.alive(engine_pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
            shutil.rmtree(sockdir, ignore_errors=True)

    def _spawn_measured(self, argv, env=None):
        """Every measured start goes the one way dockerd's does (spawn_dockerd), so
        the spawn ratios compare the proxies and not the launcher."""
        return spawn_dockerd(argv, env=env if env is not None else self.paths.proxy_env,
                             netns=self.paths.host_ns)

    def run_strace(self, variant: str) -> None:
        """External syscall counts (strace -c -f -p) per userland path, in shuffled rounds.

        Per connection the count is fixed (28.03 for spliceproxy in every
        run); per GiB it depends on how much each call moves, which strace's
        own slowdown changes: one transfer per run ranged 2.7k-40k for
        spliceproxy, so it is a sample, measured in rounds like a timing.
        """
        import shutil

        if not shutil.which("strace"):
            self.res.notes.append("strace not installed: no external syscall counts")
            return
        paths = [(name, rt) for name, rt in self._paths_for(variant, "sink")
                 if rt.pid("sink") is not None and not rt.tree]
        for r in range(self.p.strace_rounds):
            for name, rt in self._order(variant, "strace", paths):
                self.progress("%s strace round %d/%d: %s" % (variant, r + 1,
                                                             self.p.strace_rounds, name))
                try:
                    with procs.StraceCount(rt.pid("sink")) as sc:
                        self.bulk_once(rt, variant, 1, self.p.strace_bytes)
                    if sc.total is not None:
                        self.res.add(variant, "strace_syscalls_per_gib", name,
                                     sc.total / (self.p.strace_bytes / GIB), r)
                    with procs.StraceCount(rt.pid("echo")) as sc:
                        o = self.crr_once(rt, variant, self.p.strace_conns)
                    if sc.total is not None and o["rate"]:
                        self.res.add(variant, "strace_syscalls_per_conn", name,
                                     sc.total / self.p.strace_conns, r)
                except (OSError, RuntimeError) as exc:
                    self.res.notes.append("strace via %s failed: %s" % (name, exc))

    def run_churn(self, variant: str) -> None:
        """Sequential short connections in one long run (moby #47537).

        Run once per path, after everything else: a proxy that leaves its
        backend sockets in TIME_WAIT exhausts the host namespace's ports
        towards its container port (each path has its own, so only its own
        later figures would suffer).  churn_hold compares the rate of the last
        tenth of the run with the first; churn_time_wait counts what it left
        behind.
        """
        if variant != "external" or self.topo is None:
            return
        n = self.p.churn_count
        wanted = ("native", "iptables", "spliceproxy", "docker-proxy")
        if self.p.name == "quick" and "docker-proxy" in self.paths.runtimes:
            # Past ~28k connections docker-proxy falls to a few hundred per
            # second: that alone would take longer than the quick profile.
            wanted = wanted[:3]
            self.res.notes.append("quick profile: docker-proxy's churn is measured in the "
                                  "full profile only (it collapses after ~28k connections)")
        for name, rt in self._paths_for(variant, "echo"):
            if name not in wanted or name in self.dead:
                continue
            ep, ns = self._where(rt, variant)
            self.progress("%s churn: %s, %d connections" % (variant, name, n))
            lat = self.ffi.new("double[]", n)
            tw_before = procs.time_wait_count(self.paths.host_ns)
            t0 = time.perf_counter()
            with topo_mod.in_netns(ns):
                done = self.lib.lg_connect_rate(socket.AF_INET, ep.echo[0].encode(),
                                                ep.echo[1], n, lat)
            elapsed = time.perf_counter() - t0
            if done <= 0:
                self.res.notes.append("churn via %s failed at once: %s"
                                      % (name, os.strerror(-done)))
                self.res.add(variant, "churn_done_pct", name, 0.0)
                continue
            tenth = max(1, done // 10)
            first = sum(lat[i] for i in range(tenth)) / 1e9
            last = sum(lat[i] for i in range(done - tenth, done)) / 1e9
            self.res.add(variant, "churn_rate", name, done / elapsed)
            self.res.add(variant, "churn_hold", name, first / last if last else 0.0)
            self.res.add(variant, "churn_done_pct", name, 100.0 * done / n)
            if done < n:
                self.res.notes.append("churn via %s stopped after %d of %d connections"
                                      % (name, done, n))
            # Only what this run added: earlier groups leave some of their own.
            self.res.add(variant, "churn_time_wait", name,
                         max(0, procs.time_wait_count(self.paths.host_ns) - tw_before))

    def run_all(self, groups=None) -> Results:
        self.res.started = time.time()
        self.res.method = {
            "rounds": self.p.rounds, "latency_rounds": self.p.lat_rounds,
            "order": "paths shuffled every round (seeded random.Random(seed))",
            "latency": "rr, crr and udp alternate the paths exchange by exchange in each "
                       "round, client thread, servers and proxies pinned to one CPU",
            "ratio": "median of per-round ratios; spread = interquartile range of the "
                     "per-round ratios; inconclusive when the IQR contains 1 or the ratio "
                     "of medians points the other way",
            "subnet": self.subnet, "netns_prefix": self.netns_prefix}
        t0 = time.perf_counter()
        groups = tuple(groups or GROUPS)
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError("unknown group(s) %s (choose from %s)"
                             % (", ".join(unknown), ", ".join(GROUPS)))
        # Phase by phase; within a phase variant by variant, groups in table order.
        for phase in sorted({GROUPS[g].phase for g in groups}):
            for variant in self.wanted_variants + ("process",):
                for g, spec in GROUPS.items():
                    if g not in groups or spec.phase != phase or variant not in spec.variants:
                        continue
                    if variant == "loopback" and spec.quick_loopback_only \
                            and g not in self.p.loopback_groups:
                        continue
                    spec.run(self, g, variant)
        self.res.elapsed = time.perf_counter() - t0
        return self.res
