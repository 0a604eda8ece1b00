"""The proxy process: status pipe, flags, exit codes, signals, fds 3 and 4, fd exhaustion.

The proxy is the installed program started exactly as dockerd starts it
(spliceproxy.bench.launch.spawn: status pipe on fd 3, optional socket on
fd 4, stdio on /dev/null).
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from support import servers as srv
from support.servers import proxy_argv, spawn

needs_ipv6 = pytest.mark.skipif(not srv.have_ipv6(), reason="no IPv6 loopback (::1) on this host")


def _argv(proxy_path: str, host_port: int, container_port: int, *extra: str,
          host_ip: str = "127.0.0.1", container_ip: str = "127.0.0.1",
          use_listen_fd: bool = False) -> list[str]:
    return proxy_argv(proxy_path, "tcp", host_ip, host_port, container_ip, container_port,
                      use_listen_fd=use_listen_fd) + list(extra)


def _finish(lp, timeout: float = 5.0) -> tuple[int, str]:
    """Exit code and stderr of a launched proxy expected to exit by itself."""
    try:
        _, err = lp.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lp.proc.kill()
        lp.proc.communicate()
        raise AssertionError("the proxy did not exit within %.1f s" % timeout) from None
    return lp.proc.returncode, (err or b"").decode(errors="replace")


# --------------------------------------------------------------------------
# The status pipe on fd 3.


def _spawn_reading_fd3_to_eof(argv: list[str], timeout: float = 10.0):
    """Start argv with a pipe on fd 3 and read that pipe to EOF.

    spliceproxy.bench.launch stops after dockerd's first 2-byte read; here the
    whole stream is needed to see that fd 3 is closed right after the status.
    """
    r, w = os.pipe()

    def child_setup():
        os.dup2(w, 3)

    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=child_setup, pass_fds=(3,),
                            close_fds=True)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                raise AssertionError("fd 3 not closed within %.0f s (read %r)" % (timeout, data))
            chunk = os.read(r, 4096)
            if not chunk:
                return proc, data
            data += chunk
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(r)


def test_success_status_is_exactly_0_newline_then_eof(proxy_path):
    with srv.EchoServer("127.0.0.1") as echo:
        port = srv.free_port()
        proc, data = _spawn_reading_fd3_to_eof(_argv(proxy_path, port, echo.port))
        try:
            assert data == b"0\n"
            assert proc.poll() is None, "the proxy exited after reporting success"
            srv.echo_roundtrip("127.0.0.1", port)
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(5.0) == 0


def test_port_in_use(proxy_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        t0 = time.monotonic()
        lp = spawn(_argv(proxy_path, port, 9), check=False, timeout=5.0)
        rc, _ = _finish(lp)
        elapsed = time.monotonic() - t0
    assert lp.status == (b"1\nfailed to listen on 127.0.0.1:%d: listen tcp4 127.0.0.1:%d: "
                         b"bind: address already in use" % (port, port))
    assert rc == 1
    print("port-in-use failure reported and exited in %.3f s" % elapsed)
    assert elapsed < 1.0


def test_port_in_use_status_then_eof(proxy_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc, data = _spawn_reading_fd3_to_eof(_argv(proxy_path, port, 9))
        assert proc.wait(5.0) == 1
    assert data.startswith(b"1\nfailed to listen on 127.0.0.1:%d" % port)
    assert not data.endswith(b"\n")


def test_unknown_flag_exits_2_and_writes_nothing_on_fd3(proxy_path):
    lp = spawn(_argv(proxy_path, srv.free_port(), 80, "-bogus"), stderr=subprocess.PIPE,
               check=False, timeout=5.0)
    rc, err = _finish(lp)
    assert lp.status == b""  # EOF without a byte: dockerd 28+ hints at an old binary
    assert rc == 2
    assert "flag provided but not defined: -bogus" in err
    assert "Usage of" in err and "-container-port" in err


def test_unsupported_protocol(proxy_path):
    argv = proxy_argv(proxy_path, "foo", "127.0.0.1", srv.free_port(), "127.0.0.1", 80)
    lp = spawn(argv, check=False, timeout=5.0)
    rc, _ = _finish(lp)
    assert lp.status == b"1\nunsupported protocol foo"
    assert rc == 1


def test_sctp_is_refused_clearly(proxy_path):
    argv = proxy_argv(proxy_path, "sctp", "127.0.0.1", srv.free_port(), "127.0.0.1", 80)
    lp = spawn(argv, check=False, timeout=5.0)
    rc, _ = _finish(lp)
    assert rc == 1
    assert lp.status.startswith(b"1\n")
    assert b"SCTP" in lp.status


@pytest.mark.parametrize("flag,stream,text", [
    ("-v", "stdout", "version"),
    ("-version", "stdout", "version"),
    ("-h", "stderr", "Usage of"),
    ("-help", "stderr", "Usage of"),
])
def test_version_and_help_exit_0(proxy_path, flag, stream, text):
    out = subprocess.run([proxy_path, flag], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    assert text in getattr(out, stream)
    # Started like dockerd: exit 0 and nothing on the status pipe.
    lp = spawn([proxy_path, flag], check=False, timeout=5.0)
    rc, _ = _finish(lp)
    assert (rc, lp.status) == (0, b"")


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_bad_container_port(proxy_path, port):
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 80)
    argv[argv.index("-container-port") + 1] = port
    lp = spawn(argv, check=False, timeout=5.0)
    rc, _ = _finish(lp)
    assert rc == 1
    assert lp.status.startswith(b"1\n")
    assert b"container port" in lp.status and port.encode() in lp.status


# --------------------------------------------------------------------------
# Signals.


def _fill_connections(p, n: int) -> list[socket.socket]:
    """n connections with data in flight both ways (send buffers and relay pipes full)."""
    clients = []
    chunk = b"\x5a" * 65536
    for _ in range(n):
        c = p.connect(timeout=5.0)
        c.setblocking(False)
        clients.append(c)
    deadline = time.monotonic() + 5.0
    for c in clients:
        sent = 0
        while time.monotonic() < deadline and sent < (16 << 20):
            try:
                sent += c.send(chunk)
            except BlockingIOError:
                break
    return clients


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_with_live_connections(proxy_path, tmp_path, sig):
    with srv.SourceSinkServer("127.0.0.1") as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        clients = _fill_connections(p, 50)
        try:
            assert srv.wait_for(lambda: p.stats()["tcp_active"] == 50, 5.0), p.stats()
            assert srv.wait_for(lambda: backend.open_conns == 50, 5.0)
            # Mid-transfer: bytes are still moving, or sit in relay pipes waiting for room.
            before = p.stats()
            time.sleep(0.2)
            after = p.stats()
            assert after["bytes_b2c"] > before["bytes_b2c"] or after["pipes_in_use"] > 0
            assert p.alive()
            t0 = time.monotonic()
            p.proc.send_signal(sig)
            rc = p.proc.wait(5.0)
            elapsed = time.monotonic() - t0
        finally:
            for c in clients:
                c.close()
    print("%s with 50 busy connections: exit %d after %.3f s" % (sig.name, rc, elapsed))
    assert rc == 0
    assert elapsed < 1.0


def test_sighup_reopens_the_log_and_keeps_serving(proxy_path, tmp_path):
    # docker-proxy dies of SIGHUP (dockerd never sends it); spliceproxy
    # reopens its log file for logrotate (tests/integration/test_logging.py).
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        srv.echo_roundtrip("127.0.0.1", p.port)
        for _ in range(3):
            p.proc.send_signal(signal.SIGHUP)
            time.sleep(0.1)
            srv.echo_roundtrip("127.0.0.1", p.port)
        assert p.alive()
        assert p.stop(signal.SIGINT) == 0


def test_clients_see_the_end_after_stop(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        c = p.connect(timeout=5.0)
        try:
            c.sendall(b"hi")
            assert srv.recv_exact(c, 2) == b"hi"
            assert p.stop(signal.SIGINT) == 0
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass
            with pytest.raises(ConnectionRefusedError):
                srv.connect("127.0.0.1", p.port, timeout=5.0).close()
        finally:
            c.close()


# --------------------------------------------------------------------------
# Started by hand (no fd 3).


def _listener_inode(port: int) -> int:
    """Inode of the IPv4 TCP socket listening on ``port`` (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[9])
    raise AssertionError("nothing listens on port %d" % port)


