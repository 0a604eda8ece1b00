"""pytest-benchmark suite over the spliceproxy.bench harness.

The whole comparison runs once per session with interleaved rounds (paths
measured side by side, so a noisy neighbour slows them alike); each test then
covers one metric x path: it times a short probe of that path with the
benchmark fixture and stores the interleaved medians, raw rounds and ratios in
extra_info, where `spliceproxy bench gate` reads them.

    python3 -m pytest benchmarks --quick-profile --benchmark-json out.json
    spliceproxy bench gate benchmarks/baseline.json out.json
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("spliceproxy-bench")
    g.addoption("--quick-profile", action="store_true",
                help="short benchmark profile (the CI budget)")
    g.addoption("--bench-rounds", type=int, default=None, help="interleaved rounds per metric")
    g.addoption("--bench-proxy-env", action="append", default=[], metavar="NAME=VALUE",
                help="extra environment for the proxies (e.g. a copy-mode knob)")


@pytest.fixture(scope="session")
def bench(request):
    from spliceproxy.bench.harness import Harness

    cfg = request.config
    env = dict(item.split("=", 1) for item in cfg.getoption("--bench-proxy-env"))
    h = Harness("quick" if cfg.getoption("--quick-profile") else "full", proxy_env=env)
    if cfg.getoption("--bench-rounds"):
        h.p.rounds = cfg.getoption("--bench-rounds")
    with h:
        h.run_all()
        yield h


def is_root() -> bool:
    return os.geteuid() == 0
