"""One benchmark run: the topology, the backend servers, the proxies, and the
single measurements (one transfer, one ping-pong series, one connection
series through one path) that the metric groups (bench/groups/) are made of.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import threading
import time

from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.groups import GROUPS
from spliceproxy.bench.launch import spawn_dockerd
from spliceproxy.bench.loadgen import check, load
from spliceproxy.bench.metrics import GIB, PROFILES
from spliceproxy.bench.paths import SPIN, Paths, find_docker_proxy, find_spliceproxy
from spliceproxy.bench.results import Results, pct


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
        procs.raise_nofile()
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
        try:
            if getattr(self, "paths", None) is not None:
                self.paths.stop()  # raises when an engine of ours survives
        finally:
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
        if rt.engine is not None:
            # The engine counts system calls for itself as a whole; it
            # serves this path's mappings only, one measured at a time.
            from spliceproxy import engine_status

            try:
                return rt.engine.counters()
            except engine_status.StatusError:
                return None
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

    # -- single measurements (one path, one round) ----------------------------
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
        return {"p50": pct(vals, 0.5), "p99": pct(vals, 0.99)}

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
            out.update(p50=pct(vals, 0.5), p99=pct(vals, 0.99))
        return out

    # -- runs ----------------------------------------------------------------
    def _order(self, variant: str, group: str, paths: list) -> list:
        """This round's path order: shuffled with the run's seeded generator, recorded."""
        order = list(paths)
        self.rng.shuffle(order)
        self.res.orders.setdefault("%s:%s" % (variant, group), []).append(
            [name for name, _rt in order])
        return order

    def _spawn_measured(self, argv, env=None):
        """Every measured start goes the one way dockerd's does (spawn_dockerd), so
        the spawn ratios compare the proxies and not the launcher."""
        return spawn_dockerd(argv, env=env if env is not None else self.paths.standalone_env,
                             netns=self.paths.host_ns)

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
