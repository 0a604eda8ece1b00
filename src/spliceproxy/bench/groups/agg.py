"""agg: four clients on four published ports at once, one mapping each.

What a host with several busy ports asks of the proxy: engine mode serves
every mapping from one engine, docker-proxy runs a process per port.  Per
round, in a shuffled path order, each path gets AGG_PORTS client threads
at once, each on a port of its own (native: the same count straight to the
container's servers):
- agg_crr_rate: connect, 1-byte exchange, close, crr_count per client; the
  connections of all clients over the wall time from the first start to
  the last end;
- agg_bulk: one TCP stream per port (stream_bytes each), the sum over the
  wall time; agg_cpu_per_gb: CPU seconds of every process relaying them
  (the engine; docker-proxy's four processes) per GB.
Not pinned: the clients need every CPU, as the ports' traffic would.
"""

from __future__ import annotations

import socket
import threading
import time

from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.loadgen import check
from spliceproxy.bench.paths import AGG_PORTS


def _addrs(h, rt, kind: str) -> list:
    if rt.name == "native":
        ep = getattr(rt.external, kind)
        return [ep] * AGG_PORTS
    return rt.agg.get(kind) or []


def _roles(rt, kind: str) -> list[str]:
    return ["agg%s%d" % (kind, i) for i in range(AGG_PORTS)]


def _parallel(work: list) -> float:
    """Run the callables at once, one thread each; the wall time from the first
    start to the last end.  A failure in any is raised."""
    spans, errs = [None] * len(work), []
    gate = threading.Barrier(len(work))

    def one(i, fn):
        try:
            gate.wait()
            t0 = time.perf_counter()
            fn()
            spans[i] = (t0, time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errs.append(exc)

    threads = [threading.Thread(target=one, args=(i, fn)) for i, fn in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errs:
        raise errs[0] if isinstance(errs[0], OSError) else OSError(str(errs[0]))
    return max(s[1] for s in spans) - min(s[0] for s in spans)


def crr4(h, rt, ns) -> float:
    n = h.p.crr_count
    addrs = _addrs(h, rt, "echo")

    def client(addr):
        def fn():
            lat = h.ffi.new("double[]", n)
            with topo_mod.in_netns(ns):
                done = check(h.lib.lg_connect_rate(socket.AF_INET, addr[0].encode(), addr[1],
                                                   n, lat), "agg crr via " + rt.name)
            if done < n:
                raise OSError("agg crr via %s: %d of %d connections" % (rt.name, done, n))
        return fn

    dt = _parallel([client(a) for a in addrs])
    return n * len(addrs) / dt


def bulk4(h, rt, ns) -> dict:
    nbytes = h.p.stream_bytes
    socks = []
    try:
        for addr in _addrs(h, rt, "sink"):
            socks.append(h._connect(addr, ns))
        pids = [] if rt.name == "native" else rt.pids(_roles(rt, "sink"))
        cpu0 = sum(procs.cpu_seconds(p) for p in pids)

        def sender(s):
            def fn():
                rc = h.lib.lg_bulk_send(s.fileno(), nbytes, 1 << 17)
                if rc < 0:
                    raise OSError(-rc, "agg bulk via %s" % rt.name)
            return fn

        dt = _parallel([sender(s) for s in socks])
    finally:
        for s in socks:
            s.close()
    total = nbytes * len(socks)
    out = {"gbps": total * 8 / dt / 1e9}
    if pids:
        time.sleep(0.02)
        out["cpu_per_gb"] = (sum(procs.cpu_seconds(p) for p in pids) - cpu0) / (total / 1e9)
    return out


def run(h, group: str, variant: str) -> None:
    paths = [(name, rt) for name, rt in h.paths.runtimes.items()
             if rt.external is not None and len(_addrs(h, rt, "echo")) == AGG_PORTS
             and len(_addrs(h, rt, "sink")) == AGG_PORTS]
    if len(paths) < 2:
        return
    ns = h.paths.client_ns
    rounds = h.p.lat_rounds
    for r in range(rounds):
        for name, rt in h._order(variant, group, paths):
            h.progress("%s agg round %d/%d: %s, %d ports" % (variant, r + 1, rounds, name,
                                                            AGG_PORTS))
            try:
                h.res.add(variant, "agg_crr_rate", name, crr4(h, rt, ns), r)
                o = bulk4(h, rt, ns)
                h.res.add(variant, "agg_bulk", name, o["gbps"], r)
                h.res.add(variant, "agg_cpu_per_gb", name, o.get("cpu_per_gb"), r)
            except OSError as exc:
                h.res.notes.append("%s agg via %s failed: %s" % (variant, name, exc))
