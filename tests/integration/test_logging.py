"""Logging never stalls relaying, and SIGHUP reopens the log file.

The loop writes its own log lines.  With stderr on a pipe nobody reads, a
blocking write used to stop every transfer after a few dozen lines, and
remote clients can cause lines at will (each refused backend connect is
one).  Now lines wait in a bounded buffer, are dropped and counted when it
is full, and the count is logged once the output takes lines again.
"""

from __future__ import annotations

import os
import pathlib
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from support import servers as srv
from support.servers import proxy_argv, spawn

DROPPED = re.compile(rb"(\d+) log lines? dropped")


def _env(extra: dict | None = None) -> dict:
    env = srv.env_without_settings()
    env.update(extra or {})
    return env


def _refused_connect(port: int) -> None:
    """One client whose backend connect fails: the proxy closes it and logs a line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        try:
            s.recv(1)
        except ConnectionResetError:
            pass


def _read_available(fd: int, wait: float) -> bytes:
    out = b""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return out
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return out
        out += chunk


def test_unread_stderr_pipe_never_stops_relaying(proxy_path):
    r, w = os.pipe()
    backend_port = srv.free_port()  # nothing listens yet: every connect is refused
    port = srv.free_port()
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", backend_port)
    try:
        lp = spawn(argv, env=_env(), stderr=w, timeout=10.0)
    finally:
        os.close(w)
    try:
        # Far more lines than the pipe (64 KiB) and the proxy's buffer hold.
        t0 = time.monotonic()
        for _ in range(2500):
            _refused_connect(port)
        assert time.monotonic() - t0 < 60
        assert lp.proc.poll() is None
        # The relay still works: a 4 MB transfer completes.
        with srv.EchoServer("127.0.0.1", backend_port):
            with srv.connect("127.0.0.1", port, timeout=10.0) as s:
                payload = os.urandom(4 << 20)
                got = srv.run_threads(lambda: s.sendall(payload),
                                      lambda: srv.recv_exact(s, len(payload)), timeout=30)[1]
                assert got == payload
        # Reading again: buffered lines come out, then one line with the count
        # of those lost (written on the proxy's next lines).
        text = b""
        deadline = time.monotonic() + 20
        while not DROPPED.search(text) and time.monotonic() < deadline:
            text += _read_available(r, 0.2)
            _refused_connect(port)
        m = DROPPED.search(text)
        assert m, text[-500:]
        assert int(m.group(1)) > 0
        assert text.count(b"Can't forward traffic to backend") > 100
        # Lines are whole: each ends before the next timestamp starts.
        for line in text.splitlines():
            assert re.fullmatch(rb"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d .+", line), line
        assert lp.stop() == 0
    finally:
        if lp.proc.poll() is None:
            lp.proc.kill()
            lp.proc.wait()
        os.close(r)


def test_stderr_description_shared_with_the_parent_stays_blocking(proxy_path):
    # O_NONBLOCK goes on a description of the proxy's own; the one dockerd
    # (or a shell) shares with it is left as it was.
    r, w = os.pipe()
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
    try:
        with spawn(argv, env=_env(), stderr=w, timeout=10.0) as lp:
            assert os.get_blocking(w)
            flags = open("/proc/%d/fdinfo/2" % lp.pid).read()
            assert int(re.search(r"flags:\s+(\d+)", flags).group(1), 8) & os.O_NONBLOCK == 0
            assert lp.stop() == 0
    finally:
        os.close(w)
        os.close(r)


@pytest.fixture
def cleanup():
    dirs: list = []
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _hup_case(proxy_path, tmp_path, env_extra: dict):
    log = tmp_path / "proxy.log"
    port = srv.free_port()
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", srv.free_port())
    lp = spawn(argv, env=_env({"SPLICEPROXY_LOG_FILE": str(log), **env_extra}), timeout=10.0)
    try:
        _refused_connect(port)
        assert srv.wait_for(lambda: b"Can't forward" in log.read_bytes())
        os.rename(log, tmp_path / "proxy.log.1")  # what logrotate does
        lp.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert lp.proc.poll() is None, "SIGHUP stopped the proxy"
        _refused_connect(port)
        return lp, log, tmp_path / "proxy.log.1"
    except BaseException:
        lp.stop(signal.SIGKILL)
        raise


@pytest.mark.parametrize("how", ["kept-privileges", "user-owning-the-directory"])
def test_sighup_reopens_the_log_file(proxy_path, tmp_path, how, cleanup):
    if how == "kept-privileges":
        extra = {"SPLICEPROXY_KEEP_PRIVILEGES": "1"}
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to start a proxy that becomes another user")
        uid = next(u for u in range(23456, 23556) if not srv.has_uid(u))
        # pytest's own directories are root's alone: one the user can reach.
        tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="hp-log-", dir="/tmp"))
        cleanup.append(tmp_path)
        os.chown(tmp_path, uid, uid)
        extra = {"SPLICEPROXY_USER": str(uid)}
    lp, log, rotated = _hup_case(proxy_path, tmp_path, extra)
    try:
        assert srv.wait_for(lambda: log.exists() and b"Can't forward" in log.read_bytes()), \
            "no new line at the path after SIGHUP"
        assert rotated.read_bytes().count(b"Can't forward") == 1
        assert lp.stop() == 0
    finally:
        if lp.proc.poll() is None:
            lp.stop(signal.SIGKILL)


@pytest.mark.standalone_only(
    reason="only a proxy that dropped its privileges cannot reopen; "
           "in engine mode the stub reopens with dockerd's: test_logging.py"
           "::test_sighup_reopens_the_log_file[engine-...]")
def test_sighup_that_cannot_reopen_keeps_the_old_file(proxy_path, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: only a proxy that dropped privileges may lack the permission")
    lp, log, rotated = _hup_case(proxy_path, tmp_path, {})  # own uid: cannot create in tmp_path
    try:
        assert srv.wait_for(lambda: rotated.read_bytes().count(b"Can't forward") == 2)
        text = rotated.read_bytes()
        assert b"cannot reopen log file %s" % str(log).encode() in text, text
        assert not log.exists()
        assert lp.stop() == 0
    finally:
        if lp.proc.poll() is None:
            lp.stop(signal.SIGKILL)



def test_sighup_with_stderr_logging_keeps_running(proxy_path):
    port = srv.free_port()
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9)
    with spawn(argv, env=_env(), stderr=subprocess.DEVNULL, timeout=10.0) as lp:
        lp.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert lp.proc.poll() is None
        assert lp.stop() == 0
