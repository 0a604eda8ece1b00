"""TCP relaying through the installed proxy, started exactly as dockerd starts it.

Real loopback sockets on both sides: the client is this process, the
"container" is a backend in this process (tests/integration/servers.py).
Covers address families (IPv4, IPv6, 6->4, v6-only, IPv4-mapped), full-duplex
integrity, half-close both ways, reset propagation, a backend that is down and
comes back, socket options, counters, many concurrent connections and
descriptor leaks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

import pytest

from support import servers as srv

needs_ipv6 = pytest.mark.skipif(not srv.have_ipv6(), reason="no IPv6 loopback (::1) on this host")

MIB = 1 << 20


@pytest.fixture
def echo_v4():
    with srv.EchoServer("127.0.0.1") as e:
        yield e




def _send_all_then_shut(sock: socket.socket, data: bytes, chunk: int = 256 * 1024) -> None:
    view = memoryview(data)
    for off in range(0, len(data), chunk):
        sock.sendall(view[off:off + chunk])
    sock.shutdown(socket.SHUT_WR)


# --------------------------------------------------------------------------
# Address families.

FAMILY_CASES = [
    pytest.param("127.0.0.1", "127.0.0.1", "127.0.0.1", id="ipv4"),
    pytest.param("::1", "::1", "::1", id="ipv6", marks=needs_ipv6),
    pytest.param("::1", "127.0.0.1", "::1", id="6to4", marks=needs_ipv6),
    pytest.param("::ffff:127.0.0.1", "127.0.0.1", "127.0.0.1", id="v4mapped"),
]


@pytest.mark.parametrize("host_ip,container_ip,client_ip", FAMILY_CASES)
def test_echo_families(proxy_path, tmp_path, host_ip, container_ip, client_ip):
    with srv.EchoServer(container_ip) as echo, \
            srv.Proxy(proxy_path, str(tmp_path), host_ip, container_ip, echo.port) as p:
        for size in (1, 5000, 300_000):
            payload = os.urandom(size)
            srv.echo_roundtrip(client_ip, p.port, payload)
        # The backend sees the proxy's own address of the container's family.
        assert echo.accepted == 3
        assert p.alive()


def test_v4_mapped_host_ip_listens_as_ipv4(proxy_path, tmp_path, echo_v4):
    """-host-ip ::ffff:127.0.0.1 is IPv4 (Go's To4() != nil): a plain tcp4 listener."""
    with srv.Proxy(proxy_path, str(tmp_path), "::ffff:127.0.0.1", "127.0.0.1", echo_v4.port) as p:
        srv.echo_roundtrip("127.0.0.1", p.port)
        port_hex = ":%04X" % p.port
        with open("/proc/net/tcp") as f:
            v4 = [ln for ln in f.read().splitlines()[1:] if ln.split()[1].endswith(port_hex)
                  and ln.split()[3] == "0A"]
        with open("/proc/net/tcp6") as f:
            v6 = [ln for ln in f.read().splitlines()[1:] if ln.split()[1].endswith(port_hex)
                  and ln.split()[3] == "0A"]
        assert len(v4) == 1 and v4[0].split()[1] == "0100007F" + port_hex, v4
        assert v6 == []


@needs_ipv6
def test_unspecified_ipv6_listener_is_v6_only(proxy_path, tmp_path, echo_v4):
    """-host-ip :: listens v6-only, like Go's tcp6: IPv4 clients are refused."""
    with srv.Proxy(proxy_path, str(tmp_path), "::", "127.0.0.1", echo_v4.port) as p:
        srv.echo_roundtrip("::1", p.port)
        with pytest.raises(ConnectionRefusedError):
            srv.connect("127.0.0.1", p.port, timeout=5.0).close()
        srv.echo_roundtrip("::1", p.port)
        assert p.alive()


# --------------------------------------------------------------------------
# Integrity.


def _duplex_backend_handler(conn: socket.socket, payload: bytes):
    """Backend side of a full-duplex transfer: send ``payload`` while hashing what arrives."""
    def send():
        _send_all_then_shut(conn, payload)

    def receive():
        return srv.recv_to_eof(conn)

    return srv.run_threads(send, receive)[1]


@pytest.mark.parametrize("host_ip,container_ip", [
    pytest.param("127.0.0.1", "127.0.0.1", id="ipv4"),
    pytest.param("::1", "127.0.0.1", id="6to4", marks=needs_ipv6),
])
def test_full_duplex_32mib_checksums(proxy_path, tmp_path, host_ip, container_ip):
    size = 32 * MIB
    up = os.urandom(size)
    down = os.urandom(size)
    with srv.AcceptingBackend(container_ip) as backend, \
            srv.Proxy(proxy_path, str(tmp_path), host_ip, container_ip, backend.port) as p:
        client = srv.connect(host_ip, p.port, timeout=30.0)
        conn = backend.accept()
        conn.settimeout(30.0)
        t0 = time.monotonic()
        try:
            client_got, backend_got = srv.run_threads(
                lambda: srv.run_threads(lambda: _send_all_then_shut(client, up),
                                     lambda: srv.recv_to_eof(client))[1],
                lambda: _duplex_backend_handler(conn, down),
                timeout=90.0)
        finally:
            client.close()
            conn.close()
        elapsed = time.monotonic() - t0
        print("32 MiB each way through %s -> %s in %.2f s" % (host_ip, container_ip, elapsed))
        assert backend_got == (size, srv.sha(up))
        assert client_got == (size, srv.sha(down))
        st = p.wait_idle()
        assert st["bytes_c2b"] == size
        assert st["bytes_b2c"] == size
        assert st["tcp_accepted"] == 1 and st["tcp_closed"] == 1
        assert st["tcp_resets"] == 0
        assert st["pipes_in_use"] == 0


# --------------------------------------------------------------------------
# Half-close.


def test_half_close_client_first(proxy_path, tmp_path):
    """moby TestTCP4ProxyHalfClose: the backend reads to EOF before it replies."""
    request = os.urandom(3 * MIB + 17)
    reply_body = os.urandom(2 * MIB + 5)
    with srv.AcceptingBackend("127.0.0.1") as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        client = srv.connect("127.0.0.1", p.port)
        conn = backend.accept()

        def backend_side():
            n, digest = srv.recv_to_eof(conn)  # only returns once the client's FIN got through
            conn.sendall(digest.encode() + reply_body)
            conn.close()
            return n, digest

        def client_side():
            _send_all_then_shut(client, request)
            return srv.recv_to_eof(client)

        try:
            (n, digest), got = srv.run_threads(backend_side, client_side)
        finally:
            client.close()
            conn.close()
        assert (n, digest) == (len(request), srv.sha(request))
        expected = digest.encode() + reply_body
        assert got == (len(expected), srv.sha(expected))
        st = p.wait_idle()
        assert st["bytes_c2b"] == len(request) and st["bytes_b2c"] == len(expected)


def test_half_close_backend_first(proxy_path, tmp_path):
    """The backend finishes sending first; the client keeps sending and all of it arrives."""
    greeting = os.urandom(MIB + 3)
    upload = os.urandom(4 * MIB + 1)
    with srv.AcceptingBackend("127.0.0.1") as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        client = srv.connect("127.0.0.1", p.port)
        conn = backend.accept()
        try:
            _send_all_then_shut(conn, greeting)
            # The client sees the whole greeting, then EOF, while its own side stays open.
            assert srv.recv_to_eof(client) == (len(greeting), srv.sha(greeting))
            time.sleep(0.1)
            got = srv.run_threads(lambda: _send_all_then_shut(client, upload),
                               lambda: srv.recv_to_eof(conn))[1]
            assert got == (len(upload), srv.sha(upload))
            # Both directions are finished: the proxy closes the client.
            client.settimeout(5.0)
            assert client.recv(1) == b""
        finally:
            client.close()
            conn.close()
        st = p.wait_idle()
        assert st["bytes_b2c"] == len(greeting) and st["bytes_c2b"] == len(upload)
        assert st["tcp_resets"] == 0


# --------------------------------------------------------------------------
# Resets.


@contextlib.contextmanager
def _three_resets(proxy_path, tmp_path, by_backend: bool):
    """Three connections, each reset by one side (the backend or the client)
    after an exchange: the other side sees a reset, the proxy counts them and
    lives on.  Yields (backend, proxy)."""
    with srv.AcceptingBackend("127.0.0.1") as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        for _ in range(3):
            client = srv.connect("127.0.0.1", p.port, timeout=5.0)
            conn = backend.accept()
            resetter, other = (conn, client) if by_backend else (client, conn)
            try:
                client.sendall(b"hello")
                assert srv.recv_exact(conn, 5) == b"hello"
                if by_backend:
                    conn.sendall(b"world")
                    assert srv.recv_exact(client, 5) == b"world"
                srv.abortive_close(resetter)
                with pytest.raises(ConnectionResetError):
                    # A clean EOF (b"") would mean the reset was turned into a FIN.
                    other.recv(1)
            finally:
                other.close()
        st = p.wait_idle()
        assert st["tcp_resets"] == 3
        assert p.alive()
        yield backend, p


def test_backend_reset_reaches_client(proxy_path, tmp_path):
    with _three_resets(proxy_path, tmp_path, by_backend=True) as (backend, p):
        client = srv.connect("127.0.0.1", p.port, timeout=5.0)
        conn = backend.accept()
        client.sendall(b"again")
        assert srv.recv_exact(conn, 5) == b"again"
        client.close()
        conn.close()


def test_client_reset_reaches_backend(proxy_path, tmp_path):
    with _three_resets(proxy_path, tmp_path, by_backend=False):
        pass  # the resets, their count and the proxy's life are the checks


# --------------------------------------------------------------------------
# Backend down, then up.


def test_backend_down_then_up(proxy_path, tmp_path):
    backend_port = srv.free_port("127.0.0.1")
    with srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend_port) as p:
        # Nothing sent: the proxy accepts, fails to connect, closes: a clean EOF.
        c = srv.connect("127.0.0.1", p.port, timeout=5.0)
        try:
            assert c.recv(1) == b""
        finally:
            c.close()
        # Data sent first: closed too, EOF or a reset depending on when the data arrived.
        c = srv.connect("127.0.0.1", p.port, timeout=5.0)
        try:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass
        finally:
            c.close()
        want = ("Can't forward traffic to backend tcp/127.0.0.1:%d: dial tcp 127.0.0.1:%d: "
                "connect: connection refused" % (backend_port, backend_port))
        assert srv.wait_for(lambda: want in p.log(), 5.0), p.log()
        # The client can see the close before the proxy has finished its
        # bookkeeping: wait for the counters to settle.
        st = srv.wait_for(lambda: (lambda s: s if s["tcp_closed"] >= 2 else None)(p.stats()))
        assert st and st["tcp_accepted"] == 2 and st["tcp_failed"] == 2, p.stats()
        assert st["tcp_active"] == 0, st
        pid = p.pid
        with srv.EchoServer("127.0.0.1", backend_port):
            srv.echo_roundtrip("127.0.0.1", p.port, b"back up")
        assert p.alive() and p.pid == pid
        assert p.wait_idle()["tcp_failed"] == 2


