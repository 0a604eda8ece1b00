"""SP_OPT_TRANSPARENT through the binding, unprivileged: the option's checks,
the container-network prefixes, and the fallback every loopback client
takes (csrc/transparent.c), over real loopback sockets.  The transparent
path itself needs root and namespaces: tests/integration/test_transparent.py.
"""

from __future__ import annotations

import errno
import socket
import threading

import pytest

from spliceproxy import _engine

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6


def test_the_option_is_0_or_1_and_per_listener():
    e = _engine.Engine()
    try:
        with pytest.raises(OSError) as exc:
            e.set_option(_engine.OPT_TRANSPARENT, 2)
        assert exc.value.errno == errno.EINVAL
        assert e.get_option(_engine.OPT_TRANSPARENT) == 0
        tcp = socket.socket(AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        udp = socket.socket(AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        lt = e.add_tcp(tcp.detach(), AF_INET, socket.inet_aton("127.0.0.1"), 9)
        lu = e.add_udp(udp.detach(), AF_INET, AF_INET, socket.inet_aton("127.0.0.1"), 9)
        for lid in (lt, lu):
            e.set_listener_option(lid, _engine.OPT_TRANSPARENT, 1)
            assert e.get_option(_engine.OPT_TRANSPARENT, lid) == 1
        assert e.get_option(_engine.OPT_TRANSPARENT) == 0
    finally:
        e.close()


def test_exclude_prefixes_are_checked():
    e = _engine.Engine()
    try:
        e.set_transparent_exclude([(AF_INET, socket.inet_aton("198.18.83.0"), 24),
                                   (AF_INET6, socket.inet_pton(AF_INET6, "fd00:82::"), 64)])
        e.set_transparent_exclude([])
        with pytest.raises(ValueError):
            e.set_transparent_exclude([(AF_INET, socket.inet_aton("198.18.83.0"), 33)])
        with pytest.raises(ValueError):
            e.set_transparent_exclude([(AF_INET6, socket.inet_aton("198.18.83.0"), 8)])
        with pytest.raises(ValueError):
            e.set_transparent_exclude([(AF_INET, b"\0" * 4, 8)] *
                                      (_engine.TRANSPARENT_EXCLUDE_MAX + 1))
    finally:
        e.close()


def test_a_loopback_client_falls_back_once_reported():
    """Relayed from the host's address as without the option, counted each
    time, reported once for the listener."""
    backend = socket.socket(AF_INET, socket.SOCK_STREAM)
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    seen = []

    def serve():
        for _ in range(3):
            c, peer = backend.accept()
            with c:
                seen.append(peer)
                c.sendall(b"x")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ls = socket.socket(AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    e = _engine.Engine()
    events = []
    try:
        lid = e.add_tcp(ls.detach(), AF_INET, socket.inet_aton("127.0.0.1"),
                        backend.getsockname()[1])
        e.set_listener_option(lid, _engine.OPT_TRANSPARENT, 1)
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            got = b""
            for _ in range(200):
                e.run(10)
                events += e.events()
                c.setblocking(False)
                try:
                    got = c.recv(1)
                except BlockingIOError:
                    continue
                break
            c.close()
            assert got == b"x"
        t.join(5)
        assert [p[0] for p in seen] == ["127.0.0.1"] * 3
        st = e.listener_stats(lid)
        assert st["transparent_fallbacks"] == 3 and st["tcp_transparent"] == 0
        kinds = [k for k, _err, _l, _n in events if k == _engine.EV_TP_LOOPBACK]
        assert kinds == [_engine.EV_TP_LOOPBACK]
    finally:
        e.close()
        backend.close()
