"""Least privilege: a proxy started by root keeps nothing it does not need.

Started by root (as dockerd starts it), the proxy sets up its sockets and then
becomes SPLICEPROXY_USER (default: a uid of its own that no other process has)
with no supplementary groups, no capability in any set and no_new_privs.  It
must keep serving TCP and UDP afterwards (UDP opens a backend socket per
client after the drop), serve a privileged port bound before the drop, and
refuse an unknown user with a status-pipe error.  Every check reads
/proc/PID/status of the running proxy.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import pwd
import signal
import socket

import pytest

from spliceproxy import identity

from support import servers as srv
from support.servers import ProxyStartError, proxy_argv, spawn

# The identity and capabilities of the standalone proxy process itself.  In
# engine mode the stub keeps dockerd's and the engine drops its own.
pytestmark = [
    pytest.mark.standalone_only(
        reason="the standalone process's own uid and capabilities; engine mode: "
               "test_engine_mode.py::test_engine_drops_privileges_keeping_only_low_port_binding"
               ", ::test_engine_becomes_the_user_its_environment_names"),
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="privilege drop is only done (and checkable) when started as root"),
]


def ids(value: str) -> list[int]:
    return [int(x) for x in value.split()]


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


DYNAMIC = None  # "a uid of its own": any uid of identity.UID_RANGE, gid the same


def assert_unprivileged(pid: int, uid: int | None, gid: int | None) -> int:
    """Check the process's ids and capabilities; returns its uid."""
    st = srv.proc_status(pid)
    if uid is DYNAMIC:
        uid = gid = ids(st["Uid"])[0]
        lo, hi = identity.UID_RANGE
        assert lo <= uid <= hi, uid
        assert not srv.has_uid(uid)
    assert ids(st["Uid"]) == [uid] * 4, st["Uid"]
    assert ids(st["Gid"]) == [gid] * 4, st["Gid"]
    assert st["Groups"] == "", st["Groups"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 0, (key, st[key])
    assert st["NoNewPrivs"] == "1"
    return uid


def _user_cases():
    cases = [pytest.param({}, DYNAMIC, DYNAMIC, id="default-own-uid"),
             pytest.param({"SPLICEPROXY_USER": "nobody"}, 65534, 65534, id="nobody")]
    try:
        daemon = pwd.getpwnam("daemon")
        cases.append(pytest.param({"SPLICEPROXY_USER": "daemon"}, daemon.pw_uid, daemon.pw_gid,
                                  id="by-name"))
    except KeyError:
        pass
    # A numeric uid with no passwd entry: that uid and the same gid.
    unused = next(u for u in range(23456, 23556) if not srv.has_uid(u))  # fmt: skip
    cases.append(pytest.param({"SPLICEPROXY_USER": str(unused)}, unused, unused, id="numeric"))
    return cases



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
    with srv.UdpEcho() as echo, \
            launched(proxy_path, "udp", srv.free_port(kind=socket.SOCK_DGRAM), echo.port,
                     env) as lp:
        assert_unprivileged(lp.pid, uid, gid)
        port = int(lp.argv[lp.argv.index("-host-port") + 1])
        # Each client gets its own backend socket, created after the drop.
        for i in range(5):
            payload = b"datagram %d" % i
            assert srv.udp_roundtrip(port, payload) == payload
        assert len(echo.peers()) == 5
        assert lp.stop() == 0


def test_keep_privileges_stays_root(proxy_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            launched(proxy_path, "tcp", srv.free_port(), echo.port,
                     {"SPLICEPROXY_KEEP_PRIVILEGES": "1"}) as lp:
        st = srv.proc_status(lp.pid)
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
        spawn(argv, env=env, timeout=10.0).stop(signal.SIGKILL)  # never left running
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
    backend = srv.EchoServer("127.0.0.1") if proto == "tcp" else srv.UdpEcho()
    with backend, launched(proxy_path, proto, port, backend.port, {}) as lp:
        assert_unprivileged(lp.pid, DYNAMIC, DYNAMIC)
        if proto == "tcp":
            srv.echo_roundtrip("127.0.0.1", port, b"privileged")
        else:
            assert srv.udp_roundtrip(port, b"privileged") == b"privileged"
        assert lp.stop() == 0


# --------------------------------------------------------------------------
# One identity per proxy (issue 11, item 5).


def _kill_as(uid: int, pid: int) -> int:
    """errno of kill(pid, SIGTERM) sent by a child running as uid (0: delivered)."""
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(pid, signal.SIGTERM)
            os._exit(0)
        except PermissionError:
            os._exit(errno.EPERM)
        except BaseException:
            os._exit(100)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def _lock_is_free(uid: int) -> bool:
    fd = os.open(os.path.join(identity.LOCK_DIR, str(uid)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_every_proxy_gets_a_uid_of_its_own(proxy_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            launched(proxy_path, "tcp", srv.free_port(), echo.port, {}) as a, \
            launched(proxy_path, "tcp", srv.free_port(), echo.port, {}) as b:
        uid_a = assert_unprivileged(a.pid, DYNAMIC, DYNAMIC)
        uid_b = assert_unprivileged(b.pid, DYNAMIC, DYNAMIC)
        assert uid_a != uid_b
        assert 65534 not in (uid_a, uid_b)
        # The lock directory is root's alone, and each proxy holds its uid's lock.
        st = os.lstat(identity.LOCK_DIR)
        assert st.st_uid == 0 and stat_mode(st) == 0o700
        assert not _lock_is_free(uid_a) and not _lock_is_free(uid_b)
        # A process of another uid (nobody, as containers run) cannot stop it.
        assert _kill_as(65534, a.pid) == errno.EPERM
        assert a.proc.poll() is None
        for lp in (a, b):
            port = int(lp.argv[lp.argv.index("-host-port") + 1])
            srv.echo_roundtrip("127.0.0.1", port)
        assert a.stop() == 0
        # The lock goes with the process; the other proxy keeps its own.
        assert _lock_is_free(uid_a)
        assert not _lock_is_free(uid_b)
        assert b.stop() == 0
        assert _lock_is_free(uid_b)


def stat_mode(st) -> int:
    return st.st_mode & 0o7777


def test_uid_lock_directory_must_be_roots_alone(proxy_path, tmp_path):
    # A lock directory others may write to would let them hold (or fake) uids.
    saved = os.stat(identity.LOCK_DIR) if os.path.isdir(identity.LOCK_DIR) else None
    os.makedirs(identity.LOCK_DIR, mode=0o700, exist_ok=True)
    os.chmod(identity.LOCK_DIR, 0o777)
    try:
        argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
        env = {k: v for k, v in os.environ.items()
               if k not in ("SPLICEPROXY_USER", "SPLICEPROXY_KEEP_PRIVILEGES")}
        with pytest.raises(ProxyStartError) as info:
            spawn(argv, env=env, timeout=10.0).stop(signal.SIGKILL)  # never left running
        assert info.value.returncode == 1
        assert "mode 0700" in str(info.value) and identity.LOCK_DIR in str(info.value)
    finally:
        os.chmod(identity.LOCK_DIR, 0o700 if saved is None else stat_mode(saved))


# --------------------------------------------------------------------------
# Inheritable capabilities (issue 11, item 11).

_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21


def _set_inheritable_caps() -> None:
    """In the child before exec: CapInh = NET_ADMIN|SYS_ADMIN, as under some dockerd units."""
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(hdr, data) != 0:
        os._exit(97)
    data[2] = (1 << _CAP_NET_ADMIN) | (1 << _CAP_SYS_ADMIN)  # inheritable, low word
    if libc.capset(hdr, data) != 0:
        os._exit(98)


@pytest.mark.parametrize("env", [{}, {"SPLICEPROXY_USER": "nobody"}], ids=["own-uid", "nobody"])
def test_inheritable_capabilities_do_not_survive_the_drop(proxy_path, env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SPLICEPROXY_USER", "SPLICEPROXY_KEEP_PRIVILEGES")}
    full_env.update(env)
    with srv.EchoServer("127.0.0.1") as echo:
        port = srv.free_port()
        argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
        with spawn(argv, env=full_env, timeout=10.0, preexec_fn=_set_inheritable_caps) as lp:
            st = srv.proc_status(lp.pid)
            for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(st[key], 16) == 0, (key, st[key])
            srv.echo_roundtrip("127.0.0.1", port)
            assert lp.stop() == 0
