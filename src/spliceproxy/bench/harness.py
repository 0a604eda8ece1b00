"""Measurements: interleaved rounds over every path, medians and ratios.

Every headline figure is a ratio between paths measured in the same run;
timing figures are medians of per-round ratios, so a neighbour's load that
slows one round slows every path of that round alike.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.launch import spawn
from spliceproxy.bench.loadgen import check, load
from spliceproxy.bench.paths import Paths, find_docker_proxy, find_spliceproxy

GIB = 1 << 30


@dataclass
class Profile:
    name: str
    rounds: int
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
    strace_bytes: int
    strace_conns: int
    loopback_groups: tuple


# crr_count x rounds stays well below the ~28k ephemeral ports: docker-proxy,
# haproxy and socat each leave a TIME_WAIT socket per connection in the host
# namespace towards the one container port, and a larger count made the later
# paths fail to connect at all.
PROFILES = {
    "quick": Profile("quick", rounds=5, bulk_bytes=256 << 20, streams=4, stream_bytes=64 << 20,
                     rr_iters=2000, crr_count=300, udp_iters=1000, burst_count=10000,
                     scale_conns=1000, churn_count=30000, spawns=8, strace_bytes=64 << 20,
                     strace_conns=100,
                     loopback_groups=("bulk", "rr")),
    "full": Profile("full", rounds=7, bulk_bytes=1 << 30, streams=4, stream_bytes=256 << 20,
                    rr_iters=10000, crr_count=500, udp_iters=5000, burst_count=50000,
                    scale_conns=10000, churn_count=100000, spawns=20, strace_bytes=256 << 20,
                    strace_conns=500,
                    loopback_groups=("bulk", "rr", "crr", "udp")),
}

# metric -> (unit, better, description)
METRICS = {
    "bulk_1": ("Gbit/s", "higher", "one TCP stream"),
    "bulk_n": ("Gbit/s", "higher", "parallel TCP streams, aggregate"),
    "cpu_per_gb": ("s/GB", "lower", "proxy CPU seconds per GB relayed"),
    "syscalls_per_gib": ("calls", "lower", "proxy system calls per GiB relayed"),
    "rr_p50": ("us", "lower", "1-byte TCP ping-pong p50"),
    "rr_p99": ("us", "lower", "1-byte TCP ping-pong p99"),
    "rr_added_p50": ("us", "lower", "p50 latency added over native"),
    "rr_added_p99": ("us", "lower", "p99 latency added over native"),
    "crr_rate": ("conn/s", "higher", "connect, 1-byte exchange, close"),
    "syscalls_per_conn": ("calls", "lower", "proxy system calls per connection"),
    "udp_rr_p50": ("us", "lower", "64-byte UDP ping-pong p50"),
    "udp_rr_p99": ("us", "lower", "64-byte UDP ping-pong p99"),
    "udp_added_p50": ("us", "lower", "UDP p50 latency added over native"),
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
    "strace_syscalls_per_gib": ("calls", "lower", "system calls per GiB (strace -c)"),
    "strace_syscalls_per_conn": ("calls", "lower", "system calls per connection (strace -c)"),
}
REFS = ("native", "iptables", "docker-proxy")
BARE = "python-bare"
BARE_SRC = ("import os,socket\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\n"
            "os.write(3,b'0\\n')\nimport select\nselect.select([], [], [])\n")


@dataclass
class Results:
    profile: str
    variants: dict = field(default_factory=dict)  # variant -> metric -> path -> [values]
    notes: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    paths: list = field(default_factory=list)
    started: float = 0.0
    elapsed: float = 0.0

    def add(self, variant: str, metric: str, path: str, value) -> None:
        if value is None:
            return
        self.variants.setdefault(variant, {}).setdefault(metric, {}).setdefault(
            path, []).append(float(value))

    def median(self, variant: str, metric: str, path: str):
        vals = self.variants.get(variant, {}).get(metric, {}).get(path)
        return statistics.median(vals) if vals else None

    def ratio(self, variant: str, metric: str, path: str, ref: str):
        """Median of per-round ratios path/ref (rounds measured side by side)."""
        m = self.variants.get(variant, {}).get(metric, {})
        a, b = m.get(path), m.get(ref)
        if not a or not b or path == ref:
            return None
        if "added" in metric and ref != "docker-proxy":
            return None  # added latency over native/iptables is ~0: no meaningful ratio
        pairs = [(x / y) for x, y in zip(a, b) if y] if len(a) == len(b) else []
        if not pairs:
            mb = statistics.median(b)
            return statistics.median(a) / mb if mb else None
        return statistics.median(pairs)

    def to_dict(self) -> dict:
        out = {"profile": self.profile, "paths": self.paths, "skipped": self.skipped,
               "notes": self.notes, "elapsed_s": round(self.elapsed, 1), "metrics": {}}
        for variant, metrics in self.variants.items():
            for metric, per_path in metrics.items():
                for path, vals in per_path.items():
                    ratios = {ref: self.ratio(variant, metric, path, ref)
                              for ref in REFS + (BARE,)}
                    out["metrics"].setdefault(variant, {}).setdefault(metric, {})[path] = {
                        "median": statistics.median(vals), "rounds": vals,
                        "unit": METRICS[metric][0], "better": METRICS[metric][1],
                        "ratios": {k: v for k, v in ratios.items() if v is not None}}
        return out


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
                 netns: bool | None = None, progress=None):
        self.p = PROFILES[profile]
        self.progress = progress or (lambda msg: None)
        self.root = os.geteuid() == 0 if netns is None else netns
        self.ffi, self.lib = load()
        self.res = Results(profile)
        self.dead: set = set()  # paths whose process died (scale test): not measured further
        self.topo = None
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
                self.topo = topo_mod.Topology().setup()
            self.paths = Paths(self.topo, spliceproxy=self.sp_exe, docker_proxy=self.dp_exe,
                               peers=self.peers, proxy_env=self.proxy_env, only=self.only)
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
    def run_group(self, group: str, variant: str) -> None:
        need = {"udp": "udp", "bulk": "sink", "bulkn": "sink"}.get(group, "echo")
        paths = list(self._paths_for(variant, need))
        if group == "udp" and "native" not in dict(paths):
            return
        for r in range(self.p.rounds):
            round_native = {}
            for name, rt in paths:
                self.progress("%s %s round %d/%d: %s" % (variant, group, r + 1, self.p.rounds,
                                                          name))
                try:
                    self._one(group, variant, name, rt, round_native)
                except OSError as exc:
                    self.res.notes.append("%s %s via %s failed: %s" % (variant, group, name, exc))

    def _one(self, group, variant, name, rt, round_native) -> None:
        add = self.res.add
        if group == "bulk":
            o = self.bulk_once(rt, variant, 1, self.p.bulk_bytes)
            add(variant, "bulk_1", name, o["gbps"])
            add(variant, "cpu_per_gb", name, o.get("cpu_per_gb"))
            add(variant, "syscalls_per_gib", name, o.get("syscalls_per_gib"))
        elif group == "bulkn":
            o = self.bulk_once(rt, variant, self.p.streams, self.p.stream_bytes)
            add(variant, "bulk_n", name, o["gbps"])
        elif group == "rr":
            o = self.rr_once(rt, variant)
            add(variant, "rr_p50", name, o["p50"])
            add(variant, "rr_p99", name, o["p99"])
            if name == "native":
                round_native.update(o)
            elif round_native:
                add(variant, "rr_added_p50", name, max(0.0, o["p50"] - round_native["p50"]))
                add(variant, "rr_added_p99", name, max(0.0, o["p99"] - round_native["p99"]))
        elif group == "crr":
            o = self.crr_once(rt, variant)
            add(variant, "crr_rate", name, o["rate"])
            add(variant, "syscalls_per_conn", name, o.get("syscalls_per_conn"))
        elif group == "udp":
            o = self.udp_once(rt, variant)
            add(variant, "udp_pps", name, o["pps"])
            add(variant, "udp_loss_pct", name, o["loss"])
            if "p50" in o:
                add(variant, "udp_rr_p50", name, o["p50"])
                add(variant, "udp_rr_p99", name, o["p99"])
                if name == "native":
                    round_native["udp"] = o["p50"]
                elif "udp" in round_native:
                    add(variant, "udp_added_p50", name, max(0.0, o["p50"] - round_native["udp"]))

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
            for name, exe in cands:
                self.progress("spawn %d/%d: %s" % (i + 1, self.p.spawns, name))
                port += 1
                if exe is None:
                    argv = [sys.executable, "-I", "-S", "-c", BARE_SRC]
                else:
                    argv = self.paths._argv(exe, port)
                lp = self._spawn_measured(argv)
                try:
                    time.sleep(0.05)
                    self.res.add("process", "spawn_ms", name, lp.ready_s * 1e3)
                    self.res.add("process", "idle_rss_mib", name, procs.rss_bytes(lp.pid) / 2**20)
                finally:
                    lp.stop()

    def _spawn_measured(self, argv):
        pre = topo_mod.child_preexec(self.paths.host_ns)
        try:
            return spawn(argv, preexec_fn=pre, env=self.paths.proxy_env)
        finally:
            if pre.fd >= 0:
                os.close(pre.fd)

    def run_strace(self, variant: str) -> None:
        """External syscall counts (strace -c -f -p), once per userland path."""
        import shutil

        if not shutil.which("strace"):
            self.res.notes.append("strace not installed: no external syscall counts")
            return
        for name, rt in self._paths_for(variant, "sink"):
            pid = rt.pid("sink")
            if pid is None or rt.tree:
                continue
            self.progress("%s strace: %s" % (variant, name))
            try:
                with procs.StraceCount(pid) as sc:
                    self.bulk_once(rt, variant, 1, self.p.strace_bytes)
                if sc.total is not None:
                    self.res.add(variant, "strace_syscalls_per_gib", name,
                                 sc.total / (self.p.strace_bytes / GIB))
                epid = rt.pid("echo")
                with procs.StraceCount(epid) as sc:
                    o = self.crr_once(rt, variant, self.p.strace_conns)
                if sc.total is not None and o["rate"]:
                    self.res.add(variant, "strace_syscalls_per_conn", name,
                                 sc.total / self.p.strace_conns)
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
        t0 = time.perf_counter()
        groups = groups or ("bulk", "bulkn", "rr", "crr", "udp", "strace", "scale", "spawn",
                            "churn")
        for variant in self.wanted_variants:
            for g in groups:
                if variant == "loopback" and g not in self.p.loopback_groups:
                    continue
                if g in ("scale", "churn", "spawn"):
                    continue  # after the others: see below
                if g == "strace":
                    self.run_strace(variant)
                else:
                    self.run_group(g, variant)
        # Scale can end a proxy that runs out of descriptors (docker-proxy
        # does): measured after every throughput and latency figure.
        if "scale" in groups:
            for variant in self.wanted_variants:
                self.run_scale(variant)
        if "spawn" in groups:
            self.run_spawn()
        if "churn" in groups and "external" in self.wanted_variants:
            self.run_churn("external")
        self.res.elapsed = time.perf_counter() - t0
        return self.res
