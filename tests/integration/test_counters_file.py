"""The counters file (SPLICEPROXY_STATS_FILE) is a copy the engine writes, never
memory the engine trusts.

dockerd gives every proxy the same environment, so every proxy may be pointed
at the same file, and whoever owns the file can write to it.  The engine keeps
its counters privately and writes images of them to the file: another proxy
sharing it, garbage written into it, or the file being truncated or unable to
grow must never change what the engine decides, nor stop or kill it.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import threading
import time

import pytest

from spliceproxy import stats

from support import servers as srv
from support.servers import ProxyStartError

# Counters files are the standalone proxy's; the engine keeps none and
# reports with `spliceproxy status`.
pytestmark = pytest.mark.standalone_only(
    reason="counters files are written by the standalone proxy only; engine mode: "
           "test_engine_mode.py::test_status_table_json_and_prometheus_during_traffic")

MIB = 1 << 20


def _value_offset(path: str, name: str) -> int:
    """Byte offset of counter ``name`` in the file, from the names inside it."""
    names = list(stats.read_stats_file(path))
    return stats.HEADER.size + 8 * names.index(name)


def _serves(p: srv.Proxy, timeout: float = 5.0) -> bool:
    """Whether a new client gets its bytes echoed within ``timeout``."""
    try:
        srv.echo_roundtrip("127.0.0.1", p.port, os.urandom(1000), timeout=timeout)
        return True
    except (OSError, EOFError):
        return False


def test_a_second_proxy_on_one_counters_file_changes_nothing(proxy_path, tmp_path):
    shared = str(tmp_path / "shared.stats")
    env = {"SPLICEPROXY_STATS_FILE": shared}
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      env=env) as a:
        held = [a.connect() for _ in range(20)]
        for s in held:
            s.sendall(b"x")
            assert srv.recv_exact(s, 1) == b"x"
        # A second proxy on the same file: with a shared mapping it zeroed the
        # first one's gauges, which then wrapped below zero as its connections
        # closed, and fds_open near 2^64 paused its accepting for good.  The
        # file is now locked by its proxy, so the second one is refused.
        with pytest.raises(ProxyStartError, match="in use by another proxy"):
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      env=env).close()  # started: a failure, never left running
        for s in held:
            s.close()
        time.sleep(0.3)
        for _ in range(3):
            assert _serves(a), "the first proxy stopped accepting"
        assert a.alive()
        st = srv.wait_for(lambda: (lambda x: x if x["tcp_active"] == 0 else None)(
            stats.read_stats_file(shared)), 2.0)
        assert st and st["tcp_closed"] == 23 and st["fds_open"] < 1000, st
        assert stats.stats_file_pid(shared) == a.pid


def test_garbage_written_into_the_file_does_not_stop_accepting(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        assert _serves(p)
        off = _value_offset(p.stats_path, "fds_open")
        with open(p.stats_path, "r+b") as f:
            for _ in range(20):
                f.seek(off)
                f.write(struct.pack("<Q", 1 << 62))
                f.flush()
                assert _serves(p), "a number written into the file paused accepting"
        # The next images repair the file.
        st = srv.wait_for(lambda: (lambda s: s if s["fds_open"] < 1000 else None)(p.stats()),
                          2.0)
        assert st, p.stats()
        assert st["tcp_accepted"] == 21 and st["accept_pauses"] == 0, st


def test_truncating_the_file_while_relaying_does_not_kill_the_proxy(proxy_path, tmp_path):
    total = 64 * MIB
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        s = p.connect(timeout=30.0)
        got = [0]

        def reader():
            while got[0] < total:
                chunk = s.recv(MIB)
                if not chunk:
                    return
                got[0] += len(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        block = os.urandom(MIB)
        for i in range(64):
            s.sendall(block)
            if i % 8 == 4:
                # A shared mapping of a truncated file killed the proxy with SIGBUS.
                os.truncate(p.stats_path, 0)
        t.join(60)
        s.close()
        assert got[0] == total and p.alive()
        # Counters keep coming: the file is written whole again.
        assert _serves(p)
        st = srv.wait_for(lambda: (lambda x: x if x and x["tcp_closed"] == 2 else None)(
            _read_or_none(p.stats_path)), 3.0)
        assert st, _read_or_none(p.stats_path)
        assert st["bytes_c2b"] == st["bytes_b2c"] == total + 1000, st


def _read_or_none(path: str):
    try:
        return stats.read_stats_file(path)
    except (OSError, stats.StatsFormatError):
        return None


def test_a_file_that_cannot_grow_never_stops_the_relay(proxy_path, tmp_path):
    # RLIMIT_FSIZE makes every write past 64 bytes short or refused (EFBIG;
    # Python ignores SIGXFSZ), as a full file system would.
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      env={"SPLICEPROXY_LOG_FILE": ""}, preexec_fn=small_files) as p:
        for _ in range(5):
            assert _serves(p)
            time.sleep(0.12)
        srv.echo_roundtrip("127.0.0.1", p.port, os.urandom(4 * MIB), timeout=20.0)
        assert p.alive()
        assert os.path.getsize(p.stats_path) <= 64


def test_the_last_change_lands_within_a_flush_interval(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        payload = os.urandom(300_000)
        srv.echo_roundtrip("127.0.0.1", p.port, payload)
        time.sleep(0.5)  # no traffic since: the pending image must have been written
        st = p.stats()
        assert st["tcp_closed"] == 1 and st["tcp_active"] == 0, st
        assert st["bytes_c2b"] == st["bytes_b2c"] == len(payload), st
        assert st["stats_write_errors"] == 0
        # An idle engine sleeps: no image is written without a change.
        before = os.stat(p.stats_path).st_mtime_ns
        time.sleep(0.4)
        assert os.stat(p.stats_path).st_mtime_ns == before
        assert p.stats() == st


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_the_file_holds_the_final_counters_after_a_stop(proxy_path, tmp_path, sig):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        held = p.connect()
        held.sendall(b"y")
        assert srv.recv_exact(held, 1) == b"y"
        assert p.stop(getattr(signal, sig)) == 0
        held.close()
        st = stats.read_stats_file(p.stats_path)
        assert st["tcp_accepted"] == 1 and st["tcp_active"] == 0 and st["fds_open"] == 0, st
        assert st["pipes_open"] == 0


def test_the_reader_takes_the_names_from_the_file(tmp_path):
    names = [b"alpha", b"beta_total"]
    blob = b"".join(n + b"\0" for n in names)
    off = stats.HEADER.size + 16
    data = stats.HEADER.pack(stats.MAGIC, stats.VERSION, 2, 7, off, len(blob))
    data += struct.pack("<2Q", 3, 1 << 40) + blob
    p = tmp_path / "future.stats"
    p.write_bytes(data)
    assert stats.read_stats_file(str(p)) == {"alpha": 3, "beta_total": 1 << 40}
    assert stats.stats_file_pid(str(p)) == 7
    p.write_bytes(data[:-3])
    with pytest.raises(stats.StatsFormatError):
        stats.read_stats_file(str(p))
