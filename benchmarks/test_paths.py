"""One test per metric x path; figures come from the session's interleaved run."""

from __future__ import annotations

import re

import pytest

from spliceproxy.bench.gate import gate_entries
from spliceproxy.bench.metrics import BARE, METRICS, PLAIN, PORTS_STANDALONE, REFS

# spliceproxy is engine mode (an engine of the bench's own); standalone and
# docker-proxy 20.10 (the second reference, while installed) beside it.
STANDALONE, DP_OLD = "spliceproxy-standalone", "docker-proxy-20.10"
TIMING = ("native", "iptables", "spliceproxy", STANDALONE, "docker-proxy", DP_OLD, "haproxy",
          "socat")
USERLAND = ("spliceproxy", STANDALONE, "docker-proxy", DP_OLD, "haproxy", "socat")
UDP_PATHS = ("native", "iptables", "spliceproxy", STANDALONE, "docker-proxy", DP_OLD, "socat")
# The plain relay with the busy-poll on (SPLICEPROXY_SPIN): measured where it
# could matter, latency, connection rate and the CPU each round trip costs.
SPIN = "spliceproxy-spin"
PER_METRIC = {
    "bulk_1": TIMING, "bulk_n": TIMING, "cpu_per_gb": USERLAND, "cpu_per_gb_n": USERLAND,
    "syscalls_per_gib": ("spliceproxy", STANDALONE),
    "rr_p50": TIMING + (SPIN,), "rr_p99": TIMING + (SPIN,),
    "rr_added_p50": TIMING[1:] + (SPIN,), "rr_added_p99": TIMING[1:] + (SPIN,),
    "rr_cpu_us": USERLAND + (SPIN,),
    "crr_rate": TIMING + (SPIN,), "syscalls_per_conn": ("spliceproxy", STANDALONE),
    "udp_rr_p50": UDP_PATHS + (SPIN,),
    "udp_rr_p99": UDP_PATHS + (SPIN,),
    "udp_added_p50": UDP_PATHS[1:] + (SPIN,),
    "udp_cpu_us": UDP_PATHS[2:] + (SPIN,),
    "udp_pps": UDP_PATHS,
    "udp_loss_pct": UDP_PATHS,
    # Four clients on four published ports at once (engine mode: one engine).
    "agg_crr_rate": ("native", "spliceproxy", "docker-proxy"),
    "agg_bulk": ("native", "spliceproxy", "docker-proxy"),
    "agg_cpu_per_gb": ("spliceproxy", "docker-proxy"),
    "scale_served_pct": ("spliceproxy", "docker-proxy", "haproxy"),
    "rss_per_conn_kib": ("spliceproxy", "docker-proxy", "haproxy"),
    "fds_per_conn": ("spliceproxy", "docker-proxy", "haproxy"),
    "threads": ("spliceproxy", "docker-proxy", "haproxy"),
    "strace_syscalls_per_gib": ("spliceproxy", "docker-proxy", "haproxy"),
    "strace_syscalls_per_conn": ("spliceproxy", "docker-proxy", "haproxy"),
    "churn_rate": ("native", "iptables", "spliceproxy", "docker-proxy"),
    "churn_hold": ("native", "iptables", "spliceproxy", "docker-proxy"),
    "churn_done_pct": ("native", "iptables", "spliceproxy", "docker-proxy"),
    "churn_time_wait": ("spliceproxy", "docker-proxy"),
}
PROCESS = {"spawn_ms": ("spliceproxy", "docker-proxy", BARE),
           "idle_rss_mib": ("spliceproxy", "docker-proxy", BARE),
           # The ports group: engine mode and standalone against docker-proxy.
           "port_spawn_ms": ("spliceproxy", PORTS_STANDALONE, "docker-proxy"),
           "port_first_spawn_ms": ("spliceproxy", "docker-proxy"),
           "port_uss_kib": ("spliceproxy", PORTS_STANDALONE, "docker-proxy"),
           "ports100_uss_mib": ("spliceproxy", "docker-proxy"),
           "ports1000_uss_mib": ("spliceproxy", "docker-proxy"),
           "ports100_spawn_ms": ("spliceproxy", "docker-proxy"),
           "ports1000_spawn_ms": ("spliceproxy", "docker-proxy")}
GROUP = {"bulk_1": "bulk", "bulk_n": "bulk", "cpu_per_gb": "bulk", "cpu_per_gb_n": "bulk",
         "syscalls_per_gib": "bulk",
         "strace_syscalls_per_gib": "bulk", "crr_rate": "crr", "syscalls_per_conn": "crr",
         "strace_syscalls_per_conn": "crr", "churn_rate": "crr", "churn_hold": "crr",
         "churn_done_pct": "crr", "churn_time_wait": "crr", "agg_bulk": "bulk",
         "agg_cpu_per_gb": "bulk", "agg_crr_rate": "crr"}
