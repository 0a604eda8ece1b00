"""SPLICEPROXY_TRANSPARENT=1: the container sees the client's own address.

Four network namespaces of the test's own (support.transparent_env): an
outside client routed through a "host", where the engine runs, to a
"container" behind a bridge, whose servers answer every TCP connection and
UDP datagram with the address and port they saw it come from; a second
container on the same bridge is a client inside a container network.  The
engine is the installed one, started by its first stub (run in the host
namespace with ``ip netns exec``) as dockerd starts it, and it drops its
privileges as it does on a real host.

What the mode adds to the host namespace (a mangle chain and its jump, an ip
rule, a local default route in a table of its own) is compared with
snapshots of the namespace's whole routing -- ip rules, every table,
iptables and ip6tables -- taken before, during and after; the host
namespace starts with rules of its own in each, which must stay as they are.

Needs root; skips with the reason otherwise.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from spliceproxy import transparent

from support import engine as engine_support
from support import servers as srv
from support import transparent_env as te
from support.fastpath_env import in_netns, ip, tool_env

# System tools run without the sanitizer run's preloaded runtime (fastpath_env).
_tool = functools.partial(subprocess.run, env=tool_env())

pytestmark = pytest.mark.root

PORT = 8082        # the container's port
HPORT = 18082      # the published port (in the host namespace)


def _setup_host_routing(t: te.Topology, mangle: bool = True) -> None:
    """Rules the host had before the engine: they must survive untouched.
    Without mangle, the host has no mangle table (iptables-nft makes one for
    the mode's chain, and must delete it again)."""
    ip("-n", t.host, "rule", "add", "pref", "1000", "from", "198.18.82.200", "lookup", "100")
    ip("-n", t.host, "route", "add", "198.18.82.192/26", "dev", "out0", "table", "100")
    ip("-n", t.host, "-6", "rule", "add", "pref", "1000", "from", "fd00:82::1:c8",
       "lookup", "100")
    for tool in ("iptables", "ip6tables"):
        if mangle:
            _tool(["ip", "netns", "exec", t.host, tool, "-w", "-t", "mangle", "-A",
                            "PREROUTING", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"],
                           check=True)
        _tool(["ip", "netns", "exec", t.host, tool, "-w", "-A", "FORWARD", "-p",
                        "udp", "--dport", "9", "-j", "ACCEPT"], check=True)


def _topology(mangle: bool):
    reason = te.skip_reason()
    if reason:
        pytest.skip(reason)
    with te.Topology("tpe", "198.18.82", "198.18.83", "fd00:82::1", "fd00:82::2", PORT) as t:
        _setup_host_routing(t, mangle)
        yield t


@pytest.fixture
def topo():
    yield from _topology(True)


@pytest.fixture
def bare_topo():
    yield from _topology(False)


@pytest.fixture
def engine_host():
    hosts = []

    def make(transparent_on: bool = True) -> engine_support.EngineHost:
        env = {"SPLICEPROXY_TRANSPARENT": "1"} if transparent_on else {}
        h = engine_support.EngineHost(srv.installed_proxy_path(), extra_env=env,
                                      prefix="tpe-")
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()


def publish(h, t: te.Topology, proto: str, family: int = 4, container: str | None = None,
            env: dict | None = None):
    """A stub in the host namespace publishing HPORT (+ 0 or 1 for IPv6) on the
    wildcard of the family to the container."""
    host_ip = "0.0.0.0" if family == 4 else "::"
    cont = container or (t.cont4 if family == 4 else t.cont6)
    return h.start(proto, PORT, host_port=HPORT + (family == 6), host_ip=host_ip,
                   container_ip=cont, wrap=("ip", "netns", "exec", t.host), env=env)


def ours(t: te.Topology, before: dict) -> dict:
    """The difference to before, checked to be exactly the mode's own lines."""
    diff = te.difference(before, te.routing(t.host))
    for key, (gone, new) in diff.items():
        assert not gone, "%s lost %r" % (key, gone)
        if key == "nft":
            continue  # iptables-nft's rules again, in nft's words: checked above
        for line in new:
            assert (str(transparent.TABLE) in line or transparent.CHAIN in line
                    or line in ("*mangle", "COMMIT") or re.match(r":[A-Z]+ ACCEPT ", line)), \
                "%s: %r is not the mode's" % (key, line)
    return diff


def stop_engine(h) -> None:
    pid = h.engine_pid()
    assert pid
    os.kill(pid, signal.SIGTERM)
    assert srv.wait_for(lambda: not engine_support.alive(pid), 10.0), "engine did not stop"


def test_tcp_and_udp_see_the_client(topo, engine_host):
    t = topo
    root_before = te.routing(None)
    before = te.routing(t.host)
    h = engine_host()
    publish(h, t, "tcp")
    publish(h, t, "udp")
    publish(h, t, "tcp", 6)
    publish(h, t, "udp", 6)
    during = ours(t, before)
    # One rule per family, the route per family, chain + jump per family.
    assert len(during["rule-4"][1]) == 1 and len(during["rule-6"][1]) == 1, during
    assert len(during["route-4"][1]) == 1 and len(during["route-6"][1]) == 1, during

    for host, client in ((t.host4, t.client4), (t.host6, t.client6)):
        hp = HPORT + (":" in host)
        seen_ip, seen_port, mine = t.in_client(lambda h_=host, p=hp: te.ask_tcp(h_, p))[0]
        assert (seen_ip, seen_port) == (client, mine)
        seen_ip, seen_port, mine = t.in_client(lambda h_=host, p=hp: te.ask_udp(h_, p))
        assert (seen_ip, seen_port) == (client, mine)

    st = h.status()
    assert st["engine"]["transparent"]["on"] is True
    assert st["engine"]["transparent"]["rules"] is True
    assert st["engine"]["transparent"]["mappings"] == 4
    assert all(m["transparent"] for m in st["mappings"])
    c = st["engine"]["counters"]
    assert c["tcp_transparent"] == 2 and c["udp_flows_transparent"] == 2, c
    assert c["transparent_fallbacks"] == 0
    text = h.status_output()
    assert "transparent mode on" in text

    for lp in h.stubs:
        lp.proc.terminate()
    for lp in h.stubs:
        lp.proc.wait(10)
    # With the last mapping the engine removed everything it added.
    assert srv.wait_for(lambda: te.routing(t.host) == before, 10.0), \
        te.difference(before, te.routing(t.host))
    assert te.routing(None) == root_before


def test_200_sequential_connections(topo, engine_host):
    t = topo
    h = engine_host()
    publish(h, t, "tcp")
    got = t.in_client(lambda: te.ask_tcp(t.host4, HPORT, 200))
    assert len(got) == 200
    wrong = [g for g in got if (g[0], g[1]) != (t.client4, g[2])]
    assert not wrong, wrong[:5]
    assert h.status()["engine"]["counters"]["tcp_transparent"] == 200


def test_unset_the_container_sees_the_host(topo, engine_host):
    t = topo
    before = te.routing(t.host)
    h = engine_host(transparent_on=False)
    publish(h, t, "tcp")
    publish(h, t, "udp")
    seen_ip, _, _ = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
    assert seen_ip == t.bridge4
    seen_ip, _, _ = t.in_client(lambda: te.ask_udp(t.host4, HPORT))
    assert seen_ip == t.bridge4
    assert te.routing(t.host) == before  # nothing added
    st = h.status()
    assert st["engine"]["transparent"]["on"] is False
    assert st["engine"]["counters"]["tcp_transparent"] == 0
    assert not any(m["transparent"] for m in st["mappings"])


def test_normal_stop_removes_everything(topo, engine_host):
    t = topo
    before = te.routing(t.host)
    h = engine_host()
    publish(h, t, "tcp")
    publish(h, t, "udp", 6)
    assert ours(t, before)
    stop_engine(h)
    assert te.routing(t.host) == before, te.difference(before, te.routing(t.host))
    assert "policy route removed" in h.log()


def test_a_mangle_table_it_made_goes_too(bare_topo, engine_host):
    t = bare_topo
    before = te.routing(t.host)
    assert not any(ln.startswith("*mangle") for ln in before.get("iptables-save", []))
    h = engine_host()
    publish(h, t, "tcp")
    publish(h, t, "udp", 6)
    assert ours(t, before)
    seen_ip, _, _ = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
    assert seen_ip == t.client4
    stop_engine(h)
    assert te.routing(t.host) == before, te.difference(before, te.routing(t.host))


def test_after_kill_9_the_next_engine_cleans_up(topo, engine_host):
    t = topo
    before = te.routing(t.host)
    h = engine_host()
    publish(h, t, "tcp")
    during = te.routing(t.host)
    assert during != before
    pid = h.engine_pid()
    os.kill(pid, signal.SIGKILL)
    assert srv.wait_for(lambda: not engine_support.alive(pid), 5.0)
    assert te.routing(t.host) == during  # left behind
    # The stub starts the next engine, which re-registers the mapping: the
    # stale set is removed and one set of its own added (no duplicates).
    assert srv.wait_for(lambda: h.engine_pid() not in (None, pid), 10.0)
    assert srv.wait_for(lambda: h.mapping(h.stubs[0].pid) is not None, 10.0)
    assert te.routing(t.host) == during
    seen_ip, seen_port, mine = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
    assert (seen_ip, seen_port) == (t.client4, mine)
    assert "removed what a previous engine left" in h.log()
    stop_engine(h)
    assert te.routing(t.host) == before, te.difference(before, te.routing(t.host))


def test_fallbacks_are_logged_once(topo, engine_host):
    t = topo
    h = engine_host()
    publish(h, t, "tcp")
    publish(h, t, "tcp", 6, container=t.cont4)  # IPv6 clients, IPv4 container
    # A container on the same bridge: its peer would answer it directly.
    for _ in range(2):
        seen_ip, _, _ = t.in_neighbour(lambda: te.ask_tcp(t.bridge4, HPORT))[0]
        assert seen_ip == t.bridge4
    # A client on the host: local and loopback addresses are never bound.
    for _ in range(2):
        seen_ip, _, _ = t.in_host(lambda: te.ask_tcp(t.host4, HPORT))[0]
        assert seen_ip == t.bridge4
        seen_ip, _, _ = t.in_host(lambda: te.ask_tcp("127.0.0.1", HPORT))[0]
        assert seen_ip == t.bridge4
    # IPv6 client of an IPv4 container: the mapping is not transparent.
    seen_ip, _, _ = t.in_client(lambda: te.ask_tcp(t.host6, HPORT + 1))[0]
    assert seen_ip == t.bridge4
    # The outside client still keeps its address.
    seen_ip, _, _ = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
    assert seen_ip == t.client4

    st = h.status()
    assert st["engine"]["counters"]["transparent_fallbacks"] == 6
    assert st["engine"]["counters"]["tcp_transparent"] == 1
    assert [m["transparent"] for m in sorted(st["mappings"], key=lambda m: m["id"])] == \
        [True, False]
    log = h.log()
    for why in ("inside a container network", "local to the host",
                "loopback, link-local", "its clients are IPv6 and the container IPv4"):
        assert log.count(why) == 1, (why, log)


def test_standalone_refuses(tmp_path):
    env = srv.env_without_settings({"SPLICEPROXY_ENGINE": "0", "SPLICEPROXY_TRANSPARENT": "1"})
    from spliceproxy.bench.launch import proxy_argv, spawn

    lp = spawn(proxy_argv(srv.installed_proxy_path(), "tcp", "127.0.0.1",
                          srv.free_port(), "127.0.0.1", 9), env=env, check=False, timeout=10)
    lp.proc.wait(10)
    assert lp.proc.returncode == 1
    assert lp.status.startswith(b"1\n")
    assert lp.status.startswith(b"1\nSPLICEPROXY_TRANSPARENT works in engine mode only: ")


def test_the_engine_keeps_only_net_admin(topo, engine_host):
    t = topo
    h = engine_host()
    publish(h, t, "tcp")
    pid = h.engine_pid()
    status = srv.proc_status(pid)
    assert status["Uid"].split()[0] != "0"
    want = (1 << 10) | (1 << 12)  # CAP_NET_BIND_SERVICE, CAP_NET_ADMIN
    assert int(status["CapEff"], 16) == want
    assert int(status["CapBnd"], 16) == want


@pytest.mark.parametrize("bridge_nf", ["0", "1"])
def test_strict_rp_filter_and_bridge_netfilter(topo, engine_host, bridge_nf):
    """docs/transparent.md: nothing to change for either."""
    t = topo
    for ns in (t.host, t.cont):
        _tool(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv4.conf.all.rp_filter=1"], check=True)
    nf = _tool(["ip", "netns", "exec", t.host, "sysctl", "-qw",
                         "net.bridge.bridge-nf-call-iptables=" + bridge_nf,
                         "net.bridge.bridge-nf-call-ip6tables=" + bridge_nf])
    if nf.returncode != 0:
        pytest.skip("no bridge netfilter in this kernel")
    h = engine_host()
    publish(h, t, "tcp")
    publish(h, t, "udp")
    seen_ip, seen_port, mine = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
    assert (seen_ip, seen_port) == (t.client4, mine)
    seen_ip, seen_port, mine = t.in_client(lambda: te.ask_udp(t.host4, HPORT))
    assert (seen_ip, seen_port) == (t.client4, mine)
    # A neighbour on the bridge still falls back, its traffic bridged past the rule.
    seen_ip, _, _ = t.in_neighbour(lambda: te.ask_tcp(t.bridge4, HPORT))[0]
    assert seen_ip == t.bridge4


def test_nftables_where_there_is_no_iptables(topo, engine_host):
    """A host with nft and no iptables: the mark rule is a table of the
    engine's own (inet spliceproxy), gone again after the stop."""
    nft = shutil.which("nft")
    if nft is None:
        pytest.skip("needs nft")
    t = topo
    # The engine's PATH has ip and nft, no iptables (a directory its
    # unprivileged user can reach).
    bindir = _path_of({"ip": shutil.which("ip"), "nft": nft})
    before = te.routing(t.host)
    h = engine_host()
    h.env["PATH"] = bindir
    try:
        publish(h, t, "tcp")
        publish(h, t, "udp", 6)
        _nft_checks(t, h, nft, before)
    finally:
        shutil.rmtree(bindir)


def _nft_checks(t, h, nft: str, before: dict) -> None:
    st = h.status()["engine"]["transparent"]
    assert st["firewall"] == "nft" and st["rules"], st
    ruleset = _tool(["ip", "netns", "exec", t.host, nft, "list", "table", "inet",
                              transparent.NFT_TABLE], capture_output=True, text=True)
    assert "socket transparent 1" in ruleset.stdout, ruleset
    seen_ip, seen_port, mine = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
    assert (seen_ip, seen_port) == (t.client4, mine)
    seen_ip, seen_port, mine = t.in_client(lambda: te.ask_udp(t.host6, HPORT + 1))
    assert (seen_ip, seen_port) == (t.client6, mine)
    stop_engine(h)
    assert te.routing(t.host) == before, te.difference(before, te.routing(t.host))


def _path_of(links: dict[str, str]) -> str:
    """A directory of symlinks the engine's unprivileged user can reach."""
    bindir = tempfile.mkdtemp(prefix="tpe-bin-")
    os.chmod(bindir, 0o755)
    for name, path in links.items():
        os.symlink(path, os.path.join(bindir, name))
    return bindir


def _legacy_save(ns: str) -> str:
    return "".join(_tool(["ip", "netns", "exec", ns, tool], capture_output=True,
                                  text=True).stdout
                   for tool in ("iptables-legacy-save", "ip6tables-legacy-save"))


@pytest.mark.parametrize("root", [True, False], ids=["root", "unprivileged"])
def test_iptables_legacy(topo, engine_host, root):
    """Legacy iptables: served by an engine that stays root; an unprivileged
    one cannot take its lock file and stays on the plain relay, saying why."""
    tools = ("iptables-legacy", "ip6tables-legacy", "iptables-legacy-save",
             "ip6tables-legacy-save")
    if not all(shutil.which(x) for x in tools):
        pytest.skip("needs iptables-legacy")
    t = topo
    links = {x: shutil.which(x) for x in tools}
    links.update(iptables=shutil.which("iptables-legacy"), ip=shutil.which("ip"))
    bindir = _path_of(links)
    try:
        h = engine_host()
        h.env["PATH"] = bindir
        if root:
            h.env["SPLICEPROXY_KEEP_PRIVILEGES"] = "1"
        publish(h, t, "tcp")
        seen_ip, _, _ = t.in_client(lambda: te.ask_tcp(t.host4, HPORT))[0]
        st = h.status()["engine"]["transparent"]
        assert st["firewall"] == "iptables-legacy"
        if not root:
            assert seen_ip == t.bridge4 and not st["rules"]
            assert "iptables-legacy needs root" in h.log()
            return
        assert seen_ip == t.client4 and st["rules"]
        assert transparent.CHAIN in _legacy_save(t.host)
        stop_engine(h)
        # Its chain and jump are gone (legacy tables, once used in a
        # namespace, stay registered, empty: x_tables cannot drop them).
        left = _legacy_save(t.host)
        assert transparent.CHAIN not in left and "spliceproxy" not in left, left
        after = te.routing(t.host)
        assert not any(str(transparent.TABLE) in ln
                       for key in ("rule-4", "rule-6", "route-4", "route-6")
                       for ln in after[key]), after
    finally:
        shutil.rmtree(bindir)


def test_a_table_changed_meanwhile_is_not_deleted():
    """delete_empty_table's batch carries the generation the emptiness was
    seen at: a rule added in between makes the kernel refuse it."""
    reason = te.skip_reason()
    if reason:
        pytest.skip(reason)
    ns = "tpe-gen-%d" % os.getpid()
    ip("netns", "add", ns)
    try:
        def in_ns(*argv):
            _tool(["ip", "netns", "exec", ns, *argv], check=True)

        def save() -> str:
            return _tool(["ip", "netns", "exec", ns, "iptables-save"],
                                  capture_output=True, text=True).stdout

        in_ns("iptables", "-w", "-t", "mangle", "-N", "X")
        in_ns("iptables", "-w", "-t", "mangle", "-X", "X")

        def racing() -> bool:
            in_ns("iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp",
                  "--dport", "9", "-j", "ACCEPT")
            return True

        def delete(empty) -> bool:
            return in_netns(ns, lambda: transparent.delete_empty_table(
                socket.AF_INET, "mangle", empty))

        if "*mangle" not in save():
            pytest.skip("iptables is not iptables-nft")
        assert delete(racing) is False
        assert "--dport 9" in save()
        in_ns("iptables", "-w", "-t", "mangle", "-F")
        assert delete(lambda: True) is True
        assert "*mangle" not in save()
    finally:
        ip("netns", "del", ns, check=False)
