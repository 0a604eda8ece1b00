"""Least privilege: a proxy started by root keeps nothing it does not need.

Started by root (as dockerd starts it), the proxy sets up its sockets and then
becomes SPLICEPROXY_USER (default nobody) with no supplementary groups, no
capability in any set and no_new_privs.  It must keep serving TCP and UDP
afterwards (UDP opens a backend socket per client after the drop), serve a
privileged port bound before the drop, and refuse an unknown user with a
status-pipe error.  Every check reads /proc/PID/status of the running proxy.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import threading

import pytest
import servers as srv

from spliceproxy.bench.launch import ProxyStartError, proxy_argv, spawn

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="privilege drop is only done (and checkable) when started as root"),
]

IO_TIMEOUT = 5.0


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def ids(value: str) -> list[int]:
    return [int(x) for x in value.split()]


class UdpEcho:
    """A UDP echo backend on a thread; counts distinct client addresses."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: set = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.peers.add(peer)
            with contextlib.suppress(OSError):
                self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2.0)
        self.sock.close()

    def __enter__(self) -> UdpEcho:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def udp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(IO_TIMEOUT)
        s.connect(("127.0.0.1", port))
        s.send(payload)
        return s.recv(65536)


@contextlib.contextmanager
def launched(proxy_path: str, proto: str, port: int, backend_port: int, env: dict):
    full_env = dict(os.environ)
    for k in ("SPLICEPROXY_USER", "SPLICEPROXY_KEEP_PRIVILEGES"):
        full_env.pop(k, None)
    full_env.update(env)
    lp = spawn(proxy_argv(proxy_path, proto, "127.0.0.1", port, "127.0.0.1", backend_port),
               env=full_env, timeout=10.0)
    try:
        yield lp
    finally:
        if lp.proc.poll() is None:
            lp.stop(signal.SIGINT)


def assert_unprivileged(pid: int, uid: int, gid: int) -> None:
    st = proc_status(pid)
    assert ids(st["Uid"]) == [uid] * 4, st["Uid"]
    assert ids(st["Gid"]) == [gid] * 4, st["Gid"]
    assert st["Groups"] == "", st["Groups"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 0, (key, st[key])
    assert st["NoNewPrivs"] == "1"


def _user_cases():
    cases = [pytest.param({}, 65534, 65534, id="default-nobody")]
    try:
        daemon = pwd.getpwnam("daemon")
        cases.append(pytest.param({"SPLICEPROXY_USER": "daemon"}, daemon.pw_uid, daemon.pw_gid,
                                  id="by-name"))
    except KeyError:
        pass
    # A numeric uid with no passwd entry: that uid and the same gid.
    unused = next(u for u in range(23456, 23556) if not _has_uid(u))
    cases.append(pytest.param({"SPLICEPROXY_USER": str(unused)}, unused, unused, id="numeric"))
    return cases


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize("env,uid,gid", _user_cases())
def test_tcp_proxy_runs_unprivileged_and_serves(proxy_path, env, uid, gid):
    with srv.EchoServer("127.0.0.1") as echo, \
            launched(proxy_path, "tcp", srv.free_port(), echo.port, env) as lp:
        assert_unprivileged(lp.pid, uid, gid)
        port = int(lp.argv[lp.argv.index("-host-port") + 1])
        for i in range(20):  # more connections than the pipes reserved before the drop
            srv.echo_roundtrip("127.0.0.1", port, b"x%d" % i * 1000)
        # Several connections busy at once need pipes made after the drop.
        socks = [srv.connect("127.0.0.1", port) for _ in range(8)]
        try:
            for s in socks:
                s.sendall(b"y" * 200_000)
            for s in socks:
                assert srv.recv_exact(s, 200_000) == b"y" * 200_000
        finally:
            for s in socks:
                s.close()
        assert lp.proc.poll() is None
        assert lp.stop() == 0


@pytest.mark.parametrize("env,uid,gid", _user_cases())
def test_udp_proxy_runs_unprivileged_and_serves_new_clients(proxy_path, env, uid, gid):
    with UdpEcho() as echo, \
            launched(proxy_path, "udp", srv.free_port(kind=socket.SOCK_DGRAM), echo.port,
                     env) as lp:
        assert_unprivileged(lp.pid, uid, gid)
        port = int(lp.argv[lp.argv.index("-host-port") + 1])
        # Each client gets its own backend socket, created after the drop.
        for i in range(5):
            payload = b"datagram %d" % i
            assert udp_roundtrip(port, payload) == payload
        assert len(echo.peers) == 5
        assert lp.stop() == 0


def test_keep_privileges_stays_root(proxy_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            launched(proxy_path, "tcp", srv.free_port(), echo.port,
                     {"SPLICEPROXY_KEEP_PRIVILEGES": "1"}) as lp:
        st = proc_status(lp.pid)
        assert ids(st["Uid"]) == [0] * 4
        assert int(st["CapEff"], 16) != 0
        port = int(lp.argv[lp.argv.index("-host-port") + 1])
        srv.echo_roundtrip("127.0.0.1", port)
        assert lp.stop() == 0


def test_unknown_user_is_a_startup_error(proxy_path):
    env = dict(os.environ, SPLICEPROXY_USER="no-such-user-spliceproxy")
    env.pop("SPLICEPROXY_KEEP_PRIVILEGES", None)
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
    with pytest.raises(ProxyStartError) as info:
        spawn(argv, env=env, timeout=10.0)
    assert info.value.returncode == 1
    msg = str(info.value)
    assert "SPLICEPROXY_USER" in msg and "no-such-user-spliceproxy" in msg, msg
    assert "Traceback" not in msg


def _privileged_port_free(port: int, kind: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_privileged_port_is_served_after_the_drop(proxy_path, proto):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    port = next((p for p in (81, 82, 83, 444, 445) if _privileged_port_free(p, kind)), None)
    if port is None:
        pytest.skip("no free privileged port on 127.0.0.1")
    backend = srv.EchoServer("127.0.0.1") if proto == "tcp" else UdpEcho()
    with backend, launched(proxy_path, proto, port, backend.port, {}) as lp:
        assert_unprivileged(lp.pid, 65534, 65534)
        if proto == "tcp":
            srv.echo_roundtrip("127.0.0.1", port, b"privileged")
        else:
            assert udp_roundtrip(port, b"privileged") == b"privileged"
        assert lp.stop() == 0
