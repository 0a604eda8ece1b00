"""The benchmark's choice of addresses and namespace names, and its statistics.

--subnet / --netns-prefix: a range the host already uses or a prefix a live
namespace carries is refused with a message (exit 2) before anything is
built; stale namespaces of the harness's own shape are cleaned, others' never.
Ratios: median of per-round ratios with their IQR, inconclusive when the
spread straddles 1 or the medians disagree.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig

import pytest

from spliceproxy.bench import harness, report, results, topology

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
needs_ip = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (`ip`)")


def bench_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = os.path.join(sysconfig.get_path("scripts"), "spliceproxy")
    argv = [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "spliceproxy"]
    return subprocess.run(argv + ["bench", *args], capture_output=True, text=True,
                          timeout=timeout)


# -- address plan -------------------------------------------------------------------

def test_plan_splits_the_subnet_in_two_links():
    p = topology.plan("198.19.4.0/24")
    assert (p.client, p.host_ext, p.host_int, p.container, p.prefixlen) == (
        "198.19.4.1", "198.19.4.2", "198.19.4.129", "198.19.4.130", 25)
    p = topology.plan("198.19.0.0/29")
    assert (p.client, p.host_ext, p.host_int, p.container) == (
        "198.19.0.1", "198.19.0.2", "198.19.0.5", "198.19.0.6")


@pytest.mark.parametrize("bad", ["198.19.0.0/30", "198.19.0.1/24", "fd00::/64", "banana", ""])
def test_plan_refuses(bad):
    with pytest.raises(topology.ConfigError):
        topology.plan(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 33, "sp b"])
def test_prefix_refused(bad):
    with pytest.raises(topology.ConfigError):
        topology.check_prefix(bad)


@needs_ip
def test_loopback_range_is_in_use():
    found = topology.subnet_conflicts("127.0.0.0/24")
    assert any(f.startswith("address 127.0.0.1/") and " on lo" in f for f in found), found


@pytest.mark.parametrize("args,needle", [
    (["--subnet", "198.19.0.0/31"], "too small"),
    (["--subnet", "not-a-net"], "invalid subnet"),
    (["--netns-prefix", "a/b"], "invalid namespace prefix"),
    (["--groups", "bulk,nosuch"], "unknown group"),
])
def test_cli_refuses_bad_options(args, needle):
    cp = bench_cmd("--quick", *args)
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert needle in cp.stderr and "Traceback" not in cp.stderr


# -- in a namespace of our own (root) -------------------------------------------------

@pytest.fixture
def scratch_ns():
    """A namespace named bt-cfg-<pid>, deleted afterwards."""
    name = "bt-cfg-%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=10)


def _in_ns(ns: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30)


@needs_root
@needs_ip
def test_address_or_route_in_range_is_a_conflict(scratch_ns):
    code = ("from spliceproxy.bench import topology as t\n"
            "print(t.subnet_conflicts('198.19.250.0/24'))\n"
            "print(t.subnet_conflicts('198.19.251.0/24'))\n"
            "print(t.subnet_conflicts('198.19.252.0/24'))\n")
    cp = _in_ns(scratch_ns, code)
    assert cp.stdout.splitlines() == ["[]", "[]", "[]"], cp.stderr
    ipns = ["ip", "-n", scratch_ns]
    subprocess.run(ipns + ["link", "add", "btd0", "type", "veth", "peer", "name", "btd1"],
                   check=True)
    subprocess.run(ipns + ["link", "set", "btd0", "up"], check=True)
    subprocess.run(ipns + ["addr", "add", "198.19.250.7/24", "dev", "btd0"], check=True)
    subprocess.run(ipns + ["route", "add", "198.19.251.128/25", "dev", "btd0"], check=True)
    out = _in_ns(scratch_ns, code).stdout.splitlines()
    assert "address 198.19.250.7/24 on btd0" in out[0]
    assert "route 198.19.251.128/25 dev btd0" in out[1]
    assert out[2] == "[]"


@needs_root
@needs_ip
def test_cli_refuses_a_range_in_use_and_builds_nothing():
    before = set(os.listdir(topology.NETNS_DIR)) if os.path.isdir(topology.NETNS_DIR) else set()
    prefix = "bt-u%d-" % os.getpid()
    cp = bench_cmd("--quick", "--subnet", "127.0.0.0/24", "--netns-prefix", prefix,
                   "--paths", "native", "--json", "", "--png", "")
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert "subnet 127.0.0.0/24 is already in use on this host" in cp.stderr
    assert "address 127.0.0.1/8 on lo" in cp.stderr and "Traceback" not in cp.stderr
    after = set(os.listdir(topology.NETNS_DIR)) if os.path.isdir(topology.NETNS_DIR) else set()
    assert not {n for n in after - before if n.startswith(prefix)}


@needs_root
@needs_ip
def test_cli_refuses_a_prefix_a_live_namespace_carries():
    # Our own pid is alive: to the bench this is another run's namespace.
    prefix = "bt-p%d-" % os.getpid()
    live = "%s%d-host" % (prefix, os.getpid())
    foreign = prefix + "someone-else"
    stale = "%s%d-cli" % (prefix, 4194304 + 1)  # above pid_max: never alive
    for n in (live, foreign, stale):
        subprocess.run(["ip", "netns", "add", n], check=True, timeout=10)
    try:
        cp = bench_cmd("--quick", "--subnet", "198.19.253.0/24", "--netns-prefix", prefix,
                       "--paths", "native", "--json", "", "--png", "")
        assert cp.returncode == 2, (cp.stdout, cp.stderr)
        assert "network namespace(s) with prefix %r already exist" % prefix in cp.stderr
        assert live in cp.stderr and foreign in cp.stderr
        names = os.listdir(topology.NETNS_DIR)
        assert stale not in names, "a stale namespace of the harness's shape stays"
        assert live in names and foreign in names, "someone else's namespace was removed"
    finally:
        for n in (live, foreign, stale):
            subprocess.run(["ip", "netns", "delete", n], capture_output=True, timeout=10)


# -- ratios and their spread ----------------------------------------------------------

def _res(a: list, b: list, metric: str = "bulk_1") -> results.Results:
    r = results.Results("quick")
    for i, (x, y) in enumerate(zip(a, b)):
        r.add("external", metric, "spliceproxy", x, i)
        r.add("external", metric, "docker-proxy", y, i)
    return r


def test_ratio_is_median_of_per_round_ratios_with_iqr():
    r = _res([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 4.0])
    st = r.ratio_stats("external", "bulk_1", "spliceproxy", "docker-proxy")
    assert st.value == pytest.approx(2.0) and st.n == 5
    assert (st.q1, st.q3) == (pytest.approx(2.0), pytest.approx(2.0))
    assert st.conclusive and st.direction == 1


def test_issue_example_is_not_a_conclusive_0_68():
    # Medians 14.6 and 14.7 with native swinging 14-44: per-round ratios
    # range widely around 1, so the ratio must not be shown as a verdict.
    sp = [14.6, 14.7, 14.5, 14.8, 14.6]
    nat = [44.0, 14.7, 21.0, 14.2, 14.0]
    r = results.Results("quick")
    for i, (x, y) in enumerate(zip(sp, nat)):
        r.add("external", "bulk_1", "spliceproxy", x, i)
        r.add("external", "bulk_1", "native", y, i)
    st = r.ratio_stats("external", "bulk_1", "spliceproxy", "native")
    assert st.q1 < 1.0 < st.q3 and not st.conclusive
    row = next(ln for ln in report.table(r).splitlines() if ln.startswith("bulk_1"))
    assert "~%.2fx [" % st.value in row


def test_medians_pointing_the_other_way_make_it_inconclusive():
    # Per-round ratios all below 1, yet the medians beside them say above.
    r = _res([1.0, 1.0, 9.0, 9.0, 9.0], [1.1, 1.1, 9.5, 9.5, 1.0])
    st = r.ratio_stats("external", "bulk_1", "spliceproxy", "docker-proxy")
    assert st.q3 < 1.0  # the spread alone would call it
    assert st.of_medians > 1.0 > st.value and not st.conclusive


def test_rounds_are_paired_by_index_not_position():
    r = results.Results("quick")
    r.add("external", "crr_rate", "spliceproxy", 10.0, 0)
    r.add("external", "crr_rate", "spliceproxy", 30.0, 2)  # round 1 failed
    for i, v in enumerate((5.0, 100.0, 15.0)):
        r.add("external", "crr_rate", "docker-proxy", v, i)
    st = r.ratio_stats("external", "crr_rate", "spliceproxy", "docker-proxy")
    assert st.n == 2 and st.value == pytest.approx(2.0)


def test_agreement_counts_opposite_conclusive_calls():
    def run(value, q1, q3):
        return {"summary": {"metrics": {"external": {"bulk_1": {"spliceproxy": {
            "ratio_spread": {"docker-proxy": {"value": value, "q1": q1, "q3": q3,
                                              "conclusive": not q1 <= 1 <= q3}}}}}}}}

    a = report.agreement([run(1.3, 1.2, 1.4), run(1.2, 1.1, 1.3), run(0.8, 0.7, 0.9),
                          run(1.0, 0.9, 1.1)])
    assert a["conclusive_per_run"] == [1, 1, 1, 0]
    assert a["conclusive_pairs"] == 3 and a["disagreements"] == 2


def test_shuffled_order_is_reproducible_from_the_seed():
    h1 = object.__new__(harness.Harness)
    h2 = object.__new__(harness.Harness)

    for h in (h1, h2):
        h.rng, h.res = random.Random(1234), results.Results("quick")
    paths = [(n, None) for n in ("native", "iptables", "spliceproxy", "docker-proxy")]
    o1 = [h1._order("external", "rr", paths) for _ in range(6)]
    o2 = [h2._order("external", "rr", paths) for _ in range(6)]
    assert o1 == o2 and len({tuple(n for n, _ in o) for o in o1}) > 1
    assert h1.res.orders["external:rr"] == [[n for n, _ in o] for o in o1]
