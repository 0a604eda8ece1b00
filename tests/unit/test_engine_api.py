"""The binding's contract: counters, options, listeners, errors as OSError."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from spliceproxy import _engine, stats
from spliceproxy.settings import parse_duration


def test_counters_file_carries_the_engines_names(tmp_path):
    path = str(tmp_path / "counters")
    eng = _engine.Engine()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        eng.set_stats_fd(fd)
        assert _engine.STATS_HEADER_SIZE == stats.HEADER.size
        assert _engine.STATS_VERSION == stats.VERSION
        got = stats.read_stats_file(path)
        assert tuple(got) == _engine.stat_names()
        assert not hasattr(stats, "STAT_NAMES")
    finally:
        eng.close()
        os.close(fd)


def test_stats_file_is_written_at_once_and_readable(tmp_path):
    path = str(tmp_path / "counters")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    eng = _engine.Engine()
    try:
        eng.set_stats_fd(fd)
        assert stats.stats_file_pid(path) == os.getpid()
        assert stats.read_stats_file(path)["fds_open"] == eng.stats()["fds_open"] > 0
    finally:
        eng.close()
    # The engine's last image: nothing held any more.
    assert stats.read_stats_file(path)["fds_open"] == 0
    os.close(fd)


def test_stats_file_rejects_garbage(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"x" * 2048)
    with pytest.raises(stats.StatsFormatError):
        stats.read_stats_file(str(p))
    p.write_bytes(b"")
    with pytest.raises(stats.StatsFormatError):
        stats.read_stats_file(str(p))


def test_stats_file_of_layout_1_is_refused_clearly(tmp_path):
    p = tmp_path / "old"
    p.write_bytes(stats.HEADER.pack(stats.MAGIC, 1, 3, 1, 0, 0) + bytes(24))
    with pytest.raises(stats.StatsFormatError, match="version 1"):
        stats.read_stats_file(str(p))


def test_a_descriptor_pwrite_cannot_use_is_refused():
    r, w = os.pipe()
    eng = _engine.Engine()
    try:
        with pytest.raises(OSError) as exc:
            eng.set_stats_fd(w)
        assert exc.value.errno == errno.ESPIPE
        with pytest.raises(OSError) as exc:
            eng.set_stats_fd(-5)
        assert exc.value.errno == errno.EINVAL
        eng.set_stats_fd(-1)
    finally:
        eng.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("option,value", [
    (_engine.OPT_COPY_MODE, 7), (_engine.OPT_PIPE_SIZE, 10), (_engine.OPT_UDP_MAX_FLOWS, 0),
    (99, 1), (_engine.OPT_IDLE_TIMEOUT_MS, -1),
])
def test_bad_options_are_rejected(option, value):
    eng = _engine.Engine()
    with pytest.raises(OSError) as exc:
        eng.set_option(option, value)
    assert exc.value.errno == errno.EINVAL
    eng.close()


def test_closed_engine_refuses_calls():
    eng = _engine.Engine()
    eng.close()
    with pytest.raises(ValueError):
        eng.stats()


def test_open_listener_reports_the_failing_step():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        fd, step = _engine.open_listener(socket.SOCK_STREAM, socket.AF_INET,
                                         socket.inet_aton("127.0.0.1"), port)
        assert (fd, step) == (-errno.EADDRINUSE, "bind")
    finally:
        holder.close()


def test_open_listener_is_v6only_and_listening():
    fd, step = _engine.open_listener(socket.SOCK_STREAM, socket.AF_INET6,
                                     socket.inet_pton(socket.AF_INET6, "::"), 0)
    assert step is None and fd >= 0
    s = socket.socket(fileno=fd)
    try:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert not os.get_inheritable(fd)
    finally:
        s.close()


def test_bad_backend_address_is_a_valueerror():
    eng = _engine.Engine()
    with pytest.raises(ValueError):
        eng.add_tcp(-1, socket.AF_INET, b"\x01\x02", 80)
    with pytest.raises(ValueError):
        eng.add_tcp(-1, socket.AF_INET, b"\x7f\0\0\x01", 70000)
    eng.close()


def test_run_returns_on_timeout_and_on_stop():
    eng = _engine.Engine()
    assert eng.run(10) == _engine.RUN_TIMEOUT
    eng.stop()
    assert eng.run(5000) == _engine.RUN_STOPPED
    eng.close()


def test_run_returns_when_the_watched_fd_is_readable():
    eng = _engine.Engine()
    r, w = os.pipe()
    try:
        eng.watch(r)
        os.write(w, b"x")
        assert eng.run(5000) == _engine.RUN_WATCH
    finally:
        eng.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("text,seconds", [
    ("90", 90.0), ("90s", 90.0), ("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0),
    ("2.5", 2.5), ("300us", 0.0003),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "-1", "1m-2s", "nan", "inf"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)