def test_without_status_pipe_serves_and_keeps_fd3_free_of_sockets(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      status_pipe=False) as p:
        def serving():
            try:
                srv.echo_roundtrip("127.0.0.1", p.port, timeout=2.0)
                return True
            except OSError:
                return False

        assert srv.wait_for(serving, 10.0), "the proxy never served (log: %r)" % p.log()
        listener = "socket:[%d]" % _listener_inode(p.port)
        held = [p.fd_target(int(n)) for n in os.listdir("/proc/%d/fd" % p.pid)]
        assert listener in held
        for _ in range(5):
            srv.echo_roundtrip("127.0.0.1", p.port)
            # docker-proxy's listener landed on fd 3 and was closed by its own status write.
            assert p.fd_target(3) != listener
        p.wait_idle()
        target = p.fd_target(3)
        assert target is None or target == "/dev/null", target
        assert p.alive()
        assert p.stop() == 0


# --------------------------------------------------------------------------
# A socket from dockerd on fd 4 (-use-listen-fd).


def _dockerd_socket(host: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """The socket dockerd 28 creates: SO_REUSEADDR, v6-only for IPv6, bound, TCP listening."""
    s = socket.socket(srv.family(host), kind | socket.SOCK_CLOEXEC)
    if kind == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if srv.family(host) == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        s.listen(4096)
    return s


@pytest.mark.parametrize("host", [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param("::1", id="ipv6", marks=needs_ipv6),
])
def test_listen_fd_is_adopted_and_fd4_closed(proxy_path, tmp_path, host):
    with srv.EchoServer("127.0.0.1") as echo:
        lsock = _dockerd_socket(host)
        port = lsock.getsockname()[1]
        inode = os.fstat(lsock.fileno()).st_ino
        try:
            with srv.Proxy(proxy_path, str(tmp_path), host, "127.0.0.1", echo.port,
                           host_port=port, listen_sock=lsock) as p:
                assert p.launched.status == b"0\n"
                fd4 = p.fd_target(4)
                assert fd4 != "socket:[%d]" % inode, "fd 4 still holds the passed socket"
                held = [p.fd_target(int(n)) for n in os.listdir("/proc/%d/fd" % p.pid)]
                assert held.count("socket:[%d]" % inode) == 1  # one copy, not on fd 4
                # dockerd closes its copy once the proxy reported success.
                lsock.close()
                for _ in range(3):
                    srv.echo_roundtrip(host, port)
                assert p.stats()["tcp_accepted"] == 3
                assert p.stop() == 0
        finally:
            lsock.close()


def test_listen_fd_flag_without_fd4(proxy_path):
    lp = spawn(_argv(proxy_path, srv.free_port(), 80, use_listen_fd=True), check=False,
               timeout=5.0)
    rc, _ = _finish(lp)
    assert rc == 1
    assert lp.status.startswith(b"1\n") and len(lp.status) > 2
    assert b"bad file descriptor" in lp.status


def test_listen_fd_of_wrong_type(proxy_path):
    with _dockerd_socket("127.0.0.1", socket.SOCK_DGRAM) as usock:
        port = usock.getsockname()[1]
        lp = spawn(_argv(proxy_path, port, 80, use_listen_fd=True), listen_sock=usock,
                   check=False, timeout=5.0)
        rc, _ = _finish(lp)
    assert rc == 1
    assert lp.status.startswith(b"1\nunexpected socket type"), lp.status


# --------------------------------------------------------------------------
# Descriptor exhaustion.

NOFILE_LIMIT = 64
N_CLIENTS = 80  # far more than fit in 64 descriptors at two per connection


def _low_nofile():
    # The proxy raises its soft limit to the hard one, so both are set.
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, NOFILE_LIMIT))


