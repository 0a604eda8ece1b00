"""The kernel fast path (spliceproxy.fastpath) over real sockets and namespaces.

Topology: a "container" network namespace joined to this one by a veth pair
(198.18.208.1 here, 198.18.208.2 there; 2001:2:0:d0::1 and ::2, from the
IPv6 benchmarking block), with TCP and UDP echo servers that run in threads
which entered the container's namespace (support.fastpath_env).  The
programs are attached to a child cgroup made for each test, and only the
client -- a separate process (client script below) -- is moved into it, so
nothing else on the host is ever rewritten.  The relay is played by a
listener in this process that answers RELAY: a reply that echoes the payload
came from the container.

Needs root, cgroup v2 and a kernel with the hooks; skips with the reason
otherwise.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from spliceproxy import fastpath

from support import fastpath_env as fe
from support import servers as srv

pytestmark = pytest.mark.root

CPORT = 7007                        # container port
# The container (fp-c-<pid>) and an unrelated namespace (fp-o-<pid>).
NET = fe.Container("fp", "198.18.208", "2001:2:0:d0", CPORT, other=True)
NS, OTHER_NS = NET.ns, NET.other_ns
HOST4, CONT4, HOST6, CONT6 = NET.host4, NET.cont4, NET.host6, NET.cont6
RELAY = b"RELAY"
TIMEOUT = fe.TIMEOUT
ip, in_netns = fe.ip, fe.in_netns

if fe.skip_reason():
    pytest.skip(fe.skip_reason(), allow_module_level=True)

CGROOT = fastpath.default_cgroup_path()


container, cgroup = fe.fixtures(NET, "fp-test")


@pytest.fixture
def fp(cgroup):
    got = fastpath.load(cgroup)
    if not got:
        if got.kind in ("kernel", "permission", "cgroup", "module"):
            pytest.skip(str(got))
        pytest.fail("%s\n%s" % (got, got.log))
    try:
        yield got
    finally:
        got.close()
        assert sum(fastpath.attached(cgroup).values()) == 0


@pytest.fixture(autouse=True, scope="module")
def nothing_left_behind():
    yield
    fe.nothing_left_behind("fp", ("fp-test-%d-" % os.getpid(), "spb-fastpath-%d" % os.getpid()),
                           programs=True)


class Relay:
    """Stand-in for the relay's listener on a host address: answers RELAY."""

    def __init__(self, host: str, kind: int = socket.SOCK_STREAM, port: int = 0,
                 sock: socket.socket | None = None):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = sock or socket.socket(fam, kind)
        if sock is None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        self.kind = self.sock.type
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        if self.kind == socket.SOCK_STREAM:
            self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                if self.kind == socket.SOCK_STREAM:
                    c, _ = self.sock.accept()
                    self.hits += 1
                    with c:  # read the request to its end, then answer
                        c.settimeout(TIMEOUT)
                        while c.recv(1 << 16):
                            pass
                        c.sendall(RELAY)
                else:
                    _, peer = self.sock.recvfrom(1 << 16)
                    if peer is None:  # shut down
                        return
                    self.hits += 1
                    self.sock.sendto(RELAY, peer)
            except OSError:
                return

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def relays():
    made: list[Relay] = []

    def make(*a, **kw) -> Relay:
        r = Relay(*a, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


client = fe.client


# ---------------------------------------------------------------------------
# Through the fast path


@pytest.mark.parametrize("host,cont", [("127.0.0.1", CONT4), ("::1", CONT6)])
def test_tcp_connect_reaches_the_container_and_shows_the_dialled_address(
        container, fp, cgroup, relays, host, cont):
    relay = relays(host)
    m = fp.add_mapping("tcp", host, relay.port, cont, CPORT, relay.sock)
    assert m.addresses == [host]
    before = container.accepted
    got = client(cgroup, "tcp", host, relay.port, size=1 << 20)
    assert "error" not in got, got
    assert got["echo"], "data was not echoed by the container: %r" % got
    assert got["peer"] == [host, relay.port]
    assert got["sock"][0] == (HOST4 if cont == CONT4 else HOST6)  # documented: the route's source
    assert container.accepted == before + 1 and relay.hits == 0
    assert fp.stats()[m.id]["connections"] == 1


@pytest.mark.parametrize("host,cont", [("127.0.0.1", CONT4), ("::1", CONT6)])
def test_udp_sendto_and_recvfrom_through_the_fast_path(container, fp, cgroup, relays, host, cont):
    relay = relays(host, socket.SOCK_DGRAM)
    m = fp.add_mapping("udp", host, relay.port, cont, CPORT, relay.sock)
    got = client(cgroup, "udp", host, relay.port, size=1200)
    assert got.get("echo"), got
    assert got["from"] == [host, relay.port]
    got = client(cgroup, "udpc", host, relay.port, size=1200)
    assert got.get("echo"), got
    assert got["peer"] == [host, relay.port]
    assert relay.hits == 0
    st = fp.stats()[m.id]
    assert (st["datagrams"], st["connections"]) == (1, 1)


def test_wildcard_mapping_serves_every_local_address_and_no_wildcard(
        container, fp, cgroup, relays):
    relay = relays("0.0.0.0")
    m = fp.add_mapping("tcp", "0.0.0.0", relay.port, CONT4, CPORT, relay.sock)
    assert "127.0.0.1" in m.addresses and HOST4 in m.addresses
    assert "0.0.0.0" not in m.addresses
    entries = fp.programs.entries()
    assert all(key[1] != bytes(4) for key, _ in entries)
    for host in ("127.0.0.1", HOST4):
        got = client(cgroup, "tcp", host, relay.port, size=4096)
        assert got.get("echo") and got["peer"] == [host, relay.port], got
    # An address that goes away stops being rewritten; its count is kept.
    fp.remove_address(m.id, HOST4)
    got = client(cgroup, "tcp", HOST4, relay.port)
    assert got["reply"] == "RELAY", got
    assert fp.stats()[m.id]["connections"] == 2
    assert fp.add_address(m.id, HOST4)
    assert client(cgroup, "tcp", HOST4, relay.port, size=64)["echo"]
    with pytest.raises(ValueError):
        fp.add_address(m.id, "0.0.0.0")


def test_ipv6_wildcard_mapping_serves_local_ipv6_addresses(container, fp, cgroup, relays):
    relay = relays("::")
    m = fp.add_mapping("tcp", "::", relay.port, CONT6, CPORT, relay.sock)
    assert "::1" in m.addresses and HOST6 in m.addresses and "::" not in m.addresses
    assert not any(a.startswith("fe80") for a in m.addresses)
    got = client(cgroup, "tcp", HOST6, relay.port, size=4096)
    assert got.get("echo") and got["peer"] == [HOST6, relay.port], got


def test_wildcard_entries_follow_addresses_as_they_come_and_go(cgroup):
    # In a namespace of its own, so adding addresses touches nothing else.
    ns, dummy = "fp-a-%d" % os.getpid(), "fp-d%d" % os.getpid()
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        # (a veth pair: this kernel may have no dummy links)
        ip("-n", ns, "link", "add", dummy, "type", "veth", "peer", "name", dummy + "p")
        ip("-n", ns, "link", "set", dummy, "up")
        ip("-n", ns, "link", "set", dummy + "p", "up")

        def setup():
            f = fastpath.load(cgroup)
            if not f:
                return f, None, None, None
            w = fastpath.AddressWatch()
            ls4 = socket.create_server(("0.0.0.0", 0))
            ls6 = socket.create_server(("::", 0), family=socket.AF_INET6)
            m4 = f.add_mapping("tcp", "0.0.0.0", ls4.getsockname()[1], CONT4, CPORT, ls4)
            m6 = f.add_mapping("tcp", "::", ls6.getsockname()[1], CONT6, CPORT, ls6)
            return f, w, (ls4, ls6), (m4, m6)

        f, w, socks, (m4, m6) = in_netns(ns, setup)
        if not f:
            pytest.skip(str(f))
        try:
            assert m4.addresses == ["127.0.0.1"] and m6.addresses == ["::1"]

            def events_until(pred):
                deadline = time.monotonic() + TIMEOUT
                while not pred() and time.monotonic() < deadline:
                    select.select([w], [], [], 0.2)
                    f.apply(w.read())
                assert pred()

            ip("-n", ns, "addr", "add", "198.18.208.9/32", "dev", dummy)
            ip("-n", ns, "addr", "add", "2001:2:0:d0::9/128", "dev", dummy, "nodad")
            events_until(lambda: "198.18.208.9" in m4.addresses
                         and "2001:2:0:d0::9" in m6.addresses)
            assert "198.18.208.9" not in m6.addresses and "2001:2:0:d0::9" not in m4.addresses
            ip("-n", ns, "addr", "del", "198.18.208.9/32", "dev", dummy)
            events_until(lambda: "198.18.208.9" not in m4.addresses)
            keys = [k for k, _ in f.programs.entries()]
            assert socket.inet_pton(socket.AF_INET, "198.18.208.9") not in [k[1] for k in keys]
            # Lost events: a resync reads the addresses again.
            ip("-n", ns, "addr", "add", "198.18.208.10/32", "dev", dummy)
            in_netns(ns, f.resync)
            assert "198.18.208.10" in m4.addresses
        finally:
            f.close()
            w.close()
            for s in socks:
                s.close()
    finally:
        ip("netns", "del", ns, check=False)


def test_v4_mapped_host_address_is_ipv4(container, fp, cgroup, relays):
    relay = relays("127.0.0.1")
    m = fp.add_mapping("tcp", "::ffff:127.0.0.1", relay.port, CONT4, CPORT, relay.sock)
    assert (m.host_ip, m.addresses) == ("127.0.0.1", ["127.0.0.1"])
    assert client(cgroup, "tcp", "127.0.0.1", relay.port, size=64)["echo"]


# ---------------------------------------------------------------------------
# Never misroute


def test_client_in_another_netns_is_never_rewritten(container, fp, cgroup, relays):
    # A listener in the other namespace on the dialled address:port, tagged
    # with the mapping's id: only the netns check stands between its clients
    # and a rewrite.
    ls = in_netns(OTHER_NS, lambda: socket.create_server(("127.0.0.1", 0)))
    relay = relays("127.0.0.1", sock=ls)
    m = fp.add_mapping("tcp", "127.0.0.1", relay.port, CONT4, CPORT, relay.sock)
    assert fp.programs.tag_get(ls.fileno()) == m.id
    got = client(cgroup, "tcp", "127.0.0.1", relay.port, netns=OTHER_NS)
    assert got["reply"] == "RELAY" and got["peer"] == ["127.0.0.1", relay.port], got
    assert fp.stats()[m.id]["connections"] == 0


def test_listener_closed_means_relay_or_refused_never_the_container(
        container, fp, cgroup, relays):
    relay = relays("127.0.0.1")
    port = relay.port
    fp.add_mapping("tcp", "127.0.0.1", port, CONT4, CPORT, relay.sock)
    assert client(cgroup, "tcp", "127.0.0.1", port, size=64)["echo"]
    before = container.accepted
    relay.close()  # the engine died: its listener is gone, the entry is stale
    got = client(cgroup, "tcp", "127.0.0.1", port)
    assert got.get("error") == 111, got  # ECONNREFUSED, as with no proxy at all
    # Another program on the port now: it gets the connect, not the container.
    other = relays("127.0.0.1", port=port)
    got = client(cgroup, "tcp", "127.0.0.1", port)
    assert got["reply"] == "RELAY" and other.hits == 1, got
    assert container.accepted == before


def test_removed_mapping_is_never_reached(container, fp, cgroup, relays):
    relay = relays("127.0.0.1")
    m = fp.add_mapping("tcp", "127.0.0.1", relay.port, CONT4, CPORT, relay.sock)
    assert client(cgroup, "tcp", "127.0.0.1", relay.port, size=64)["echo"]
    fp.remove_mapping(m.id)
    # The container address now belongs to "another container"; the listener
    # is still open (as a restarting relay's would be) but no longer tagged.
    before = container.accepted
    got = client(cgroup, "tcp", "127.0.0.1", relay.port)
    assert got["reply"] == "RELAY", got
    assert container.accepted == before
    assert fp.programs.entries() == []


def test_stale_tag_of_an_old_mapping_vouches_for_nothing(container, fp, cgroup, relays):
    relay = relays("127.0.0.1")
    old = fp.add_mapping("tcp", "127.0.0.1", relay.port, CONT4, CPORT, relay.sock)
    fp.programs.untag(relay.fileno())
    fp.programs.tag(relay.fileno(), old.id + 1000)
    assert client(cgroup, "tcp", "127.0.0.1", relay.port)["reply"] == "RELAY"


def test_six_to_four_stays_on_the_relay(container, fp, cgroup, relays):
    relay = relays("::1")
    m = fp.add_mapping("tcp", "::1", relay.port, CONT4, CPORT, relay.sock)
    assert m.addresses == [] and "relay" in m.reason
    assert client(cgroup, "tcp", "::1", relay.port)["reply"] == "RELAY"
    # Even a forced cross-family entry is refused by the program itself.
    fp.programs.tag(relay.fileno(), m.id)
    fp.programs.entry_add(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1"),
                          relay.port, socket.IPPROTO_TCP,
                          socket.inet_pton(socket.AF_INET, CONT4), CPORT, m.id)
    assert client(cgroup, "tcp", "::1", relay.port)["reply"] == "RELAY"


def test_socket_bound_to_loopback_is_left_alone(container, fp, cgroup, relays):
    relay = relays("127.0.0.1")
    fp.add_mapping("tcp", "127.0.0.1", relay.port, CONT4, CPORT, relay.sock)
    got = client(cgroup, "tcp", "127.0.0.1", relay.port, bind="127.0.0.1")
    assert got["reply"] == "RELAY", got


def test_processes_outside_the_cgroup_are_untouched(container, fp, relays):
    relay = relays("127.0.0.1")
    fp.add_mapping("tcp", "127.0.0.1", relay.port, CONT4, CPORT, relay.sock)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as s:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(16) == RELAY


def test_bad_input_is_a_clear_error_and_changes_nothing(fp, relays, tmp_path):
    relay = relays("127.0.0.1")
    cases = [
        (("sctp", "127.0.0.1", relay.port, CONT4, CPORT, relay.sock), ValueError),
        (("tcp", "127.0.0.1", 0, CONT4, CPORT, relay.sock), ValueError),
        (("tcp", "127.0.0.1", relay.port, CONT4, 70000, relay.sock), ValueError),
        (("tcp", "localhost", relay.port, CONT4, CPORT, relay.sock), ValueError),
        (("tcp", "127.0.0.1", relay.port, "0.0.0.0", CPORT, relay.sock), ValueError),
    ]
    with open(tmp_path / "f", "w") as notsock:
        cases.append((("tcp", "127.0.0.1", relay.port, CONT4, CPORT, notsock.fileno()), OSError))
        for args, exc in cases:
            with pytest.raises(exc):
                fp.add_mapping(*args)
    assert fp.mappings() == [] and fp.programs.entries() == []
    with pytest.raises(ValueError):
        fp.add_mapping("tcp", "::1", relay.port, "::", CPORT, relay.sock)


# ---------------------------------------------------------------------------
# Lifetime: nothing stays attached


def test_close_detaches_everything(cgroup):
    f = fastpath.load(cgroup)
    if not f:
        pytest.skip(str(f))
    assert set(fastpath.attached(cgroup).values()) == {1}
    f.close()
    assert set(fastpath.attached(cgroup).values()) == {0}
    f.close()  # idempotent


HOLDER = r"""
import sys
from spliceproxy import fastpath
f = fastpath.load(sys.argv[1])
print("ok" if f else "fail %s" % f, flush=True)
sys.stdin.read()
"""


def _kill_holder(p: subprocess.Popen, cgroup: str) -> None:
    """SIGKILL the process holding the programs, then give the kernel up to
    TIMEOUT to detach them from cgroup (the caller checks what it needs)."""
    p.send_signal(signal.SIGKILL)
    p.wait(TIMEOUT)
    p.stdin.close()
    p.stdout.close()
    srv.wait_for(lambda: sum(fastpath.attached(cgroup).values()) == 0, TIMEOUT)


def test_killed_holder_leaves_nothing_attached(cgroup):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, cgroup],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = p.stdout.readline().decode().strip()
        if line != "ok":
            pytest.skip(line)
        assert set(fastpath.attached(cgroup).values()) == {1}
    finally:
        _kill_holder(p, cgroup)
    assert set(fastpath.attached(cgroup).values()) == {0}


