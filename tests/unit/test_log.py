"""Go ``log``-format lines to stderr or to SPLICEPROXY_LOG_FILE, never blocking."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from spliceproxy import log as splog
from spliceproxy.files import FileRefused
from spliceproxy.log import Logger

LINE = re.compile(r"(\d{4})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2}) (.*)\n", re.S)


@pytest.fixture(autouse=True)
def _close_loggers(monkeypatch):
    """Close every Logger a test made: one that reopened stderr or opened a
    file owns that descriptor until closed."""
    made = []
    init = Logger.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Logger, "__init__", tracked)
    yield
    for logger in made:
        logger.close()


def _check_stamp(line: str, before: float, after: float) -> str:
    m = LINE.fullmatch(line)
    assert m, repr(line)
    fields = tuple(int(x) for x in m.groups()[:6])
    stamp = time.mktime((*fields, 0, 0, -1))  # local time, as Go's log uses
    assert int(before) - 1 <= stamp <= after + 1
    return m.group(7)


class StderrPipe:
    """Point fd 2 at a pipe inside a ``with`` block (pytest re-points fd 2
    between test phases, so this cannot be a fixture)."""

    def __enter__(self):
        self._r, w = os.pipe()
        self._saved = os.dup(2)
        os.dup2(w, 2)
        os.close(w)
        os.set_blocking(self._r, False)
        return self

    def read(self) -> bytes:
        try:
            return os.read(self._r, 65536)
        except BlockingIOError:
            return b""

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False

    def close(self):
        os.close(self._r)


@pytest.fixture
def stderr_pipe():
    pipe = StderrPipe()
    yield pipe
    pipe.close()


def test_line_format_on_stderr(stderr_pipe):
    before = time.time()
    with stderr_pipe:
        logger = Logger()
        assert logger.path == "" and logger.enabled
        logger.log("Stopping proxy on tcp/0.0.0.0:80 for tcp/172.17.0.2:80 (reason)")
    after = time.time()
    data = stderr_pipe.read().decode()
    msg = _check_stamp(data, before, after)
    assert msg == "Stopping proxy on tcp/0.0.0.0:80 for tcp/172.17.0.2:80 (reason)"


def test_trailing_newline_not_doubled(stderr_pipe):
    with stderr_pipe:
        logger = Logger()
        logger.log("one\n")
        logger.log("")
    lines = stderr_pipe.read().decode().splitlines(keepends=True)
    assert len(lines) == 2
    assert lines[0].endswith(" one\n") and lines[1].endswith(" \n")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_each_line_is_one_write(tmp_path):
    path = tmp_path / "proxy.log"
    trace = tmp_path / "trace"
    msg = "x" * 3000 + " multi\nline"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from spliceproxy.log import Logger; "
        "Logger(sys.argv[2]).log(sys.argv[3])"
    )
    src = os.path.dirname(os.path.dirname(splog.__file__))
    res = subprocess.run(
        ["strace", "-f", "-e", "trace=write", "-o", str(trace),
         sys.executable, "-c", code, src, str(path), msg],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    writes = [ln for ln in trace.read_text().splitlines() if "write(" in ln]
    assert len(writes) == 1, writes
    assert path.read_text().endswith(" " + msg + "\n")


def test_file(tmp_path, stderr_pipe):
    path = tmp_path / "sub" / "proxy.log"
    path.parent.mkdir()
    old_umask = os.umask(0o022)
    try:
        before = time.time()
        with stderr_pipe:
            logger = Logger(str(path))
            logger.log("first")
            Logger(str(path)).log("second from another logger")
            logger.log("third")
        after = time.time()
    finally:
        os.umask(old_umask)
    assert logger.enabled and logger.fd != 2 and logger.path == str(path)
    lines = path.read_text().splitlines(keepends=True)
    assert [_check_stamp(ln, before, after) for ln in lines] == [
        "first", "second from another logger", "third",
    ]  # fmt: skip
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # created for the proxy alone
    assert os.get_inheritable(logger.fd) is False
    assert os.fstat(logger.fd).st_ino == os.stat(path).st_ino
    assert fcntl.fcntl(logger.fd, fcntl.F_GETFL) & os.O_APPEND
    assert stderr_pipe.read() == b""  # nothing went to stderr
    logger.close()
    logger.log("after close is dropped")
    assert len(path.read_text().splitlines()) == 3


def test_appends_to_existing_file(tmp_path):
    path = tmp_path / "proxy.log"
    path.write_text("earlier line\n")
    logger = Logger(str(path))
    logger.log("new")
    logger.close()
    text = path.read_text()
    assert text.startswith("earlier line\n") and text.endswith(" new\n")


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "nul"])
def test_unopenable_file_is_refused(tmp_path, where):
    bad = {
        "missing_dir": str(tmp_path / "nope" / "proxy.log"),
        "is_dir": str(tmp_path),
        "nul": str(tmp_path / "a\0b"),  # cannot come from the environment, only from callers
    }[where]
    with pytest.raises((FileRefused, ValueError)) as info:
        Logger(bad)
    if where == "missing_dir":
        assert str(info.value) == f"{tmp_path}/nope: No such file or directory"
    if where == "is_dir":
        assert str(info.value) == f"{bad} is a directory, not a regular file"


def test_disabled_when_stderr_is_devnull():
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        logger = Logger()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    assert logger.enabled is False


def test_disabled_when_log_file_is_devnull(tmp_path):
    assert Logger(os.devnull).enabled is False
    assert Logger(str(tmp_path / "x.log")).enabled is True


def test_devnull_detection_in_child_started_like_dockerd():
    # dockerd gives the proxy /dev/null on 0, 1 and 2.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from spliceproxy.log import Logger; "
        "l = Logger(); l.log('x'); open(sys.argv[2], 'w').write(repr(l.enabled))"
    )
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sp-log-{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k != "SPLICEPROXY_LOG_FILE"}
    try:
        res = subprocess.run(
            [sys.executable, "-c", code, os.path.dirname(os.path.dirname(splog.__file__)), out],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0
        with open(out) as f:
            assert f.read() == "False"
    finally:
        if os.path.exists(out):
            os.unlink(out)


def test_closed_stderr_is_disabled_and_silent():
    saved = os.dup(2)
    try:
        os.close(2)
        logger = Logger()
        logger.log("goes nowhere")  # must not raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert logger.enabled is False


def test_write_errors_are_swallowed():
    r, w = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(w, 2)
        os.close(w)
        logger = Logger()
        assert logger.enabled
        os.close(r)  # reader gone: EPIPE (SIGPIPE is ignored by Python)
        logger.log("dropped")
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def test_full_disk_is_swallowed():
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full not available")
    # A log file must be a regular file, so /dev/full can only be stderr.
    full = os.open("/dev/full", os.O_WRONLY)
    saved = os.dup(2)
    try:
        os.dup2(full, 2)
        logger = Logger()
        assert logger.enabled
        logger.log("ENOSPC is dropped")
        assert logger.dropped == 1
        logger.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(full)


def test_full_nonblocking_pipe_drops_line():
    r, w = os.pipe()
    os.set_blocking(w, False)
    saved = os.dup(2)
    try:
        os.dup2(w, 2)
        os.set_blocking(2, False)
        logger = Logger()
        # Fill the pipe, then one more line must be dropped, not block or raise.
        while True:
            try:
                os.write(2, b"x" * 65536)
            except BlockingIOError:
                break
        logger.log("would block")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
        os.close(r)


def test_undecodable_text_written_as_original_bytes(tmp_path):
    path = tmp_path / "b.log"
    logger = Logger(str(path))
    logger.log("bad " + os.fsdecode(b"\xff\xfe"))  # argv/environ bytes round-trip
    logger.log("lone \ud800")  # not from the OS: escaped, never an exception
    logger.close()
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[0].endswith(b" bad \xff\xfe\n")
    assert lines[1].endswith(b" lone \\ud800\n")


def test_for_fd_logs_to_a_descriptor_it_owns_without_waiting():
    r, w = os.pipe()
    log = Logger.for_fd(w, "/var/log/x.log")
    assert log.enabled and log.path == "/var/log/x.log"
    log.log("first")
    assert os.read(r, 4096).endswith(b" first\n")
    # Nobody reads: lines are queued or dropped, never waited for.
    for _ in range(20000):
        log.log("x" * 100)
    r2, w2 = os.pipe()
    assert log.use_fd(w2)
    with pytest.raises(OSError):
        os.fstat(w)  # the old descriptor was the log's: closed
    log.log("second")
    got = b""
    while b" second\n" not in got:  # the lines still queued come first
        log.flush()
        got += os.read(r2, 1 << 20)
    log.close()
    os.close(r)
    os.close(r2)


def test_for_fd_on_a_socket_or_nothing_writes_nothing():
    a, b = socket.socketpair()
    fd = a.detach()
    log = Logger.for_fd(fd)
    assert not log.enabled
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: a socket takes no RWF_NOWAIT
    log.log("lost")
    assert not Logger.for_fd(None).enabled
    r, w = os.pipe()
    log = Logger.for_fd(w)
    c, d = socket.socketpair()
    assert not log.use_fd(c.detach())
    log.log("still here")
    assert os.read(r, 4096).endswith(b" still here\n")
    log.close()
    for x in (b, d):
        x.close()
    os.close(r)
