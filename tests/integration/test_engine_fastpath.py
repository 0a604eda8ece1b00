"""The fast path wired into the host engine (SPLICEPROXY_FASTPATH in engine mode).

The engine is the installed launcher's, started by its first stub exactly as
dockerd starts proxies, with SPLICEPROXY_FASTPATH=1 and
SPLICEPROXY_FASTPATH_CGROUP naming a child cgroup made for each test: only
the client -- a process of its own, moved into that cgroup before exec -- is
ever rewritten, nothing else on the host.  The "container" is a network
namespace behind a veth pair (198.18.248.1 here, 198.18.248.2 there;
2001:2:0:f8::1 and ::2, from the IPv6 benchmarking block) with TCP and UDP
echo servers on both addresses, made in a thread that entered it
(support.fastpath_env).

Whether a connection went straight to the container or through the relay is
read from the client's own address: the relay's listener is on 127.0.0.1 (or
::1), so a relayed client's getsockname() is that, a rewritten one's is the
host's address on the container network.

Needs root, cgroup v2 and a kernel with the hooks; skips with the reason
otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess

import pytest

from spliceproxy import fastpath
from spliceproxy.bench import procs

from support import cc as cc_flags
from support import engine as engine_support
from support import fastpath_env as fe
from support import servers as srv

pytestmark = pytest.mark.root

TAG = "%d" % os.getpid()
CPORT = 7017
# The container: fw-c-<pid>.
NET = fe.Container("fw", "198.18.248", "2001:2:0:f8", CPORT)
NS, VETH_HOST = NET.ns, NET.veth_host
HOST4, CONT4, HOST6, CONT6 = NET.host4, NET.cont4, NET.host6, NET.cont6
TIMEOUT = fe.TIMEOUT
ip = fe.ip

if fe.skip_reason():
    pytest.skip(fe.skip_reason(), allow_module_level=True)


container, cgroup = fe.fixtures(NET, "fw-test")


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind():
    yield
    fe.nothing_left_behind("fw", ("fw-test-%s-" % TAG,))


class Engine(engine_support.EngineHost):
    """A control socket of the test's own with the fast path on, attached to
    the test's cgroup; its stubs map to the container's CPORT."""

    def __init__(self, proxy_path: str, cgroup: str):
        super().__init__(proxy_path, idle_exit="1s", prefix="fw-",
                         extra_env={"SPLICEPROXY_FASTPATH": "1",
                                    "SPLICEPROXY_FASTPATH_CGROUP": cgroup})
        self.cgroup = cgroup

    def start(self, host_ip: str = "127.0.0.1", proto: str = "tcp", container: str = CONT4,
              wrap: tuple[str, ...] = ()):
        return super().start(proto, CPORT, host_ip=host_ip, container_ip=container, wrap=wrap)


@pytest.fixture
def engine(proxy_path, cgroup):
    e = Engine(proxy_path, cgroup)
    yield e
    e.close()
    # The programs go with their holder: nothing stays attached to the cgroup.
    assert srv.wait_for(lambda: sum(fastpath.attached(cgroup).values()) == 0, TIMEOUT), \
        fastpath.attached(cgroup)


def client(cgroup: str | None, host: str, port: int, size: int = 1) -> dict:
    return fe.client(cgroup, "tcp", host, port, size)


def _mapping(doc: dict, port: int) -> dict:
    found = [m for m in doc["mappings"] if m["host"].endswith(":%d" % port)]
    assert len(found) == 1, doc
    return found[0]


def _active(e: Engine) -> None:
    """The engine's one line about the fast path says it is active (or skip)."""
    assert srv.wait_for(lambda: "fast path" in e.log(), 5.0), e.log()
    lines = [ln for ln in e.log().splitlines() if "fast path" in ln]
    if "fast path not active" in lines[0]:
        if any(k in lines[0] for k in ("(kernel)", "(permission)", "(cgroup)", "(module)")):
            pytest.skip(lines[0])
        pytest.fail(lines[0])
    assert "fast path active" in lines[0] and e.cgroup in lines[0], lines