def _peer_state(c: socket.socket) -> str:
    """'open' when nothing arrived, 'closed' on EOF or reset, 'data' otherwise (no blocking)."""
    timeout = c.gettimeout()
    c.setblocking(False)
    try:
        data = c.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return "open"
    except ConnectionResetError:
        return "closed"
    finally:
        c.settimeout(timeout)
    return "data" if data else "closed"


def _exhaust(p, n: int) -> list[socket.socket]:
    """Open n idle connections through a proxy limited to NOFILE_LIMIT descriptors and wait
    until it has paused accepting; the connections that do not fit wait in the backlog."""
    with open("/proc/%d/limits" % p.pid) as f:
        limits = f.read()
    assert any(ln.startswith("Max open files") and ln.split()[3:5] == ["64", "64"]
               for ln in limits.splitlines()), limits
    clients = []
    try:
        for _ in range(n):
            clients.append(p.connect(timeout=5.0))  # completed by the kernel's backlog
        assert srv.wait_for(lambda: "paused" in p.log(), 5.0), \
            "no accept-paused line in the log: %r" % p.log()
        assert "too many open files" in p.log()
        assert srv.wait_for(lambda: p.stats()["tcp_active"] > 0, 5.0)
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def _echo_on(c: socket.socket, msg: bytes) -> None:
    c.sendall(msg)
    assert srv.recv_exact(c, len(msg)) == msg


@pytest.mark.standalone_only(
    reason="the RLIMIT_NOFILE of the standalone process itself; engine mode: test_engine_mode.py"
           "::test_an_engine_out_of_descriptors_pauses_accepting_and_recovers")
