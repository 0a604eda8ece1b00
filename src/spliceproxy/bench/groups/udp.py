"""udp: 64-byte UDP ping-pong latency, paths interleaved; then each path's burst
(datagrams per second with 64 in flight, and the loss)."""

from __future__ import annotations

import socket

from spliceproxy.bench.groups import interleaved
from spliceproxy.bench.groups._exchange import exchange_round
from spliceproxy.bench.loadgen import check

# Exchanges per path before each round is measured.
WARMUP = 50

NAMES = {"p50": "udp_rr_p50", "p99": "udp_rr_p99", "added_p50": "udp_added_p50",
         "cpu": "udp_cpu_us"}


def run(h, group: str, variant: str) -> None:
    paths = list(h._paths_for(variant, "udp"))
    if "native" not in dict(paths):
        return  # the added latency and the ratios need native's figures

    def one_round(order, r):
        exchange_round(h, variant, order, r, "udp", socket.SOCK_DGRAM, WARMUP, h.p.udp_iters,
                       lambda fds, k, n, lat: h.lib.lg_udp_rr_multi(fds, k, n, 64, 200, lat),
                       NAMES)

    def bursts(order, r):
        for name, rt in order:
            _burst(h, variant, name, rt, r)

    interleaved(h, group, variant, paths, "udp", one_round, after=bursts)


def _burst(h, variant, name, rt, r) -> None:
    ep, ns = h._where(rt, variant)
    el = h.ffi.new("double *")
    burst = h.p.burst_count
    try:
        s = h._connect(ep.udp, ns, socket.SOCK_DGRAM)
        try:
            rep = check(h.lib.lg_udp_burst(s.fileno(), burst, 64, 64, 200, el), "udp burst")
        finally:
            s.close()
    except OSError as exc:
        h.res.notes.append("%s udp burst via %s failed: %s" % (variant, name, exc))
        return
    h.res.add(variant, "udp_pps", name, rep / el[0] if el[0] else 0.0, r)
    h.res.add(variant, "udp_loss_pct", name, 100.0 * (burst - rep) / burst, r)
