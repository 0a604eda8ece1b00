"""ports: the host engine's cost per published port, against docker-proxy (issue 12).

Every proxy is started as dockerd starts it, by the one spawner
(spawn_dockerd: clone with CLONE_VM | CLONE_VFORK, status pipe on fd 3,
stdio on /dev/null), on 127.0.0.1 with the TCP backend; nothing is relayed.
spliceproxy runs in engine mode with an engine of its own (private socket,
never idle-exits during the group, stopped at the end) that is already
running, as on a host with published ports; spliceproxy-standalone is the
same command with SPLICEPROXY_ENGINE=0:
- port_spawn_ms, port_uss_kib: one start after the other, the paths
  shuffled per round; the USS of the stub (private memory, what a port
  adds) against docker-proxy's process;
- portsN_uss_mib: N mappings alive at once, every proxy process (stubs and
  the engine) summed, against N docker-proxy processes, the two alternated
  per round;
- portsN_spawn_ms: the spawn-to-ready times of those N starts, one right
  after the other as dockerd starts a port range, summed;
- port_first_spawn_ms: a host's first published port, no engine running:
  each round a fresh private socket directory, one stub started (it starts
  the engine) until its `0\n`, then the stub and the engine stopped; beside
  a docker-proxy start in the same shuffled rounds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from spliceproxy import engine_status
from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.engine import PrivateEngine
from spliceproxy.bench.launch import proxy_argv
from spliceproxy.bench.metrics import PORTS_STANDALONE


class Mappings:
    """The group's proxies: kinds maps a path to (executable, environment);
    each start is one mapping on a port free at that moment."""

    def __init__(self, h, kinds: dict):
        self.h, self.kinds = h, kinds
        self.alive: list = []

    def start(self, name: str):
        paths = self.h.paths
        # A port the kernel says is free now (the host namespace may be
        # the machine's own, with other listeners).
        with topo_mod.in_netns(paths.host_ns):
            probe = socket.socket()
        with probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        exe, env = self.kinds[name]
        argv = proxy_argv(exe, "tcp", "127.0.0.1", port, paths.backend_ip, paths.echo_port)
        lp = self.h._spawn_measured(argv, env=env)
        self.alive.append(lp)
        return lp

    def stop(self, lp) -> None:
        lp.stop()
        self.alive.remove(lp)

    def stop_all(self) -> None:
        for lp in self.alive:
            with contextlib.suppress(ProcessLookupError):
                lp.proc.send_signal(2)
        for lp in self.alive:
            with contextlib.suppress(Exception):
                lp.stop()
        self.alive.clear()


def run(h, group: str, variant: str) -> None:
    if not h.sp_exe or not h.dp_exe:
        h.res.notes.append("ports group: needs spliceproxy and docker-proxy")
        return
    base = dict(h.paths.proxy_env if h.paths.proxy_env is not None else os.environ)
    # Every engine of the group lives under the run's directory, which
    # their command lines name.
    h.ports_engine_dir = h.paths.tmp
    eng = PrivateEngine(base, h.paths.tmp)
    maps = Mappings(h, {"spliceproxy": (h.sp_exe, eng.env),
                        PORTS_STANDALONE: (h.sp_exe, dict(base, SPLICEPROXY_ENGINE="0")),
                        "docker-proxy": (h.dp_exe, base)})
    try:
        warm = maps.start("spliceproxy")  # starts the engine; not measured
        engine_pid = eng.attach()
        one_at_a_time(h, maps)
        maps.stop(warm)
        for n in h.p.ports_ranges:
            all_at_once(h, maps, n, engine_pid)
    except (OSError, RuntimeError, engine_status.StatusError) as exc:
        h.res.notes.append("ports group failed: %s" % exc)
    finally:
        maps.stop_all()
        eng.stop()
    first_start(h, maps, base)


def first_start(h, maps: Mappings, base: dict) -> None:
    """port_first_spawn_ms: no engine running, the first stub starts one."""
    for i in range(h.p.spawns):
        order = ["spliceproxy", "docker-proxy"]
        h.rng.shuffle(order)
        h.res.orders.setdefault("process:ports-first", []).append(order)
        for name in order:
            h.progress("ports first start %d/%d: %s" % (i + 1, h.p.spawns, name))
            eng = PrivateEngine(base, h.paths.tmp) if name == "spliceproxy" else None
            try:
                if eng is not None:
                    maps.kinds[name] = (h.sp_exe, eng.env)
                lp = maps.start(name)
                h.res.add("process", "port_first_spawn_ms", name, lp.ready_s * 1e3, i)
                if eng is not None:
                    eng.attach()
                maps.stop(lp)
            except (OSError, RuntimeError, engine_status.StatusError) as exc:
                h.res.notes.append("ports first start via %s failed: %s" % (name, exc))
            finally:
                maps.stop_all()
                if eng is not None:
                    eng.stop()
            time.sleep(0.05)


def one_at_a_time(h, maps: Mappings) -> None:
    """port_spawn_ms and port_uss_kib: every path's start, one after the other."""
    for i in range(h.p.spawns):
        order = list(maps.kinds)
        h.rng.shuffle(order)
        h.res.orders.setdefault("process:ports", []).append(order)
        for name in order:
            h.progress("ports spawn %d/%d: %s" % (i + 1, h.p.spawns, name))
            lp = maps.start(name)
            h.res.add("process", "port_spawn_ms", name, lp.ready_s * 1e3, i)
            time.sleep(0.05)
            h.res.add("process", "port_uss_kib", name, procs.uss_bytes(lp.pid) / 1024, i)
            maps.stop(lp)


def all_at_once(h, maps: Mappings, n: int, engine_pid: int) -> None:
    """portsN_spawn_ms and portsN_uss_mib: n mappings started back to back, then alive
    together; engine mode against docker-proxy, alternated per round."""
    metric = "ports%d_uss_mib" % n
    for r in range(h.p.ports_rounds):
        order = ["spliceproxy", "docker-proxy"]
        h.rng.shuffle(order)
        h.res.orders.setdefault("process:%s" % metric, []).append(order)
        for name in order:
            h.progress("ports %d mappings, round %d/%d: %s" % (n, r + 1, h.p.ports_rounds, name))
            started = [maps.start(name) for _ in range(n)]
            # Back to back, as dockerd starts a port range: the engine is
            # busy, not waking from idle as it is for port_spawn_ms, one
            # start 50 ms after the last.
            h.res.add("process", "ports%d_spawn_ms" % n, name,
                      sum(lp.ready_s for lp in started) * 1e3, r)
            pids = [lp.pid for lp in started]
            time.sleep(0.2)
            if name != "docker-proxy":
                pids.append(engine_pid)
            h.res.add("process", metric, name, sum(procs.uss_bytes(p) for p in pids) / 2**20, r)
            maps.stop_all()
