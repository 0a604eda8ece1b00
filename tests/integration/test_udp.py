"""UDP relaying through the installed proxy, started exactly as dockerd starts it.

Every test runs the real `spliceproxy` program with the docker-proxy argv, the
status pipe on fd 3 and (where stated) a dockerd-style socket on fd 4, and
talks to it over loopback sockets.  Echo servers playing the container run in
threads of this process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import servers as srv

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
MAX_V4 = 65507
MAX_V6 = 65527
RECV_TIMEOUT = 5.0
# The property test's examples: a few in the default profile, the profile's
# own number under HYPOTHESIS_PROFILE=long (the one knob, tests/conftest.py).
HYPOTHESIS_EXAMPLES = (15 if os.environ.get("HYPOTHESIS_PROFILE", "fast") == "fast"
                       else settings.default.max_examples)

_family = srv.family
_free_port = functools.partial(srv.free_port, kind=socket.SOCK_DGRAM)
_wait_for = srv.wait_for
UdpBackend = srv.UdpEcho

needs_ipv6 = pytest.mark.skipif(not srv.have_ipv6(), reason="no IPv6 loopback (::1) on this host")


def _have_127_0_0_2() -> bool:
    return srv.can_bind("127.0.0.2", socket.SOCK_DGRAM)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fd_count(pid: int) -> int:
    """The proxy's fd count once startup is over (fd 3 is closed just after the
    status is written, so a count taken right away may still include it)."""
    return srv.settled(lambda: _fd_count(pid), interval=0.1)


@pytest.fixture(autouse=True)
def _mode(proxy_path):
    """Every test here starts proxies (udp_proxy): in both modes."""


@contextlib.contextmanager
def udp_proxy(tmp_path, host_ip: str, container_ip: str, container_port: int, *,
              env: dict | None = None, listen_sock: socket.socket | None = None,
              preexec_fn=None):
    """Run one UDP proxy for the duration of the block; asserts a clean exit 0."""
    tag = "{}-{}".format(host_ip.replace(":", "_"), container_port)
    proxy = srv.Proxy(srv.installed_proxy_path(), str(tmp_path), host_ip, container_ip,
                      container_port, listen_sock=listen_sock, env=env, preexec_fn=preexec_fn,
                      proto="udp", stderr_path=str(tmp_path / f"proxy-{tag}.stderr"),
                      timeout=20.0)
    try:
        yield proxy
    except BaseException:
        proxy.close()
        raise
    alive = proxy.alive()
    rc = proxy.launched.stop()
    assert alive, f"proxy died during the test (rc={rc}):\n{proxy.log()}"
    assert rc == 0, f"proxy exited {rc} on SIGINT:\n{proxy.log()}"


def _echo(client: socket.socket, payload: bytes) -> bytes:
    client.send(payload)
    return client.recv(65535)


# --- basic relaying ---------------------------------------------------------------------

@pytest.mark.parametrize("host_ip,container_ip", [
    pytest.param("127.0.0.1", "127.0.0.1", id="ipv4"),
    pytest.param("::1", "::1", id="ipv6", marks=needs_ipv6),
    pytest.param("::1", "127.0.0.1", id="6to4", marks=needs_ipv6),
])
def test_echo(tmp_path, host_ip, container_ip):
    with UdpBackend(container_ip) as backend, \
            udp_proxy(tmp_path, host_ip, container_ip, backend.port) as proxy:
        with proxy.client() as c:
            for i in range(5):
                payload = b"Buffalo%d buffalo buffalo" % i
                assert _echo(c, payload) == payload
        srcs = backend.snapshot()
        assert [d for _, d in srcs] == [b"Buffalo%d buffalo buffalo" % i for i in range(5)]
        # The backend sees the proxy, in the backend's family, never the client.
        assert all(addr[0] == container_ip for addr, _ in srcs)
        assert len({addr[1] for addr, _ in srcs}) == 1
        assert _wait_for(lambda: proxy.stats()["udp_dgrams_b2c"] >= 5)
        st_ = proxy.stats()
        assert st_["udp_flows_created"] == 1
        assert st_["udp_dgrams_c2b"] == 5
        assert st_["udp_bytes_c2b"] == sum(len(d) for _, d in srcs)


def test_distinct_source_ports_and_no_crossed_replies(tmp_path):
    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port) as proxy:
        clients = [proxy.client() for _ in range(6)]
        try:
            for rnd in range(4):
                for i, c in enumerate(clients):
                    c.send(b"client-%d-round-%d" % (i, rnd))
            for i, c in enumerate(clients):
                got = [c.recv(65535) for _ in range(4)]
                assert got == [b"client-%d-round-%d" % (i, rnd) for rnd in range(4)]
        finally:
            for c in clients:
                c.close()
        by_client: dict[int, set[int]] = {}
        for addr, data in backend.snapshot():
            idx = int(data.split(b"-")[1])
            by_client.setdefault(idx, set()).add(addr[1])
        # One stable backend source port per client, all different.
        assert sorted(by_client) == list(range(6))
        assert all(len(ports) == 1 for ports in by_client.values())
        assert len(set().union(*by_client.values())) == 6


@pytest.mark.skipif(not _have_127_0_0_2(), reason="127.0.0.2 not usable on this host")
def test_reply_source_on_wildcard_listener(tmp_path):
    # A connected client only accepts datagrams from the address it talks to,
    # so the echo arrives only if the reply is sourced from 127.0.0.2.
    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp_path, "0.0.0.0", "127.0.0.1", backend.port) as proxy:
        with proxy.client("127.0.0.2") as c:
            assert _echo(c, b"via 127.0.0.2") == b"via 127.0.0.2"
        with proxy.client("127.0.0.1") as c:
            assert _echo(c, b"via 127.0.0.1") == b"via 127.0.0.1"


def _dockerd_udp_socket(host: str, pktinfo: bool = True) -> socket.socket:
    """Bind a UDP socket the way dockerd 28+ does before passing it as fd 4."""
    fam = _family(host)
    s = socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if pktinfo:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    elif pktinfo:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind((host, 0))
    return s


@pytest.mark.parametrize("host_ip,container_ip,pktinfo", [
    pytest.param("0.0.0.0", "127.0.0.1", True, id="ipv4-wildcard"),
    # A socket from a daemon that did not enable PKTINFO: the proxy enables it.
    pytest.param("0.0.0.0", "127.0.0.1", False, id="ipv4-wildcard-no-pktinfo"),
    pytest.param("::1", "::1", True, id="ipv6", marks=needs_ipv6),
])
def test_listen_fd(tmp_path, host_ip, container_ip, pktinfo):
    with UdpBackend(container_ip) as backend, _dockerd_udp_socket(host_ip, pktinfo) as ls:
        with udp_proxy(tmp_path, host_ip, container_ip, backend.port, listen_sock=ls) as proxy:
            # dockerd closes its copy once the proxy reported ready.
            ls.close()
            client_host = "127.0.0.2" if host_ip == "0.0.0.0" and _have_127_0_0_2() else (
                "127.0.0.1" if host_ip == "0.0.0.0" else host_ip)
            with proxy.client(client_host) as c:
                for i in range(3):
                    assert _echo(c, b"fd4 %d" % i) == b"fd4 %d" % i


# --- backend availability, expiry --------------------------------------------------------

def test_backend_down_then_up(tmp_path):
    backend_port = _free_port("127.0.0.1")
    with udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend_port) as proxy:
        with proxy.client() as c:
            c.settimeout(0.3)
            # Two clients alternating, read by the proxy as one batch (it is
            # stopped while we send): on loopback the port-unreachable for one
            # client's datagram is still pending on its backend socket when
            # that client's next datagram is sent.
            with proxy.client() as other:
                server = proxy.server_pid  # the process reading the datagrams
                os.kill(server, signal.SIGSTOP)
                try:
                    for i in range(5):
                        c.send(b"lost %d" % i)
                        other.send(b"lost too %d" % i)
                finally:
                    os.kill(server, signal.SIGCONT)
            # ICMP port unreachable comes back to the proxy, never to us.
            with pytest.raises(socket.timeout):
                c.recv(65535)
            assert proxy.alive()
            # A refused send is retried once, so none was dropped for an earlier
            # datagram's error.
            st_ = proxy.stats()
            assert (st_["udp_dgrams_c2b"], st_["udp_drops"]) == (10, 0), st_
            with UdpBackend("127.0.0.1", port=backend_port) as backend:
                c.settimeout(RECV_TIMEOUT)
                assert _echo(c, b"back again") == b"back again"
                assert [d for _, d in backend.snapshot()] == [b"back again"]
        st_ = proxy.stats()
        # The entries survived the refusals: one per client for the whole exchange.
        assert st_["udp_flows_created"] == 2
        assert st_["udp_flows_active"] == 2


TIMEOUT_ENV = {"SPLICEPROXY_UDP_TIMEOUT": "300ms"}


def test_expiry_kept_alive_by_client(tmp_path):
    # docker-proxy's TestUDPOneSided with a 300 ms timeout.
    with UdpBackend("127.0.0.1", echo=False) as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port, env=TIMEOUT_ENV) as proxy:
        with proxy.client() as c:
            for _ in range(15):
                c.send(b"hello")
                time.sleep(0.1)
            assert _wait_for(lambda: len(backend.snapshot()) == 15)
            ports = backend.source_ports()
            assert len(set(ports)) == 1, ports
            time.sleep(0.6 + 0.2)
            c.send(b"hello again")
            assert _wait_for(lambda: len(backend.snapshot()) == 16)
            assert backend.source_ports()[-1] != ports[0]
        assert proxy.stats()["udp_flows_expired"] >= 1


def test_expiry_kept_alive_by_backend(tmp_path):
    # Only the backend talks after the first datagram: the entry must live on.
    with UdpBackend("127.0.0.1", echo=False) as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port, env=TIMEOUT_ENV) as proxy:
        with proxy.client() as c:
            c.send(b"subscribe")
            assert _wait_for(lambda: backend.snapshot())
            src = backend.snapshot()[0][0]
            for i in range(15):
                backend.sock.sendto(b"push %d" % i, src)
                time.sleep(0.1)
            got = [c.recv(65535) for _ in range(15)]
            assert got == [b"push %d" % i for i in range(15)]
            c.send(b"still there")
            assert _wait_for(lambda: len(backend.snapshot()) == 2)
            assert backend.source_ports() == [src[1], src[1]]
            time.sleep(0.8)
            c.send(b"after silence")
            assert _wait_for(lambda: len(backend.snapshot()) == 3)
            assert backend.source_ports()[-1] != src[1]
        assert proxy.stats()["udp_flows_expired"] >= 1


def test_no_fd_leak_after_expiry(tmp_path):
    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port, env=TIMEOUT_ENV) as proxy:
        baseline = _settled_fd_count(proxy.server_pid)
        clients = [proxy.client() for _ in range(40)]
        try:
            for i, c in enumerate(clients):
                c.send(b"%d" % i)
            for i, c in enumerate(clients):
                assert c.recv(100) == b"%d" % i
            peak = _fd_count(proxy.server_pid)
        finally:
            for c in clients:
                c.close()
        # Some entries may already have expired while we read, not most.
        assert peak >= baseline + 20, (baseline, peak)
        assert _wait_for(lambda: _fd_count(proxy.server_pid) == baseline, timeout=5.0), (
            baseline, _fd_count(proxy.server_pid))
        st_ = proxy.stats()
        assert st_["udp_flows_active"] == 0
        assert st_["udp_flows_expired"] == 40


# --- datagram sizes ----------------------------------------------------------------------

@pytest.mark.parametrize("host_ip,size", [
    pytest.param("127.0.0.1", MAX_V4, id="ipv4-65507"),
    pytest.param("::1", MAX_V6, id="ipv6-65527", marks=needs_ipv6),
])
def test_maximum_size_datagram(tmp_path, host_ip, size):
    payload = os.urandom(size)
    with UdpBackend(host_ip) as backend, \
            udp_proxy(tmp_path, host_ip, host_ip, backend.port) as proxy:
        with proxy.client() as c:
            assert _echo(c, payload) == payload
            assert _echo(c, payload[::-1]) == payload[::-1]
        assert [len(d) for _, d in backend.snapshot()] == [size, size]


def test_zero_length_datagram(tmp_path):
    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port) as proxy:
        with proxy.client() as c:
            assert _echo(c, b"") == b""
            assert _echo(c, b"after") == b"after"
            assert _echo(c, b"") == b""
        assert [d for _, d in backend.snapshot()] == [b"", b"after", b""]


# --- table bound -------------------------------------------------------------------------

def _handled(stats: dict[str, int]) -> int:
    return stats["udp_dgrams_c2b"] + stats["udp_drops"]


def test_table_bound_under_flood(tmp_path):
    max_flows = 64
    batches, per_batch = 25, 100
    # Every source is 127.0.0.1: let one address fill the table, so that the
    # table bound is what is hit (test_udp_eviction covers the per-address one).
    env = {"SPLICEPROXY_UDP_MAX_FLOWS": str(max_flows),
           "SPLICEPROXY_UDP_MAX_FLOWS_PER_ADDR": str(max_flows)}
    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port, env=env) as proxy:
        baseline = _settled_fd_count(proxy.server_pid)
        peak = baseline
        sent = 0
        for b in range(batches):
            socks = []
            try:
                for i in range(per_batch):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(s)
                    s.sendto(b"flood %d %d" % (b, i), ("127.0.0.1", proxy.port))
                sent += per_batch
                # Count datagrams, not entries: the kernel may hand a new socket
                # the ephemeral port of an earlier client still in the table.
                _wait_for(lambda n=sent: _handled(proxy.stats()) >= n, timeout=3.0)
                peak = max(peak, _fd_count(proxy.server_pid))
            finally:
                for s in socks:
                    s.close()
        assert proxy.alive()
        st_ = proxy.stats()
        # Nearly every source port became an entry, and the table stayed bounded.
        assert st_["udp_flows_created"] >= sent * 0.9, st_
        assert st_["udp_flows_active"] <= max_flows, st_
        assert st_["udp_flows_evicted"] == st_["udp_flows_created"] - st_["udp_flows_active"]
        assert peak <= baseline + max_flows + 4, (baseline, peak)
        assert _fd_count(proxy.server_pid) <= baseline + max_flows + 4
        assert _wait_for(lambda: "evict" in proxy.log().lower()), proxy.log()
        # Still serving after the flood.
        with proxy.client() as c:
            assert _echo(c, b"after the flood") == b"after the flood"


@pytest.mark.standalone_only(
    reason="the RLIMIT_NOFILE of the standalone process itself; engine mode: test_engine_mode.py"
           "::test_an_engine_out_of_descriptors_pauses_accepting_and_recovers")
def test_descriptor_exhaustion_evicts_and_keeps_serving(tmp_path):
    # With a tiny descriptor limit, creating a backend socket fails with EMFILE
    # long before the table bound: the oldest entry gives up its descriptor.
    import resource

    limit = 28

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp_path, "127.0.0.1", "127.0.0.1", backend.port,
                      preexec_fn=low_nofile) as proxy:
        clients = [proxy.client() for _ in range(3 * limit)]
        try:
            for i, c in enumerate(clients):
                assert _echo(c, b"client %d" % i) == b"client %d" % i
        finally:
            for c in clients:
                c.close()
        st_ = proxy.stats()
        assert st_["err_emfile"] >= 1, st_
        assert st_["udp_flows_evicted"] >= 1, st_
        assert _fd_count(proxy.pid) <= limit
        with proxy.client() as c:
            assert _echo(c, b"still serving") == b"still serving"


# --- property: sizes and interleavings across clients -----------------------------------

_ops = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),
        st.one_of(st.integers(0, 64), st.integers(0, 1500), st.integers(0, MAX_V4)),
    ),
    min_size=1, max_size=24,
)


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("udp-prop")
    with UdpBackend("127.0.0.1") as backend, \
            udp_proxy(tmp, "127.0.0.1", "127.0.0.1", backend.port) as proxy:
        yield proxy


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(ops=_ops)
def test_interleaved_clients_property(shared_proxy, ops):
    """Datagrams of any size from several clients, interleaved, come back intact, in
    order, each to its own client.  At most ~64 KiB is in flight at a time so no
    socket buffer on loopback can overflow and drop one legitimately."""
    clients = [shared_proxy.client() for _ in range(4)]
    try:
        pending: list[tuple[int, bytes]] = []
        in_flight = 0

        def drain_one():
            nonlocal in_flight
            idx, expect = pending.pop(0)
            assert clients[idx].recv(65535) == expect
            in_flight -= len(expect) + 512

        for n, (idx, size) in enumerate(ops):
            payload = (b"%d:%d:" % (idx, n) + os.urandom(size))[:size] if size else b""
            cost = size + 512
            while pending and (in_flight + cost > 66000 or len(pending) >= 16):
                drain_one()
            clients[idx].send(payload)
            pending.append((idx, payload))
            in_flight += cost
        # Replies per client arrive in order; across clients any order is fine,
        # so read per client in send order.
        for idx in range(4):
            for owner, expect in pending:
                if owner == idx:
                    assert clients[idx].recv(65535) == expect
    finally:
        for c in clients:
            c.close()
    assert shared_proxy.alive()
