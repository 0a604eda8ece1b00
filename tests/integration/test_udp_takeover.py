"""A published UDP port cannot be taken over by a second socket.

With SO_REUSEADDR on the proxy's UDP socket, any local user could bind the
same port with SO_REUSEADDR and receive the clients' datagrams (the newest
socket wins).  The kernel decides at the newcomer's bind from the flag of the
socket already bound, so the proxy's socket must not carry it: neither one
the proxy opens nor one dockerd passes on fd 4 (dockerd before 29 bound it
with SO_REUSEADDR).  TCP keeps SO_REUSEADDR, as docker-proxy sets it.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from support import servers as srv
from support.servers import proxy_argv, spawn

IO_TIMEOUT = 5.0


def _env() -> dict:
    return srv.env_without_settings()


def _attack(host: str, port: int) -> int:
    """errno of an SO_REUSEADDR bind of (host, port), 0 if it succeeded."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno
        return 0


def _still_ours(lp, port: int) -> None:
    """Neither the address nor the wildcard can take the proxy's UDP port while it
    runs; it still relays, then stops cleanly."""
    assert _attack("127.0.0.1", port) == errno.EADDRINUSE
    assert _attack("0.0.0.0", port) == errno.EADDRINUSE
    assert srv.udp_roundtrip(port, b"still ours", timeout=IO_TIMEOUT) == b"still ours"
    assert lp.stop() == 0


def test_udp_port_the_proxy_opened_cannot_be_bound_again(proxy_path):
    echo = srv.UdpEcho()
    port = srv.free_port(kind=socket.SOCK_DGRAM)
    argv = proxy_argv(proxy_path, "udp", "127.0.0.1", port, "127.0.0.1", echo.port)
    try:
        with spawn(argv, env=_env(), timeout=10.0) as lp:
            _still_ours(lp, port)
    finally:
        echo.close()


def test_udp_socket_passed_with_reuseaddr_cannot_be_bound_again(proxy_path):
    echo = srv.UdpEcho()
    ls = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as dockerd < 29
    ls.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    argv = proxy_argv(proxy_path, "udp", "127.0.0.1", port, "127.0.0.1", echo.port,
                      use_listen_fd=True)
    try:
        with spawn(argv, listen_sock=ls, env=_env(), timeout=10.0) as lp:
            ls.close()  # dockerd closes its copy once the proxy is up
            _still_ours(lp, port)
    finally:
        ls.close()
        echo.close()


def test_tcp_listener_keeps_reuseaddr(proxy_path):
    # docker-proxy sets it on TCP (restarts over TIME_WAIT sockets); unchanged.
    port = srv.free_port()
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9)
    with spawn(argv, env=_env(), timeout=10.0) as lp:
        found = []
        for name in os.listdir("/proc/%d/fd" % lp.pid):
            try:
                fd = srv.grab_fd(lp.pid, int(name))
            except OSError:
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            with s:
                if s.type == socket.SOCK_STREAM and s.getsockname()[1] == port:
                    found.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
        assert lp.stop() == 0
    if not found:
        pytest.skip("cannot reach the proxy's listener (pidfd_getfd not permitted)")
    assert found == [1]