def test_client_in_the_cgroup_goes_straight_to_the_container_and_is_counted(
        container, engine, cgroup):
    stub = engine.start()
    _active(engine)
    before = container.accepted
    got = client(cgroup, "127.0.0.1", stub.port, size=1 << 20)
    assert "error" not in got, got
    assert got["echo"], "data was not echoed by the container: %r" % got
    assert got["peer"] == ["127.0.0.1", stub.port]   # the address dialled
    assert got["sock"][0] == HOST4                     # not the relay's loopback listener
    assert container.accepted == before + 1
    doc = engine.status()
    assert doc["engine"]["fastpath"] == {"active": True, "reason": "", "cgroup": cgroup}
    m = _mapping(doc, stub.port)
    assert m["fastpath"]["connections"] == 1, m
    assert m["counters"]["tcp_accepted"] == 0, m  # the relay never saw it
    got = client(cgroup, "127.0.0.1", stub.port, size=4096)
    assert got["echo"] and got["sock"][0] == HOST4, got
    assert _mapping(engine.status(), stub.port)["fastpath"]["connections"] == 2

    # A process outside the cgroup (this one) is relayed, and not counted.
    got = client(None, "127.0.0.1", stub.port, size=4096)
    assert got["echo"] and got["sock"][0] == "127.0.0.1", got
    m = _mapping(engine.status(), stub.port)
    assert (m["fastpath"]["connections"], m["counters"]["tcp_accepted"]) == (2, 1), m

    # The table and the exposition format show the count too.
    table = engine.status_output()
    head, row = table.splitlines()[0], [ln for ln in table.splitlines()
                                       if ":%d" % stub.port in ln][0]
    col = head.index("FAST PATH")
    assert row[col:].split()[0] == "2", table
    prom = engine.status_output("--prometheus")
    assert [ln for ln in prom.splitlines()
            if ln.startswith("spliceproxy_mapping_fastpath_connections_total{")
            and ('host_port="%d"' % stub.port) in ln][0].endswith(" 2"), prom
    lines = [ln for ln in engine.log().splitlines() if "fast path" in ln]
    assert len(lines) == 1, lines


def test_removed_mapping_is_refused_never_rewritten(container, engine, cgroup):
    stub = engine.start()
    _active(engine)
    assert client(cgroup, "127.0.0.1", stub.port, size=64)["sock"][0] == HOST4
    before = container.accepted
    assert stub.stop(signal.SIGTERM) == 0
    got = client(cgroup, "127.0.0.1", stub.port, size=64)
    assert got.get("error") == errno.ECONNREFUSED, got
    assert container.accepted == before


def test_killed_engine_never_leaves_a_stale_rewrite(container, engine, cgroup):
    stub = engine.start()
    _active(engine)
    assert client(cgroup, "127.0.0.1", stub.port, size=64)["sock"][0] == HOST4
    old = engine.note_engine()
    assert old
    os.kill(old, signal.SIGKILL)
    assert srv.wait_for(lambda: not procs.alive(old), TIMEOUT)
    # At once: the programs went with the engine; the connect waits in the
    # backlog of the listener the stub kept, for the engine it starts.
    before = container.accepted
    got = client(cgroup, "127.0.0.1", stub.port, size=4096)
    assert "error" not in got and got["echo"], got
    assert got["peer"] == ["127.0.0.1", stub.port]
    new = srv.wait_for(lambda: engine.note_engine() not in (None, old) and engine.note_engine(),
                       TIMEOUT)
    assert new, "no new engine"
    m = srv.wait_for(lambda: _mapping(engine.status(), stub.port), TIMEOUT)
    fast = (m["fastpath"] or {}).get("connections", 0)
    relayed = m["counters"]["tcp_accepted"]
    # Either the relay took it, or the new engine's own programs rewrote it
    # (then counted there): never the dead engine's entries.
    if got["sock"][0] == "127.0.0.1":
        assert (fast, relayed) == (0, 1), m
    else:
        assert (fast, relayed) == (1, 0), m
    assert container.accepted == before + 1
    # The new engine serves the fast path again, for its own mapping.
    got = client(cgroup, "127.0.0.1", stub.port, size=64)
    assert got["echo"] and got["sock"][0] == HOST4, got
    assert stub.stop(signal.SIGTERM) == 0