def test_fd_exhaustion_pauses_accept_and_recovers(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      preexec_fn=_low_nofile) as p:
        clients = _exhaust(p, N_CLIENTS)
        try:
            time.sleep(1.0)  # hold the pressure for a while
            assert p.alive(), "the proxy exited under descriptor exhaustion"
            st = p.stats()
            assert st["accept_pauses"] >= 1, st
            assert 0 < st["tcp_active"] < N_CLIENTS, st
            assert p.fd_count() <= NOFILE_LIMIT
            print("with NOFILE=%d: %d of %d connections relayed"
                  % (NOFILE_LIMIT, st["tcp_active"], N_CLIENTS))
        finally:
            for c in clients:
                c.close()
        # Everything closed: whatever was still in the backlog is accepted and
        # finished, and the proxy is back to normal.
        p.wait_idle(15.0)
        assert p.alive()
        fresh = [p.connect(timeout=5.0) for _ in range(10)]
        try:
            for i, c in enumerate(fresh):
                _echo_on(c, b"fresh %d" % i)
        finally:
            for c in fresh:
                c.close()
        p.wait_idle()
        assert "Accepting on tcp/127.0.0.1:%d again" % p.port in p.log()
        assert p.stop() == 0


@pytest.mark.standalone_only(
    reason="the RLIMIT_NOFILE of the standalone process itself; engine mode: test_engine_mode.py"
           "::test_an_engine_out_of_descriptors_pauses_accepting_and_recovers")
def test_fd_exhaustion_backlog_connections_wait_and_are_served(proxy_path, tmp_path):
    """A connection that does not fit stays in the backlog: it is neither accepted and
    dropped nor lost, and it is relayed once descriptors are free again."""
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      preexec_fn=_low_nofile) as p:
        clients = _exhaust(p, N_CLIENTS)
        try:
            time.sleep(1.0)
            relayed = p.stats()["tcp_active"]
            dropped = [i for i, c in enumerate(clients) if _peer_state(c) == "closed"]
            assert dropped == [], (
                "%d waiting connections were closed by the proxy while out of descriptors "
                "(%d relayed); log tail: %s" % (len(dropped), relayed, p.log()[-400:]))
            # Free descriptors: close everything but the last ten, which were waiting.
            waiting = clients[-10:]
            for c in clients[:-10]:
                c.close()
            del clients[:-10]
            assert srv.wait_for(lambda: p.stats()["tcp_active"] == 10, 10.0), p.stats()
            for i, c in enumerate(waiting):
                _echo_on(c, b"late %d" % i)
        finally:
            for c in clients:
                c.close()
        p.wait_idle()
        assert p.alive()


def _busy_echo(c: socket.socket, data: bytes) -> str | None:
    """Push data through an echo path while reading it back; None, or what went wrong."""
    failure: list[str] = []

    def writer():
        try:
            c.sendall(data)
        except OSError as e:
            failure.append("send: %r" % e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        got = srv.recv_exact(c, len(data))
        if got != data:
            failure.append("corrupted echo")
    except (OSError, EOFError) as e:
        failure.append("recv: %r" % e)
    t.join(10.0)
    return failure[0] if failure else None


@pytest.mark.standalone_only(
    reason="the RLIMIT_NOFILE of the standalone process itself; engine mode: test_engine_mode.py"
           "::test_an_engine_out_of_descriptors_pauses_accepting_and_recovers")
def test_fd_exhaustion_relayed_connections_keep_working(proxy_path, tmp_path):
    """While accept is paused for lack of descriptors, connections already relayed
    keep carrying data, several of them busy at the same time."""
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      preexec_fn=_low_nofile) as p:
        clients = _exhaust(p, 40)
        try:
            time.sleep(0.3)
            before = p.stats()
            # Connections are accepted in order: the first ones are relayed.  All of
            # them get busy at once, needing more relay pipes than descriptors allow.
            relayed = before["tcp_active"]
            assert 4 <= relayed < len(clients), before
            busy = clients[:relayed]
            data = os.urandom(512 * 1024)
            results: list = [None] * len(busy)

            def run(i):
                results[i] = _busy_echo(busy[i], data)

            threads = [threading.Thread(target=run, args=(i,), daemon=True)
                       for i in range(len(busy))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20.0)
            after = p.stats()
            print("%d busy connections under NOFILE=%d: %d relay pipes open"
                  % (len(busy), NOFILE_LIMIT, after["pipes_open"]))
            broken = [(i, r) for i, r in enumerate(results) if r is not None]
            assert broken == [], (
                "%d of %d busy connections broke while the proxy was out of descriptors "
                "(resets %d -> %d, EMFILE %d -> %d, pipes open %d): %s"
                % (len(broken), len(busy), before["tcp_resets"], after["tcp_resets"],
                   before["err_emfile"], after["err_emfile"], after["pipes_open"], broken[:3]))
            assert after["tcp_resets"] == before["tcp_resets"]
        finally:
            for c in clients:
                c.close()
        p.wait_idle(15.0)
        assert p.alive()
