"""sp_engine_remove and the per-listener counters, through the binding.

An engine in this process relays real loopback sockets (its loop runs in a
thread, without the GIL); removing a listener must close its socket and
everything it owns, leave other listeners alone, and leak nothing.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time

import pytest

from spliceproxy import _engine

from support import servers as srv

AF_INET = socket.AF_INET
LOOPBACK = socket.inet_aton("127.0.0.1")


class Running:
    """An engine whose loop runs in a thread until close()."""

    def __init__(self):
        self.engine = _engine.Engine()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.lock = threading.Lock()
        self._thread.start()

    def _run(self):
        while not self._stop:
            with self.lock:
                self.engine.run(20)
                self.engine.events()

    def call(self, fn, *args):
        """Run an engine call between two loop rounds (the loop is single-threaded)."""
        with self.lock:
            return fn(*args)

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.engine.close()


@pytest.fixture
def running():
    r = Running()
    yield r
    r.close()


def _echo_server():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    stop = threading.Event()

    def serve():
        ls.settimeout(0.1)
        conns = []
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            c.settimeout(5)
            conns.append(c)
            threading.Thread(target=_echo, args=(c,), daemon=True).start()
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls, stop, t


def _echo(c):
    with contextlib.suppress(OSError):
        while True:
            data = c.recv(65536)
            if not data:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(data)


@pytest.fixture
def echo():
    ls, stop, t = _echo_server()
    yield ls.getsockname()[1]
    stop.set()
    t.join(5)
    ls.close()


def _roundtrip(port, payload=b"ping"):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = c.recv(65536)
            assert chunk, "EOF"
            got += chunk
        return got


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def _held_fds(st):
    """Descriptors the engine holds beyond its pooled relay pipes (kept for
    reuse, two descriptors each)."""
    return st["fds_open"] - 2 * st["pipes_open"]


def _port_free(port, kind=socket.SOCK_STREAM):
    s = socket.socket(AF_INET, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_remove_closes_the_listener_and_its_connections(running, echo):
    eng = running.engine
    base_fds = _held_fds(running.call(eng.stats))
    keep_port, keep_fd = srv.tcp_listener()
    gone_port, gone_fd = srv.tcp_listener()
    keep = running.call(eng.add_tcp, keep_fd, AF_INET, LOOPBACK, echo)
    gone = running.call(eng.add_tcp, gone_fd, AF_INET, LOOPBACK, echo)
    held = socket.create_connection(("127.0.0.1", gone_port), timeout=5)
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    assert _wait(lambda: running.call(eng.listener_stats, gone)["tcp_active"] == 1)

    running.call(eng.remove, gone)
    # Its open connection is reset (the mapping is gone), its port is free,
    # the other listener serves on.
    with pytest.raises(ConnectionResetError):
        held.sendall(b"y" * 100000)
        held.recv(1)
    held.close()
    assert _port_free(gone_port)
    assert _roundtrip(keep_port, b"still here") == b"still here"
    st = running.call(eng.stats)
    assert st["tcp_active"] == 0 or _wait(lambda: running.call(eng.stats)["tcp_active"] == 0)
    assert running.call(eng.listener_stats, keep)["tcp_accepted"] == 1
    with pytest.raises(OSError) as e:
        running.call(eng.remove, gone)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError):
        running.call(eng.listener_stats, gone)
    running.call(eng.remove, keep)
    assert _wait(lambda: _held_fds(running.call(eng.stats)) == base_fds), \
        running.call(eng.stats)


def test_a_removed_id_is_reused_with_fresh_counters(running, echo):
    eng = running.engine
    port, fd = srv.tcp_listener()
    first = running.call(eng.add_tcp, fd, AF_INET, LOOPBACK, echo)
    _roundtrip(port)
    assert _wait(lambda: running.call(eng.listener_stats, first)["tcp_closed"] == 1)
    running.call(eng.remove, first)
    port2, fd2 = srv.tcp_listener()
    second = running.call(eng.add_tcp, fd2, AF_INET, LOOPBACK, echo)
    assert second == first
    assert set(running.call(eng.listener_stats, second).values()) == {0}
    assert _roundtrip(port2, b"new") == b"new"


def test_per_listener_counters_add_up_to_the_engine_totals(running, echo):
    eng = running.engine
    ports, ids = [], []
    for _ in range(3):
        port, fd = srv.tcp_listener()
        ports.append(port)
        ids.append(running.call(eng.add_tcp, fd, AF_INET, LOOPBACK, echo))
    for n, port in enumerate(ports):
        for _ in range(n):
            _roundtrip(port, b"abcdef")

    def settled():
        return running.call(eng.stats)["tcp_closed"] == 3
    assert _wait(settled)
    per = [running.call(eng.listener_stats, i) for i in ids]
    assert [p["tcp_accepted"] for p in per] == [0, 1, 2]
    assert [p["bytes_c2b"] for p in per] == [0, 6, 12]
    assert [p["bytes_b2c"] for p in per] == [0, 6, 12]
    total = running.call(eng.stats)
    for name in ("tcp_accepted", "tcp_closed", "bytes_c2b", "bytes_b2c", "tcp_active"):
        assert sum(p[name] for p in per) == total[name], name
    # Only what can be told apart per port is kept per listener.
    assert "syscalls" not in per[0] and "fds_open" not in per[0]


def test_remove_of_a_udp_listener_closes_its_client_entries(running):
    eng = running.engine
    backend = socket.socket(AF_INET, socket.SOCK_DGRAM)
    backend.bind(("127.0.0.1", 0))
    backend.settimeout(5)
    base_fds = _held_fds(running.call(eng.stats))
    ls = socket.socket(AF_INET, socket.SOCK_DGRAM)
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    lid = running.call(eng.add_udp, ls.detach(), AF_INET, AF_INET, LOOPBACK,
                       backend.getsockname()[1])
    clients = []
    try:
        for i in range(3):
            c = socket.socket(AF_INET, socket.SOCK_DGRAM)
            c.connect(("127.0.0.1", port))
            c.send(b"hello %d" % i)
            clients.append(c)
            backend.recvfrom(100)
        assert _wait(lambda: running.call(eng.listener_stats, lid)["udp_flows_active"] == 3)
        running.call(eng.remove, lid)
        st = running.call(eng.stats)
        assert st["udp_flows_active"] == 0
        assert _held_fds(st) == base_fds
        assert _port_free(port, socket.SOCK_DGRAM)
    finally:
        for c in clients:
            c.close()
        backend.close()


def test_listener_options_are_checked():
    eng = _engine.Engine()
    try:
        s = socket.socket(AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        lid = eng.add_udp(s.detach(), AF_INET, AF_INET, LOOPBACK, 9)
        eng.set_listener_option(lid, _engine.OPT_UDP_TIMEOUT_MS, 250)
        eng.set_listener_option(lid, _engine.OPT_UDP_MAX_FLOWS, 4)
        assert eng.get_option(_engine.OPT_UDP_TIMEOUT_MS, lid) == 250
        assert eng.get_option(_engine.OPT_UDP_TIMEOUT_MS) == 90000
        for option, value, err in [(_engine.OPT_PIPE_SIZE, 8192, errno.EOPNOTSUPP),
                                   (_engine.OPT_SPIN_US, 10, errno.EOPNOTSUPP),
                                   (_engine.OPT_UDP_MAX_FLOWS, 0, errno.EINVAL),
                                   (_engine.OPT_UDP_TIMEOUT_MS, -1, errno.EINVAL)]:
            with pytest.raises(OSError) as e:
                eng.set_listener_option(lid, option, value)
            assert e.value.errno == err
        with pytest.raises(OSError) as e:
            eng.get_option(_engine.OPT_PIPE_SIZE, lid)
        assert e.value.errno == errno.EOPNOTSUPP
        eng.remove(lid)
        with pytest.raises(OSError) as e:
            eng.set_listener_option(lid, _engine.OPT_UDP_TIMEOUT_MS, 250)
        assert e.value.errno == errno.ENOENT
    finally:
        eng.close()


def test_a_tcp_listener_owns_the_options_of_its_connections():
    """What a TCP listener may have of its own is its protocol's list; the
    values are checked as the engine's are, and the rest stay engine-wide."""
    eng = _engine.Engine()
    try:
        s = socket.socket(AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        lid = eng.add_tcp(s.detach(), AF_INET, LOOPBACK, 9)
        own = {_engine.OPT_COPY_MODE: _engine.COPY_READWRITE, _engine.OPT_COPY_BUF: 4096,
               _engine.OPT_PIPE_SIZE: 65536, _engine.OPT_IDLE_TIMEOUT_MS: 0,
               _engine.OPT_CONNECT_TIMEOUT_MS: 500}
        for option, value in own.items():
            eng.set_listener_option(lid, option, value)
            assert eng.get_option(option, lid) == value
        assert eng.get_option(_engine.OPT_COPY_MODE) == _engine.COPY_SPLICE
        for option, value, err in [(_engine.OPT_COPY_MODE, 2, errno.EINVAL),
                                   (_engine.OPT_PIPE_SIZE, 100, errno.EINVAL),
                                   (_engine.OPT_COPY_BUF, 0, errno.EINVAL),
                                   (_engine.OPT_UDP_TIMEOUT_MS, 250, errno.EOPNOTSUPP),
                                   (_engine.OPT_PIPE_POOL_MAX, 4, errno.EOPNOTSUPP),
                                   (_engine.OPT_FD_LIMIT, 100, errno.EOPNOTSUPP),
                                   (_engine.OPT_ACCEPT_BACKOFF_MS, 5, errno.EOPNOTSUPP),
                                   (_engine.OPT_SPIN_US, 10, errno.EOPNOTSUPP),
                                   (-1, 0, errno.EINVAL), (99, 0, errno.EINVAL)]:
            with pytest.raises(OSError) as e:
                eng.set_listener_option(lid, option, value)
            assert e.value.errno == err, option
        # A refused value leaves the one set before.
        assert eng.get_option(_engine.OPT_COPY_MODE, lid) == _engine.COPY_READWRITE
    finally:
        eng.close()