for _m in METRICS:
    if _m.startswith("udp"):
        GROUP[_m] = "udp"

CASES = [("external", m, p) for m, ps in PER_METRIC.items() for p in ps]
# On loopback the iptables path is dockerd's NAT for host-local clients (nat
# OUTPUT DNAT) and latency, connection rate and UDP are measured as well.
CASES += [("loopback", m, p) for m in ("bulk_1", "cpu_per_gb", "syscalls_per_gib", "rr_p50",
                                       "rr_p99", "rr_added_p50", "rr_added_p99", "rr_cpu_us",
                                       "crr_rate", "syscalls_per_conn", "udp_rr_p50",
                                       "udp_rr_p99", "udp_added_p50", "udp_cpu_us", "udp_pps",
                                       "udp_loss_pct")
          for p in PER_METRIC[m]]
CASES += [("loopback", m, p) for m in ("scale_served_pct", "rss_per_conn_kib", "fds_per_conn",
                                       "threads") for p in PER_METRIC[m]]
CASES += [("process", m, p) for m, ps in PROCESS.items() for p in ps]
# The kernel fast path serves host-local clients only (its relay is the spliceproxy path);
# its targets (gate.TARGETS) are ratios to native and iptables on these.
CASES += [("loopback", m, "fastpath") for m in ("bulk_1", "rr_p50", "rr_p99", "rr_added_p50",
                                                "rr_added_p99", "crr_rate", "udp_rr_p50",
                                                "udp_rr_p99", "udp_added_p50", "udp_pps",
                                                "udp_loss_pct")]


def _probe(bench, variant, metric, path):
    """A short real operation on the path, for pytest-benchmark's own timing stats."""
    rt = bench.paths.runtimes.get(path)
    if rt is None or variant == "process":
        return lambda: None
    group = GROUP.get(metric, "rr")
    if group == "bulk":
        return lambda: bench.bulk_once(rt, variant, 1, 8 << 20)
    if group == "crr":
        return lambda: bench.crr_once(rt, variant, 20)
    if group == "udp" and rt.external and rt.external.udp:
        return lambda: bench.udp_once(rt, variant)
    return lambda: bench.rr_once(rt, variant, 200)


@pytest.mark.parametrize("variant,metric,path", CASES,
                         ids=["%s-%s-%s" % c for c in CASES])
def test_metric(benchmark, bench, variant, metric, path):
    res = bench.res
    if path not in (BARE, PORTS_STANDALONE) and path not in bench.paths.runtimes:
        pytest.skip("%s not measured: %s" % (path, bench.paths.skipped.get(path, "unavailable")))
    if variant not in res.variants:
        pytest.skip("%s variant not measured (%s)" % (variant, "; ".join(res.notes)))
    vals = res.variants[variant].get(metric, {}).get(path)
    if not vals and metric.startswith("churn_") and path == "docker-proxy" \
            and bench.p.name == "quick":
        pytest.skip("docker-proxy's churn runs in the full profile only: past ~28k "
                    "connections it drops to a few hundred per second")
    many = re.match(r"ports(\d+)_", metric)
    if not vals and many and int(many.group(1)) not in bench.p.ports_ranges:
        pytest.skip("%s mappings are measured in the full profile only (%s here)"
                    % (many.group(1), ", ".join(map(str, bench.p.ports_ranges))))
    benchmark.group = "%s:%s" % (variant, metric)
    benchmark.pedantic(_probe(bench, variant, metric, path), rounds=3, iterations=1)
    assert vals, "no %s figure for %s (%s): %s" % (metric, path, variant, res.notes)
    stats = {ref: res.ratio_stats(variant, metric, path, ref) for ref in REFS + (BARE, PLAIN)}
    stats = {k: v for k, v in stats.items() if v is not None}
    benchmark.extra_info.update(
        metric=metric, variant=variant, path=path, unit=METRICS[metric][0],
        better=METRICS[metric][1], median=res.median(variant, metric, path), rounds=vals,
        round_index=res.round_of[variant][metric][path], seed=res.seed,
        ratios={k: v.value for k, v in stats.items()},
        ratio_spread={k: v.as_dict() for k, v in stats.items()},
        gate=gate_entries(res, variant, metric, path))
    if metric == "churn_done_pct" and path == "spliceproxy":
        assert min(vals) == 100.0, "spliceproxy completed only %.1f%% of the churn" % min(vals)
    if metric == "scale_served_pct":
        assert min(vals) == 100.0, "%s served only %.1f%% of the connections" % (path, min(vals))
    if metric == "udp_loss_pct" and path in ("native", "iptables"):
        assert max(vals) < 1.0
