"""SPLICEPROXY_SPIN: the busy-poll after traffic is bounded by the clock.

A spin that never ends (a window re-armed by its own empty polls, or by
traffic that moved nothing) would keep a whole CPU busy for every idle
published port, which is why the window is clock-bounded and only traffic
re-arms it.  The proxy is measured from the outside, as a user would see it:
CPU time from /proc/PID/stat, bytes checked end to end.
"""

from __future__ import annotations

import os
import time

import pytest

from support import servers as srv

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The longest spin the setting allows: a leak of it is then easy to see.
SPIN = "10ms"


def _cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _idle_cpu(pid: int, seconds: float = 1.0) -> float:
    c0 = _cpu_seconds(pid)
    time.sleep(seconds)
    return _cpu_seconds(pid) - c0


def _exchange(sock, n: int) -> None:
    for i in range(n):
        payload = os.urandom(1 + i % 200)
        sock.sendall(payload)
        assert srv.recv_exact(sock, len(payload)) == payload


@pytest.mark.standalone_only(
    reason="SPLICEPROXY_SPIN is a setting of the whole loop, not of one mapping: in engine mode "
           "the engine's own environment sets it, and a mapping's other value is logged: "
           "test_engine_mode.py::test_settings_an_engine_cannot_apply_per_mapping_are_logged")
def test_spin_relays_and_stops_when_traffic_stops(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      env={"SPLICEPROXY_SPIN": SPIN}) as p:
        a, b = p.connect(), p.connect()
        try:
            _exchange(a, 500)
            _exchange(b, 50)
            st = p.stats()
            # It did spin, and some polls found the reply (a wake-up saved).
            assert st["spin_polls"] > 0 and st["spin_hits"] > 0, st
            # Both connections open and quiet: within a few milliseconds of
            # the last byte the engine sleeps again.  A spin that never ended
            # would cost about one second per second here.
            time.sleep(0.1)
            used = _idle_cpu(p.pid)
            assert used <= 0.05, "an idle proxy with spin on used %.2f s CPU in 1 s" % used
            polls = p.stats()["spin_polls"]
            time.sleep(0.3)
            assert p.stats()["spin_polls"] == polls, "still polling with no traffic"
            # And it still relays, on the old connections and a new one.
            _exchange(a, 20)
            _exchange(b, 20)
            srv.echo_roundtrip("127.0.0.1", p.port, os.urandom(5000))
        finally:
            a.close()
            b.close()
        p.wait_idle()
        time.sleep(0.1)
        used = _idle_cpu(p.pid)
        assert used <= 0.05, "a proxy without connections used %.2f s CPU in 1 s" % used
        assert p.alive()


def test_spin_off_by_default_never_polls(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        with p.connect() as s:
            _exchange(s, 200)
        p.wait_idle()
        st = p.stats()
        assert st["spin_polls"] == 0 and st["spin_hits"] == 0, st
        assert st["tcp_closed"] == 1