def test_engine_exit_leaves_nothing_attached(container, engine, cgroup):
    stub = engine.start()
    _active(engine)
    pid = engine.note_engine()
    assert set(fastpath.attached(cgroup).values()) == {1}
    assert stub.stop(signal.SIGTERM) == 0
    # Idle for SPLICEPROXY_ENGINE_IDLE_EXIT (1s), it exits on its own.
    assert srv.wait_for(lambda: not procs.alive(pid), TIMEOUT)
    assert srv.wait_for(lambda: sum(fastpath.attached(cgroup).values()) == 0, TIMEOUT)
    assert "spliceproxy engine %d exiting" % pid in engine.log()


def test_wildcard_mapping_follows_local_addresses(container, engine, cgroup):
    extra = "198.18.249.1"
    stub = engine.start(host_ip="0.0.0.0")
    _active(engine)
    for host in ("127.0.0.1", HOST4):
        got = client(cgroup, host, stub.port, size=4096)
        assert got["echo"] and got["peer"] == [host, stub.port], got
        assert got["sock"][0] == HOST4, got
    m = _mapping(engine.status(), stub.port)
    assert "0.0.0.0" not in m["fastpath"]["addresses"]
    assert extra not in m["fastpath"]["addresses"]
    try:
        # An address that appears gets an entry from the address events...
        ip("addr", "add", extra + "/32", "dev", VETH_HOST)
        assert srv.wait_for(lambda: extra in _mapping(engine.status(), stub.port)
                            ["fastpath"]["addresses"], TIMEOUT)
        got = client(cgroup, extra, stub.port, size=64)
        assert got["echo"] and got["sock"][0] == HOST4, got
    finally:
        ip("addr", "del", extra + "/32", "dev", VETH_HOST, check=False)
    # ...and loses it when it goes: the next connect to it is refused (no
    # address), never rewritten.
    assert srv.wait_for(lambda: extra not in _mapping(engine.status(), stub.port)
                        ["fastpath"]["addresses"], TIMEOUT)
    assert _mapping(engine.status(), stub.port)["fastpath"]["connections"] == 3


def test_udp_datagrams_go_straight_to_the_container_and_are_counted(container, engine, cgroup):
    stub = engine.start(proto="udp")
    _active(engine)
    before = container.udp4.count
    got = fe.client(cgroup, "udp", "127.0.0.1", stub.port, size=1200)
    assert got.get("echo"), got
    assert got["from"] == ["127.0.0.1", stub.port]  # the address the client sent to
    # From the client's own port (its route's source address), not the relay's.
    sources = [list(a) for a, _ in container.udp4.snapshot()[before:]]
    assert sources == [[HOST4, got["sock"][1]]], (sources, got)
    m = _mapping(engine.status(), stub.port)
    assert m["fastpath"]["datagrams"] == 1, m
    assert m["counters"]["udp_flows_created"] == 0, m
    table = engine.status_output()
    head, row = table.splitlines()[0], [ln for ln in table.splitlines()
                                       if ":%d" % stub.port in ln][0]
    assert row[head.index("FAST PATH"):].split()[0] == "1", table


# ---------------------------------------------------------------------------
# IPv6 through the engine


@pytest.mark.parametrize("host_ip,dial", [("::1", "::1"), ("::", "::1"), ("::", HOST6)])
def test_ipv6_mapping_to_an_ipv6_container_takes_the_fast_path(container, engine, cgroup,
                                                               host_ip, dial):
    stub = engine.start(host_ip=host_ip, container=CONT6)
    _active(engine)
    before = container.accepted
    got = client(cgroup, dial, stub.port, size=1 << 20)
    assert "error" not in got, got
    assert got["echo"], "data was not echoed by the container: %r" % got
    assert got["peer"] == [dial, stub.port]   # the address dialled
    assert got["sock"][0] == HOST6             # the route's source: not the relay's listener
    assert container.accepted == before + 1
    m = _mapping(engine.status(), stub.port)
    assert (m["fastpath"]["connections"], m["counters"]["tcp_accepted"]) == (1, 0), m
    if host_ip == "::":
        # One entry per local IPv6 address, never the wildcard, no link-local.
        addrs = m["fastpath"]["addresses"]
        assert "::1" in addrs and HOST6 in addrs and "::" not in addrs, addrs
        assert not any(a.startswith("fe80") for a in addrs), addrs
    # The same client outside the cgroup is relayed: the relay still serves it.
    got = client(None, dial, stub.port, size=4096)
    assert got["echo"] and got["peer"] == [dial, stub.port], got
    if dial == "::1":
        assert got["sock"][0] == "::1", got
    m = _mapping(engine.status(), stub.port)
    assert (m["fastpath"]["connections"], m["counters"]["tcp_accepted"]) == (1, 1), m


