"""The benchmark harness over real sockets and processes, in miniature.

A few short rounds of the alternated latency groups through a real
spliceproxy, checking what the table and the gate rely on: every round
pairs the paths, the order is shuffled and recorded, the ratios carry their
spread, and (as root) the namespaces use the chosen subnet and prefix and
are gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from spliceproxy.bench import harness, metrics, paths, report, results, topology
from spliceproxy.bench.groups import rr, udp


def _small(h: harness.Harness, rounds: int = 3) -> harness.Harness:
    h.p.rounds = h.p.lat_rounds = rounds
    h.p.rr_iters, h.p.crr_count, h.p.udp_iters, h.p.burst_count = 200, 30, 100, 500
    h.p.bulk_bytes = 8 << 20
    h.p.loopback_groups = ("bulk", "rr", "crr", "udp")
    return h


def _check_run(res: results.Results, variant: str, rounds: int) -> None:
    m = res.variants[variant]
    for metric in ("rr_p50", "crr_rate", "bulk_1"):
        assert len(m[metric]["spliceproxy"]) == rounds, (metric, res.notes)
        assert len(m[metric]["native"]) == rounds, (metric, res.notes)
    st = res.ratio_stats(variant, "rr_p50", "spliceproxy", "native")
    assert st.n == rounds and st.q1 <= st.value <= st.q3
    orders = res.orders["%s:rr" % variant]
    assert len(orders) == rounds and all(sorted(o) == ["native", "spliceproxy"]
                                         for o in orders)
    d = res.to_dict()
    spread = d["metrics"][variant]["rr_p50"]["spliceproxy"]["ratio_spread"]["native"]
    assert set(spread) >= {"value", "q1", "q3", "iqr", "of_medians", "rounds", "conclusive"}
    assert d["seed"] == res.seed and d["method"]["latency_rounds"] == rounds
    assert "rr_p50" in report.table(res) and "seed %d" % res.seed in report.table(res)


def test_loopback_rounds_paired_shuffled_and_spread():
    h = _small(harness.Harness("quick", netns=False, only=("native", "spliceproxy"),
                               peers=False, variants=("loopback",), seed=7))
    with h:
        res = h.run_all(("bulk", "rr", "crr"))
    _check_run(res, "loopback", 3)
    # The same seed and groups replay the same orders.
    h2 = _small(harness.Harness("quick", netns=False, only=("native", "spliceproxy"),
                                peers=False, variants=("loopback",), seed=7))
    with h2:
        res2 = h2.run_all(("bulk", "rr", "crr"))
    assert res2.orders == res.orders


def test_json_record_carries_spread_and_seed(tmp_path):
    h = _small(harness.Harness("quick", netns=False, only=("native", "spliceproxy"),
                               peers=False, variants=("loopback",), seed=11), rounds=3)
    with h:
        res = h.run_all(("bulk", "rr"))
    out = tmp_path / "r.json"
    report.write_json(res, str(out))
    data = json.loads(out.read_text())
    assert data["summary"]["seed"] == 11
    rec = next(b for b in data["benchmarks"] if b["name"] == "test_rr_p50[loopback-spliceproxy]")
    assert rec["extra_info"]["ratio_spread"]["native"]["rounds"] == 3
    assert len(rec["extra_info"]["round_index"]) == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_namespaces_use_the_chosen_subnet_and_prefix():
    prefix = "bt-h%d-" % os.getpid()
    h = _small(harness.Harness("quick", only=("native", "spliceproxy"), peers=False,
                               variants=("external",), subnet="198.19.240.0/24",
                               netns_prefix=prefix, seed=3))
    with h:
        names = h.topo.names
        assert all(n.startswith(prefix) for n in names)
        addrs = subprocess.run(["ip", "-n", h.topo.host, "-4", "-o", "addr"],
                               capture_output=True, text=True, check=True).stdout
        assert "198.19.240.2/25" in addrs and "198.19.240.129/25" in addrs
        res = h.run_all(("bulk", "rr", "crr", "udp"))
    _check_run(res, "external", 3)
    assert len(res.variants["external"]["udp_added_p50"]["spliceproxy"]) == 3
    left = os.listdir(topology.NETNS_DIR) if os.path.isdir(topology.NETNS_DIR) else []
    assert not [n for n in left if n.startswith(prefix)]


def test_latency_rounds_shorter_than_their_warm_up():
    """A profile with fewer exchanges than the warm-up must not overrun the
    latency buffer the warm-up shares (it aborted the process)."""
    h = _small(harness.Harness("quick", netns=False, only=("native", "spliceproxy"),
                               peers=False, variants=("loopback",), seed=5), rounds=1)
    h.p.rr_iters = rr.WARMUP // 10
    h.p.udp_iters = udp.WARMUP // 5
    with h:
        res = h.run_all(("rr", "udp"))
    m = res.variants["loopback"]
    assert len(m["rr_p50"]["spliceproxy"]) == 1 and len(m["rr_p50"]["native"]) == 1
    assert any(metric.startswith("udp") for metric in m), sorted(m)


@pytest.mark.skipif(paths.find_docker_proxy() is None,
                    reason="needs docker-proxy (apt-get install docker.io)")
def test_ports_group_engine_against_docker_proxy():
    """The ports group in miniature: real stubs with their own engine, the same
    command standalone and real docker-proxy processes, all started by the one
    dockerd-like spawner, per-port USS, spawn and a whole range's USS, each a
    same-run ratio with its spread; the engine and every proxy gone afterwards."""
    h = harness.Harness("quick", netns=False, only=("spliceproxy", "docker-proxy"),
                        peers=False, variants=("loopback",), seed=5)
    h.p.spawns, h.p.ports_rounds, h.p.ports_ranges = 3, 2, (100,)
    with h:
        res = h.run_all(("ports",))
    assert not [n for n in res.notes if "ports" in n], res.notes
    m = res.variants["process"]
    for metric in ("port_spawn_ms", "port_uss_kib"):
        for path in ("spliceproxy", metrics.PORTS_STANDALONE, "docker-proxy"):
            assert len(m[metric][path]) == 3, (metric, path, m.get(metric))
    # The first port, no engine running: each start starts an engine of its
    # own, which costs an interpreter's start; a warm start does not.
    for path in ("spliceproxy", "docker-proxy"):
        assert len(m["port_first_spawn_ms"][path]) == 3, m.get("port_first_spawn_ms")
    assert res.median("process", "port_first_spawn_ms", "spliceproxy") > res.median(
        "process", "port_spawn_ms", "spliceproxy")
    assert len(m["ports100_uss_mib"]["spliceproxy"]) == 2
    assert len(m["ports100_uss_mib"]["docker-proxy"]) == 2
    # The whole range's start, back to back, beside its memory.
    assert len(m["ports100_spawn_ms"]["spliceproxy"]) == 2
    assert len(m["ports100_spawn_ms"]["docker-proxy"]) == 2
    assert sorted(res.orders["process:ports"][0]) == sorted(
        ["spliceproxy", metrics.PORTS_STANDALONE, "docker-proxy"])
    # A stub is a small static program: far below a Go process.
    uss = res.ratio_stats("process", "port_uss_kib", "spliceproxy", "docker-proxy")
    assert uss.count and uss.value < 0.25 and uss.q1 <= uss.value <= uss.q3, uss
    whole = res.ratio_stats("process", "ports100_uss_mib", "spliceproxy", "docker-proxy")
    assert whole.n == 2 and whole.value > 0, whole
    # Nothing outlives the group: no stub, no docker-proxy, no engine.  Only
    # this run's: another benchmark on the machine may have an engine of its own.
    left = subprocess.run(["pgrep", "-f", h.ports_engine_dir], capture_output=True,
                          text=True).stdout.split()
    assert not left, left


def _engine_procs(needle: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", needle], capture_output=True,
                          text=True).stdout.split()


def test_relay_paths_run_in_engine_mode_and_count_the_engine():
    """spliceproxy is engine mode: its stubs hand every mapping to an engine of
    the run's own (private socket, in this namespace), whose CPU and system
    calls are the path's figures; spliceproxy-standalone is a process per
    port; the engine is gone afterwards."""
    h = _small(harness.Harness("quick", netns=False,
                               only=("native", "spliceproxy", "spliceproxy-standalone"),
                               peers=False, variants=("loopback",), seed=9))
    with h:
        rt = h.paths.runtimes["spliceproxy"]
        eng = rt.engine
        assert eng is not None and eng.pid not in [p.pid for p in rt.procs.values()]
        st = eng.status()
        assert sorted(m["stub_pid"] for m in st["mappings"]) == sorted(
            p.pid for p in rt.procs.values())
        assert os.stat(eng.dir).st_mode & 0o777 == 0o700
        assert os.readlink("/proc/%d/ns/net" % eng.pid) == os.readlink("/proc/self/ns/net")
        assert rt.pid("sink") == rt.pid("echo") == eng.pid
        sa = h.paths.runtimes["spliceproxy-standalone"]
        assert sa.engine is None and sa.pid("sink") == sa.procs["sink"].pid
        calls0 = eng.counters()["syscalls"]
        res = h.run_all(("bulk", "crr"))
        assert eng.counters()["syscalls"] > calls0
        pid, needle = eng.pid, eng.sock
    m = res.variants["loopback"]
    for path in ("spliceproxy", "spliceproxy-standalone"):
        assert len(m["syscalls_per_gib"][path]) == 3, (path, res.notes)
        assert len(m["cpu_per_gb"][path]) == 3 and min(m["cpu_per_gb"][path]) > 0
        assert len(m["syscalls_per_conn"][path]) == 3
    # The engine relays with splice: far fewer calls per GiB than 4 KiB copies.
    assert res.median("loopback", "syscalls_per_gib", "spliceproxy") < 100_000
    assert not os.path.exists("/proc/%d" % pid) or not _engine_procs(needle)
    assert not _engine_procs(needle)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.skipif(paths.find_docker_proxy() is None,
                    reason="needs docker-proxy (apt-get install docker.io)")
def test_aggregate_group_four_ports_at_once():
    """Four clients on four published ports at once: one engine serves the
    four mappings, docker-proxy runs four processes; every round measures
    every path."""
    prefix = "bt-a%d-" % os.getpid()
    h = _small(harness.Harness("quick", only=("native", "spliceproxy", "docker-proxy"),
                               peers=False, variants=("external",), subnet="198.19.239.0/24",
                               netns_prefix=prefix, seed=4), rounds=2)
    h.p.stream_bytes = 4 << 20
    with h:
        sp, dp = h.paths.runtimes["spliceproxy"], h.paths.runtimes["docker-proxy"]
        assert len(sp.agg["echo"]) == len(sp.agg["sink"]) == paths.AGG_PORTS
        assert len({a[1] for a in sp.agg["echo"] + sp.agg["sink"]}) == 2 * paths.AGG_PORTS
        assert len(sp.engine.status()["mappings"]) == 3 + 2 * paths.AGG_PORTS
        assert len(dp.pids(["aggsink%d" % i for i in range(paths.AGG_PORTS)])) == 4
        res = h.run_all(("agg",))
    m = res.variants["external"]
    for metric in ("agg_crr_rate", "agg_bulk"):
        for path in ("native", "spliceproxy", "docker-proxy"):
            assert len(m[metric][path]) == 2, (metric, path, res.notes)
    assert len(m["agg_cpu_per_gb"]["spliceproxy"]) == 2
    assert "native" not in m["agg_cpu_per_gb"]
    assert res.ratio_stats("external", "agg_crr_rate", "spliceproxy", "docker-proxy")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables)")
def test_loopback_iptables_is_dockerds_nat_for_local_clients():
    """On loopback the iptables path is what dockerd installs with the userland
    proxy off (nat OUTPUT DNAT for local destinations, route_localnet on the
    bridge side, MASQUERADE for 127.0.0.0/8 sources), and the latency and
    connection-rate groups measure it there beside native."""
    # SPLICEPROXY_BENCH_TEST_{PREFIX,SUBNET}: where several runs share a host.
    prefix = os.environ.get("SPLICEPROXY_BENCH_TEST_PREFIX", "bt-l%d-" % os.getpid())
    subnet = os.environ.get("SPLICEPROXY_BENCH_TEST_SUBNET", "198.19.241.0/24")
    h = _small(harness.Harness("quick", only=("native", "iptables"), peers=False,
                               variants=("loopback",), subnet=subnet, netns_prefix=prefix,
                               seed=11))
    with h:
        host = h.topo.host

        def run(*argv):
            return subprocess.run(["ip", "netns", "exec", host, *argv], capture_output=True,
                                  text=True, check=True).stdout

        out = run("iptables", "-w", "-t", "nat", "-S", "OUTPUT")
        assert "--dst-type LOCAL" in out and "-j DNAT" in out, out
        post = run("iptables", "-w", "-t", "nat", "-S", "POSTROUTING")
        assert "-s 127.0.0.0/8" in post and "MASQUERADE" in post, post
        assert run("sysctl", "-n", "net.ipv4.conf.hk0.route_localnet").strip() == "1"
        rt = h.paths.runtimes["iptables"]
        assert rt.loopback.echo[0] == "127.0.0.1"
        res = h.run_all(("rr", "crr", "udp"))
    m = res.variants["loopback"]
    for metric in ("rr_p50", "crr_rate", "udp_rr_p50"):
        assert len(m[metric]["iptables"]) == 3 and len(m[metric]["native"]) == 3, (
            metric, res.notes)
    # NAT adds a little over the direct path, never a relay's hop.
    assert 0.8 < res.ratio("loopback", "rr_p50", "iptables", "native") < 1.6
    left = os.listdir(topology.NETNS_DIR) if os.path.isdir(topology.NETNS_DIR) else []
    assert not [n for n in left if n.startswith(prefix)]
