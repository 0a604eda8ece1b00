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
    g.addoption("--bench-seed", type=int, default=None,
                help="seed of the per-round path order (default random; recorded in the JSON)")
    g.addoption("--bench-subnet", default=None, metavar="CIDR",
                help="IPv4 range for the benchmark's veth links (default 198.18.1.0/24)")
    g.addoption("--bench-netns-prefix", default=None, metavar="PREFIX",
                help="name prefix of the benchmark's network namespaces (default spb-)")
    g.addoption("--bench-groups", default=None, metavar="LIST",
                help="comma-separated subset of the harness's metric groups (default all); "
                     "select the matching tests with -k")


@pytest.fixture(scope="session")
def bench(request):
    from spliceproxy.bench import topology
    from spliceproxy.bench.harness import Harness

    cfg = request.config
    env = dict(item.split("=", 1) for item in cfg.getoption("--bench-proxy-env"))
    subnet = cfg.getoption("--bench-subnet") or topology.SUBNET
    prefix = cfg.getoption("--bench-netns-prefix") or topology.PREFIX
    try:
        h = Harness("quick" if cfg.getoption("--quick-profile") else "full", proxy_env=env,
                    seed=cfg.getoption("--bench-seed"), subnet=subnet, netns_prefix=prefix)
        if cfg.getoption("--bench-rounds"):
            h.p.rounds = h.p.lat_rounds = cfg.getoption("--bench-rounds")
        with h:
            groups = cfg.getoption("--bench-groups")
            h.run_all(tuple(g for g in groups.split(",") if g) if groups else None)
            _RUN["summary"] = {k: v for k, v in h.res.to_dict().items() if k != "metrics"}
            yield h
    except topology.ConfigError as exc:
        pytest.exit("spliceproxy bench: %s" % exc, returncode=2)


_RUN: dict = {}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The run's seed, path orders, method and notes beside the per-test records."""
    if _RUN:
        output_json["spliceproxy_bench"] = _RUN["summary"]


def is_root() -> bool:
    return os.geteuid() == 0