# --------------------------------------------------------------------------
# Socket options.


def _ss(filter_expr: str) -> list[str]:
    out = subprocess.run(["ss", "-tnoiH", "state", "established", filter_expr],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    # With -i each socket takes two lines; the first starts with the queues.
    return [ln for ln in out.splitlines() if ln.strip()]


def test_keepalive_and_nodelay_on_both_sockets(proxy_path, tmp_path):
    """Like Go: TCP_NODELAY and 15 s keepalive on the accepted and the dialed socket."""
    if not os.path.exists("/usr/bin/ss") and not os.path.exists("/bin/ss"):
        pytest.skip("ss (iproute2) is not installed")
    with srv.AcceptingBackend("127.0.0.1") as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        client = srv.connect("127.0.0.1", p.port)
        conn = backend.accept()
        try:
            client.sendall(b"x")
            assert srv.recv_exact(conn, 1) == b"x"
            front = " ".join(_ss("( sport = :%d )" % p.port))
            back = " ".join(_ss("( dport = :%d )" % backend.port))
            assert "timer:(keepalive" in front, front
            assert "timer:(keepalive" in back, back

            socks = srv.process_tcp_sockets(p.server_pid)
            try:
                accepted = [s for s in socks if s.getsockname()[1] == p.port]
                dialed = [s for s in socks if s.getpeername()[1] == backend.port]
                assert len(accepted) == 1 and len(dialed) == 1
                for s in accepted + dialed:
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
            finally:
                for s in socks:
                    s.close()
        finally:
            client.close()
            conn.close()


# --------------------------------------------------------------------------
# Counters.


def test_byte_counters_match_traffic(proxy_path, tmp_path):
    sizes = [(0, 0), (1, 0), (0, 1), (1000, 70_000), (65_536, 65_537), (MIB + 1, 3)]
    with srv.AcceptingBackend("127.0.0.1") as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        for up_n, down_n in sizes:
            up, down = os.urandom(up_n), os.urandom(down_n)
            client = srv.connect("127.0.0.1", p.port)
            conn = backend.accept()
            try:
                got_b, got_c = srv.run_threads(
                    lambda c=conn, d=down: srv.run_threads(lambda: _send_all_then_shut(c, d),
                                                        lambda: srv.recv_to_eof(c))[1],
                    lambda c=client, u=up: srv.run_threads(lambda: _send_all_then_shut(c, u),
                                                        lambda: srv.recv_to_eof(c))[1])
            finally:
                client.close()
                conn.close()
            assert got_b == (up_n, srv.sha(up))
            assert got_c == (down_n, srv.sha(down))
        st = p.wait_idle()
        assert st["bytes_c2b"] == sum(u for u, _ in sizes)
        assert st["bytes_b2c"] == sum(d for _, d in sizes)
        assert st["tcp_accepted"] == len(sizes) == st["tcp_closed"]
        assert st["tcp_failed"] == 0 and st["tcp_resets"] == 0


# --------------------------------------------------------------------------
# Scale and leaks.


def _baseline(p) -> tuple[int, int]:
    """(descriptors in /proc minus pooled pipes, engine fds_open minus pooled pipes).

    Idle relay pipes are kept in a bounded pool on purpose; everything else
    must go back to where it was.
    """
    st = p.stats()
    return p.fd_count() - 2 * st["pipes_open"], st["fds_open"] - 2 * st["pipes_open"]


def _assert_no_leak(p, base, accepted: int) -> None:
    st = p.wait_idle(15.0)
    assert st["tcp_accepted"] == accepted, st
    assert st["tcp_closed"] == accepted, st
    assert st["pipes_in_use"] == 0, st
    assert st["pipes_open"] <= 16, st  # the idle pool bound (SP_OPT_PIPE_POOL_MAX)
    now = srv.wait_for(lambda: _baseline(p) if _baseline(p) == base else None, 5.0)
    assert now == base, "descriptors: baseline %r, now %r (%r)" % (base, _baseline(p), st)


@pytest.mark.slow
def test_concurrent_and_sequential_connections_leak_nothing(proxy_path, tmp_path):
    n_conc, n_seq = 1000, 3000
    srv.raise_nofile(4 * n_conc + 256)
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        base = srv.settled(lambda: _baseline(p), timeout=2.5)
        st0 = p.stats()
        assert st0["tcp_active"] == 0 and st0["fds_open"] > 0

        # 1,000 at once: all open together, each carrying a message both ways.
        t0 = time.monotonic()
        clients = []
        try:
            for _ in range(n_conc):
                clients.append(srv.connect("127.0.0.1", p.port, timeout=20.0))
            for i, c in enumerate(clients):
                c.sendall(b"conn %06d" % i)
            for i, c in enumerate(clients):
                assert srv.recv_exact(c, 11) == b"conn %06d" % i
            st = p.stats()
            assert st["tcp_active"] == n_conc, st
            assert echo.open_conns == n_conc
        finally:
            for c in clients:
                c.close()
        print("%d concurrent connections in %.2f s" % (n_conc, time.monotonic() - t0))
        _assert_no_leak(p, base, n_conc)

        # 3,000 one after the other.
        t0 = time.monotonic()
        for i in range(n_seq):
            with srv.connect("127.0.0.1", p.port, timeout=10.0) as c:
                msg = b"seq %d" % i
                c.sendall(msg)
                assert srv.recv_exact(c, len(msg)) == msg
        print("%d sequential connections in %.2f s" % (n_seq, time.monotonic() - t0))
        _assert_no_leak(p, base, n_conc + n_seq)
        st = p.stats()
        assert st["bytes_c2b"] == st["bytes_b2c"]
        assert st["tcp_failed"] == 0 and st["tcp_resets"] == 0
        assert p.alive()
