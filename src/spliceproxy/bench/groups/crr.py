"""crr: connect, 1-byte exchange, close; the rate and system calls per connection,
paths interleaved connection by connection."""

from __future__ import annotations

import socket
import time

from spliceproxy.bench import topology as topo_mod
from spliceproxy.bench.groups import interleaved
from spliceproxy.bench.loadgen import check


def run(h, group: str, variant: str) -> None:
    paths = list(h._paths_for(variant, "echo"))
    if not paths:
        return
    interleaved(h, group, variant, paths, "echo",
                lambda order, r: _round(h, variant, order, r))


def _round(h, variant, order, r) -> None:
    n, k = h.p.crr_count, len(order)
    ns = h._where(order[0][1], variant)[1]
    eps = [h._where(rt, variant)[0].echo for _name, rt in order]
    ips = [h.ffi.new("char[]", ep[0].encode()) for ep in eps]
    ipv = h.ffi.new("const char *[]", ips)
    ports = h.ffi.new("int[]", [ep[1] for ep in eps])
    lat = h.ffi.new("double[]", n * k)
    st0 = {name: h._stats(rt, "echo") for name, rt in order}
    with topo_mod.in_netns(ns):
        done = check(h.lib.lg_connect_rate_multi(socket.AF_INET, ipv, ports, k, n,
                                                 h.rng.randrange(1, 1 << 32), lat),
                     "crr")
    if done < n:
        raise OSError("crr stopped after %d of %d connections per path" % (done, n))
    time.sleep(0.05)  # let the proxies finish closing the last pairs
    for j, (name, rt) in enumerate(order):
        total = sum(lat[j * n + i] for i in range(n)) / 1e9
        h.res.add(variant, "crr_rate", name, n / total if total else None, r)
        st1 = h._stats(rt, "echo")
        if st0[name] and st1:
            h.res.add(variant, "syscalls_per_conn", name,
                      (st1["syscalls"] - st0[name]["syscalls"]) / n, r)