ENGINE = r"""
import socket, sys
from spliceproxy import fastpath
cg, fd, port, cont, cport = sys.argv[1:6]
fd, port, cport = int(fd), int(port), int(cport)
f = fastpath.load(cg)
if not f:
    print("fail %s" % f, flush=True)
    sys.exit(0)
m = f.add_mapping("tcp", "127.0.0.1", port, cont, cport, fd)
print("ok" if m.addresses else "fail %s" % m.reason, flush=True)
sys.stdin.read()
"""


def test_killed_engine_sends_the_next_connect_to_the_relay(container, cgroup, relays):
    # The holder of the programs gets a duplicate of the relay's listener, as
    # the engine holds the one its stub keeps; the stub side (here) outlives it.
    relay = relays("127.0.0.1")
    p = subprocess.Popen([sys.executable, "-c", ENGINE, cgroup, str(relay.fileno()),
                          str(relay.port), CONT4, str(CPORT)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         pass_fds=(relay.fileno(),))
    try:
        line = p.stdout.readline().decode().strip()
        if line != "ok":
            pytest.skip(line)
        assert client(cgroup, "tcp", "127.0.0.1", relay.port, size=4096)["echo"]
        before = container.accepted
    finally:
        _kill_holder(p, cgroup)
    got = client(cgroup, "tcp", "127.0.0.1", relay.port)
    assert got["reply"] == "RELAY", got
    assert container.accepted == before


# ---------------------------------------------------------------------------
# The benchmark's fastpath path


def test_bench_fastpath_path_runs_and_cleans_up():
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        # The topology's checks run iproute2's ip, which a preloaded ASan
        # aborts (strncpy-param-overlap in print_route).
        pytest.skip("iproute2's ip aborts under a preloaded ASan")
    from spliceproxy.bench import harness, report

    with open("/proc/self/cgroup") as f:
        home = f.read()
    h = harness.Harness("quick", only=("native", "fastpath"), peers=False,
                        variants=("loopback",), seed=3, netns_prefix="fp-b%d-" % os.getpid(),
                        subnet="198.18.210.0/24")
    h.p.rounds = h.p.lat_rounds = 2
    # (the rr warm-up is 200 exchanges: fewer iterations would overrun its buffer)
    h.p.rr_iters, h.p.crr_count, h.p.udp_iters, h.p.bulk_bytes = 200, 20, 100, 4 << 20
    h.p.loopback_groups = ("bulk", "rr", "crr", "udp")
    with h:
        if "fastpath" not in h.paths.runtimes:
            pytest.skip(h.paths.skipped.get("fastpath", "fastpath path not started"))
        cg = os.path.join(CGROOT, "spb-fastpath-%d" % os.getpid())
        with open("/proc/self/cgroup") as f:
            assert "spb-fastpath-%d" % os.getpid() in f.read()
        res = h.run_all(("bulk", "rr", "crr", "udp"))
        fp = h.paths.runtimes["fastpath"].fastpath
        conns = sum(st["connections"] for st in fp.stats().values())
    m = res.variants["loopback"]
    for metric in ("bulk_1", "rr_p50", "crr_rate", "udp_rr_p50"):
        assert len(m[metric]["fastpath"]) == 2, (metric, res.notes)
    # Every crr connect, the rr and bulk connections, and the UDP socket took it.
    assert conns >= 2 * 20 + 2 + 2 + 2, conns
    assert "fastpath/native" in report.table(res)
    assert not os.path.exists(cg)
    with open("/proc/self/cgroup") as f:
        assert f.read() == home


# ---------------------------------------------------------------------------
# Loading fails with a reason, never a traceback


def test_load_on_a_directory_that_is_not_cgroup2(tmp_path):
    got = fastpath.load(str(tmp_path))
    assert not got and got.kind == "cgroup" and str(tmp_path) in got.reason
    got = fastpath.load(str(tmp_path / "missing"))
    assert not got and got.kind == "cgroup"


UNPRIVILEGED = r"""
import sys
from spliceproxy import fastpath
f = fastpath.load(sys.argv[1])
print("%s|%s" % (getattr(f, "kind", "loaded"), f))
"""


def test_load_without_privilege_says_permission(cgroup):
    # Root without capabilities (an empty bounding set at exec).
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("needs setpriv (util-linux)")
    r = subprocess.run(["/usr/bin/setpriv", "--bounding-set=-all", sys.executable, "-c",
                        UNPRIVILEGED, cgroup], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    kind, text = r.stdout.decode().strip().split("|", 1)
    assert kind == "permission", text


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


MOV64_IMM, MOV64_REG, CALL, EXIT = 0xb7, 0xbf, 0x85, 0x95


def test_verifier_rejection_is_reported_with_its_log():
    from spliceproxy import _fastpath
    _fastpath.try_load("connect4", _insn(MOV64_IMM, 0, imm=1) + _insn(EXIT))  # loads
    with pytest.raises(_fastpath.LoadError) as e:
        _fastpath.try_load("connect4", _insn(MOV64_REG, 0, 5) + _insn(EXIT))  # R5 unset
    assert e.value.kind == "verifier" and "R5 !read_ok" in e.value.log, e.value.log
    assert "connect4" in e.value.what


def test_missing_helper_is_reported_as_the_kernel():
    from spliceproxy import _fastpath
    with pytest.raises(_fastpath.LoadError) as e:
        _fastpath.try_load("recvmsg6", _insn(CALL, imm=100000) + _insn(MOV64_IMM, 0, imm=1)
                           + _insn(EXIT))
    assert e.value.kind == "kernel", (e.value.what, e.value.log)