def test_ipv6_listener_to_an_ipv4_container_stays_on_the_relay(container, engine, cgroup):
    stub = engine.start(host_ip="::1", container=CONT4)
    _active(engine)
    before = container.accepted
    got = client(cgroup, "::1", stub.port, size=1 << 16)
    assert "error" not in got and got["echo"], got
    assert got["peer"] == ["::1", stub.port]
    assert got["sock"][0] == "::1", got        # it reached the relay's listener
    assert container.accepted == before + 1    # which dialled the IPv4 container
    m = _mapping(engine.status(), stub.port)
    # Counted as relayed; the fast path does not serve this mapping at all.
    assert m["counters"]["tcp_accepted"] == 1, m
    assert m["fastpath"] is None, m
    table = engine.status_output()
    head, row = table.splitlines()[0], [ln for ln in table.splitlines()
                                       if ":%d" % stub.port in ln][0]
    assert row[head.index("FAST PATH"):].split()[0] == "-", table
    assert srv.wait_for(lambda: "IPv6 clients to an IPv4 container stay on the relay"
                        in engine.log(), 5.0), engine.log()


# ---------------------------------------------------------------------------
# A refused map update: the mapping stays on the relay


@pytest.fixture(scope="module")
def refuse_bpf(tmp_path_factory) -> str:
    """refuse_bpf.c built now: runs a command with bpf() map operations failing
    with EPERM, as kernels before 6.5 fail them after the privilege drop."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("gcc is not installed: the seccomp launcher cannot be built")
    out = tmp_path_factory.mktemp("refuse") / "refuse_bpf"
    src = os.path.join(os.path.dirname(__file__), "refuse_bpf.c")
    r = subprocess.run([cc, *cc_flags.cflags(), "-O2", "-o", str(out), src],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "building refuse_bpf.c failed:\n" + r.stderr
    return str(out)


def _seccomp_mode(pid: int) -> str:
    return srv.proc_status(pid).get("Seccomp", "?")


# update: only map updates are refused; after-load: every bpf() command but
# those loading and attaching need (lookups for the status too), as before 6.5.
@pytest.mark.parametrize("refused", ["update", "after-load"])
def test_refused_map_update_leaves_the_mapping_on_the_relay(container, engine, cgroup,
                                                            refuse_bpf, refused):
    wrap = (refuse_bpf, refused)
    stubs = [engine.start(wrap=wrap), engine.start(host_ip="0.0.0.0", wrap=wrap)]
    _active(engine)  # the programs loaded and attached: no map update needed for that
    pid = engine.note_engine()
    assert pid and _seccomp_mode(pid) == "2", "premise: the engine runs under the filter"
    for stub in stubs:
        before = container.accepted
        got = client(cgroup, "127.0.0.1", stub.port, size=1 << 16)
        assert "error" not in got and got["echo"], got
        assert got["peer"] == ["127.0.0.1", stub.port]
        assert got["sock"][0] == "127.0.0.1", got  # the relay's listener, not rewritten
        assert container.accepted == before + 1
        m = _mapping(engine.status(), stub.port)
        assert m["fastpath"] is None and m["counters"]["tcp_accepted"] == 1, m
    doc = engine.status()
    assert doc["engine"]["fastpath"]["active"] is True, doc["engine"]
    # One line per mapping says so, with the reason; nothing else about it.
    log = engine.log()
    for stub in stubs:
        lines = [ln for ln in log.splitlines()
                 if "fast path" in ln and ":%d" % stub.port in ln]
        assert len(lines) == 1, log
        assert "not serving this mapping (operation not permitted)" in lines[0], lines
        assert "take the relay" in lines[0], lines
    assert "Traceback" not in log, log
    # ...and nothing more about the fast path than that and the engine's line.
    assert len([ln for ln in log.splitlines() if "fast path" in ln]) == 1 + len(stubs), log
    # Gone: refused at once, never rewritten to the container.
    before = container.accepted
    for stub in stubs:
        assert stub.stop(signal.SIGTERM) == 0
        got = client(cgroup, "127.0.0.1", stub.port, size=64)
        assert got.get("error") == errno.ECONNREFUSED, got
    assert container.accepted == before
