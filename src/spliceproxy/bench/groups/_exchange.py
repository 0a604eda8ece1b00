"""What rr and udp share: one request/response round over every path at once."""

from __future__ import annotations

import contextlib

from spliceproxy.bench import procs
from spliceproxy.bench.loadgen import check
from spliceproxy.bench.results import pct


def _cpu(order, role: str) -> dict:
    """CPU seconds now of each path's proxy process serving role."""
    out = {}
    for name, rt in order:
        pid = rt.pid(role)
        if pid:
            with contextlib.suppress(OSError):
                out[name] = procs.cpu_seconds(pid, rt.tree)
    return out


def _add_cpu(h, variant, metric, order, role, cpu0, exchanges, r) -> None:
    """Proxy CPU per round trip (us) over the round: what a busy-poll costs shows
    here, since its polls between one exchange and the next are counted too."""
    cpu1 = _cpu(order, role)
    for name, c0 in cpu0.items():
        if name in cpu1:
            h.res.add(variant, metric, name, (cpu1[name] - c0) * 1e6 / exchanges, r)


def _multi_socks(h, variant, order, attr, proto):
    socks = []
    try:
        for _name, rt in order:
            ep, ns = h._where(rt, variant)
            socks.append(h._connect(getattr(ep, attr), ns, proto))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def exchange_round(h, variant, order, r, role, proto, warmup, n, call, names) -> None:
    """One request/response round over every path, exchange by exchange.

    Warm-up, the proxies' CPU reading, the measured exchanges, then each
    path's percentiles and what it adds over native.  call(fds, k, n, lat)
    is the load generator's loop (TCP or UDP; a lost UDP reply records a
    negative latency and is left out); names maps p50, p99, added_p50,
    added_p99 and cpu to this group's metrics (a missing one is not
    recorded).
    """
    k = len(order)
    socks = _multi_socks(h, variant, order, role, proto)
    fds = h.ffi.new("int[]", [s.fileno() for s in socks])
    # The warm-up writes its latencies into the same buffer: room for both.
    lat = h.ffi.new("double[]", max(n, warmup) * k)
    what = names["p50"].rsplit("_", 1)[0]
    try:
        check(call(fds, k, warmup, lat), what + " warmup")
        cpu0 = _cpu(order, role)
        check(call(fds, k, n, lat), what)
        _add_cpu(h, variant, names["cpu"], order, role, cpu0, n, r)
    finally:
        for s in socks:
            s.close()
    got = {}
    for j, (name, _rt) in enumerate(order):
        vals = [lat[j * n + i] / 1e3 for i in range(n) if lat[j * n + i] >= 0]
        if vals:
            got[name] = (pct(vals, 0.5), pct(vals, 0.99))
    nat = got.get("native")
    for name, (p50, p99) in got.items():
        h.res.add(variant, names["p50"], name, p50, r)
        h.res.add(variant, names["p99"], name, p99, r)
        if nat and name != "native":
            for q, mine, ref in (("added_p50", p50, nat[0]), ("added_p99", p99, nat[1])):
                if q in names:
                    h.res.add(variant, names[q], name, max(0.0, mine - ref), r)
