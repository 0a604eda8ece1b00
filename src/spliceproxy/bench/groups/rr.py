"""rr: 1-byte TCP ping-pong latency and proxy CPU per round trip, paths interleaved."""

from __future__ import annotations

import socket

from spliceproxy.bench.groups import interleaved
from spliceproxy.bench.groups._exchange import exchange_round

# Exchanges per path before each round is measured.
WARMUP = 200

NAMES = {"p50": "rr_p50", "p99": "rr_p99", "added_p50": "rr_added_p50",
         "added_p99": "rr_added_p99", "cpu": "rr_cpu_us"}


def run(h, group: str, variant: str) -> None:
    paths = list(h._paths_for(variant, "echo"))
    if not paths:
        return

    def one_round(order, r):
        exchange_round(h, variant, order, r, "echo", socket.SOCK_STREAM, WARMUP, h.p.rr_iters,
                       lambda fds, k, n, lat: h.lib.lg_rr_multi(fds, k, n, 1, lat), NAMES)

    interleaved(h, group, variant, paths, "echo", one_round)
