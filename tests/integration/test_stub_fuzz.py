"""The stub does not trust its engine: hostile replies never crash or hang it.

The engine runs as an unprivileged user; the stub (root's uid, dockerd's
child) parses what it says.  Here a fake engine on the stub's control socket
answers a real stub's request with messages hypothesis draws (garbage before
the verdict, any bytes, descriptors of any kind), then keeps sending garbage
while the port is served.  Whatever it says, the stub ends its start with
"0\\n" or "1\\n<text>" on fd 3 (or an exit code with nothing, as an "exit"
reply asks), is never killed by a signal, never waits past its deadline, and
closes every descriptor it was sent but the listener it keeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spliceproxy import control
from spliceproxy.bench.launch import proxy_argv, spawn

from support import servers as srv
from support.engine import private_dir

TIMEOUT = 15.0

# A message: its bytes (never empty: on a SOCK_SEQPACKET socket an empty
# message reads as the engine's hang-up) and how many descriptors ride along.
WORDS = [b"ok", b"exit", b"error", b"status", b"removed", b"log", b"remove", b""]
field = st.one_of(st.binary(max_size=40), st.sampled_from(WORDS),
                  st.integers(-2**40, 2**40).map(lambda n: str(n).encode()))
message = st.one_of(
    st.lists(field, min_size=1, max_size=4).map(lambda fs: b"\0".join(fs)),
    st.binary(min_size=1, max_size=2000),
).filter(bool)
garbage = st.lists(st.tuples(message, st.integers(0, 9)), max_size=4)
verdict = st.one_of(
    st.tuples(st.just(b"ok\0"), st.sampled_from([0, 1, 3])),
    st.tuples(st.builds(lambda c, t: b"exit\0" + c + b"\0" + t + b"\0",
                        st.sampled_from([b"1", b"2", b"0", b"-1", b"999999999999", b"x"]),
                        st.binary(max_size=1500).map(lambda b: b.replace(b"\0", b""))),
              st.integers(0, 2)),
    st.tuples(st.builds(lambda t: b"error\0" + t, st.binary(max_size=1500)), st.integers(0, 2)),
)


def _head(msg: bytes) -> bytes:
    return msg.split(b"\0", 1)[0]


def _terminal(msg: bytes) -> bool:
    """Does the stub take this as its engine's verdict (stub.c wait_reply)?"""
    head = _head(msg[:1023])
    return head in (b"ok", b"error") or (head == b"exit" and len(msg[:1023]) > 5)


def _fds(n: int, keep: list) -> list[int]:
    """n descriptors of assorted kinds (a listener first, then pipes, files, sockets)."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            keep.append(s)
            out.append(s.fileno())
        elif kind == 1:
            r, w = os.pipe()
            keep.extend((r, w))
            out.append(r)
        elif kind == 2:
            fd = os.open("/dev/null", os.O_RDONLY)
            keep.append(fd)
            out.append(fd)
        else:
            a, b = socket.socketpair()
            keep.extend((a, b))
            out.append(a.fileno())
    return out


def _close(keep: list) -> None:
    for x in keep:
        with contextlib.suppress(OSError):
            x.close() if hasattr(x, "close") else os.close(x)


def _send(conn: socket.socket, msg: bytes, nfds: int, keep: list) -> None:
    fds = _fds(nfds, keep)
    with contextlib.suppress(OSError):
        if fds:
            socket.send_fds(conn, [msg], fds)
        else:
            conn.send(msg)


def _fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


@pytest.fixture(scope="module")
def sockdir():
    d = private_dir("fz-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(before=garbage, last=verdict, later=garbage)
def test_hostile_engine_replies_never_crash_or_hang_the_stub(proxy_path, sockdir, before,
                                                             last, later):
    path = os.path.join(sockdir, "e.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ls.bind(path)
    ls.listen(4)
    ls.settimeout(TIMEOUT)
    keep: list = []
    got: dict = {}
    serving = threading.Event()
    done = threading.Event()

    def engine():
        conn, _ = ls.accept()
        got["conn"] = conn
        data, fds, _flags, _addr = socket.recv_fds(conn, control.MSG_MAX, control.MAX_FDS)
        got["request"] = control.decode(data, list(fds))
        got["request"].close_fds()
        for msg, n in before:
            if not _terminal(msg):
                _send(conn, msg, n, keep)
        _send(conn, *last, keep)
        if serving.wait(TIMEOUT):
            for msg, n in later:
                _send(conn, msg, n, keep)
        done.wait(TIMEOUT)

    t = threading.Thread(target=engine, daemon=True)
    t.start()
    env = srv.env_without_settings({"SPLICEPROXY_ENGINE": "1",
                                    "SPLICEPROXY_ENGINE_SOCKET": path})
    lp = spawn(proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9),
               env=env, check=False, timeout=TIMEOUT)
    try:
        req = got["request"]
        assert req.command == "map" and req.argv[1:3] == ["-proto", "tcp"]
        status = lp.status
        assert status is not None, "no answer on fd 3 within %s s" % TIMEOUT
        msg, nfds = last
        if _head(msg) == b"ok" and nfds:
            assert status == b"0\n"
            # fd 3 is closed right after "0\n": count from then on.
            assert srv.wait_for(lambda: not os.path.exists("/proc/%d/fd/3" % lp.pid), 5.0)
            base = _fd_count(lp.pid)
            serving.set()
            exits = any(_head(m[:255]) == b"exit" for m, _ in later)
            if exits:
                assert lp.proc.wait(TIMEOUT) == 0
            else:
                # Every descriptor sent with the garbage was closed again.
                assert srv.wait_for(lambda: _fd_count(lp.pid) == base, 5.0), \
                    (base, _fd_count(lp.pid))
                assert lp.proc.poll() is None
                lp.proc.send_signal(signal.SIGINT)
                done.set()  # the fake engine hangs up instead of "removed"
                assert lp.proc.wait(TIMEOUT) == 0
        else:
            rc = lp.proc.wait(TIMEOUT)
            assert rc >= 0, "killed by signal %d" % -rc
            if _head(msg) == b"ok":
                assert status == b"1\nthe spliceproxy engine sent no listener"
            elif _head(msg) == b"error":
                assert rc == 1
                assert status.startswith(b"1\nthe spliceproxy engine at %s refused: "
                                         % path.encode()), status
            else:
                assert status == b"" or status.startswith(b"1\n"), status
        assert b"\0" not in status
    finally:
        serving.set()
        done.set()
        if lp.proc.poll() is None:
            lp.proc.kill()
            lp.proc.wait()
        t.join(TIMEOUT)
        with contextlib.suppress(KeyError):
            got["conn"].close()
        ls.close()
        _close(keep)
