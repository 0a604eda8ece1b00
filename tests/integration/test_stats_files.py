"""Counters of one proxy never land in another's file.

dockerd gives every proxy the same environment, hence the same
SPLICEPROXY_STATS_FILE.  A directory gives each proxy
``<dir>/spliceproxy-<pid>.stats``, ``%p`` in a path is replaced by the pid,
and a plain file is locked by the proxy that has it: a second proxy on it
fails to start, saying how to give each its own.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from spliceproxy import stats

from support import servers as srv
from support.servers import ProxyStartError, proxy_argv, spawn

# Counters files are the standalone proxy's; the engine keeps none and
# reports with `spliceproxy status`.
pytestmark = pytest.mark.standalone_only(
    reason="counters files are written by the standalone proxy only; engine mode: "
           "test_engine_mode.py::test_status_table_json_and_prometheus_during_traffic")


def _env(extra: dict) -> dict:
    env = srv.env_without_settings()
    env.update(extra)
    return env


def _start(proxy_path: str, backend: int, extra: dict):
    port = srv.free_port()
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", backend)
    return spawn(argv, env=_env(extra), timeout=10.0), port


def _accepted(path: str, n: int):
    def check():
        try:
            st = stats.read_stats_file(path)
        except (OSError, stats.StatsFormatError):
            return None
        return st if st["tcp_accepted"] == n and st["tcp_active"] == 0 else None
    return srv.wait_for(check, 3.0)


def test_a_directory_gives_each_proxy_its_own_file(proxy_path, tmp_path):
    with srv.EchoServer("127.0.0.1") as echo:
        a, port_a = _start(proxy_path, echo.port, {"SPLICEPROXY_STATS_FILE": str(tmp_path)})
        b, port_b = _start(proxy_path, echo.port, {"SPLICEPROXY_STATS_FILE": str(tmp_path)})
        try:
            for _ in range(3):
                srv.echo_roundtrip("127.0.0.1", port_a)
            srv.echo_roundtrip("127.0.0.1", port_b)
            path_a = tmp_path / ("spliceproxy-%d.stats" % a.pid)
            path_b = tmp_path / ("spliceproxy-%d.stats" % b.pid)
            assert _accepted(str(path_a), 3), stats.read_stats_file(str(path_a))
            assert _accepted(str(path_b), 1), stats.read_stats_file(str(path_b))
            assert stats.stats_file_pid(str(path_a)) == a.pid
            assert stats.stats_file_pid(str(path_b)) == b.pid
            assert sorted(os.listdir(tmp_path)) == sorted([path_a.name, path_b.name])
            assert a.stop() == 0 and b.stop() == 0
        finally:
            for lp in (a, b):
                if lp.proc.poll() is None:
                    lp.proc.kill()
                    lp.proc.wait()


def test_percent_p_is_the_pid(proxy_path, tmp_path):
    spec = str(tmp_path / "counters-%p-100%%.stats")
    with srv.EchoServer("127.0.0.1") as echo:
        lp, port = _start(proxy_path, echo.port, {"SPLICEPROXY_STATS_FILE": spec})
        with lp:
            srv.echo_roundtrip("127.0.0.1", port)
            path = tmp_path / ("counters-%d-100%%.stats" % lp.pid)
            assert _accepted(str(path), 1)
            assert lp.stop() == 0


def test_a_second_proxy_on_a_plain_file_is_refused_with_the_hint(proxy_path, tmp_path):
    shared = str(tmp_path / "shared.stats")
    with srv.EchoServer("127.0.0.1") as echo:
        first, port = _start(proxy_path, echo.port, {"SPLICEPROXY_STATS_FILE": shared})
        with first:
            with pytest.raises(ProxyStartError) as info:
                _start(proxy_path, echo.port, {"SPLICEPROXY_STATS_FILE": shared})[0].stop(
                    signal.SIGKILL)  # started: a failure of the test, never left running
            msg = str(info.value)
            assert info.value.returncode == 1
            assert msg.startswith("cannot open counters file (SPLICEPROXY_STATS_FILE): ")
            assert "in use by another proxy" in msg and "%p" in msg and "directory" in msg, msg
            srv.echo_roundtrip("127.0.0.1", port)
            assert _accepted(shared, 1)
            assert stats.stats_file_pid(shared) == first.pid
            assert first.stop() == 0
        # Free again once its proxy is gone.
        again, port = _start(proxy_path, echo.port, {"SPLICEPROXY_STATS_FILE": shared})
        with again:
            assert again.stop() == 0


@pytest.mark.parametrize("form", ["directory", "percent-p"])
def test_per_process_file_is_removed_at_exit(proxy_path, tmp_path, form):
    spec = str(tmp_path) if form == "directory" else str(tmp_path / "c-%p.stats")
    # Kept privileges: the proxy may still remove what it created.
    extra = {"SPLICEPROXY_STATS_FILE": spec, "SPLICEPROXY_KEEP_PRIVILEGES": "1"}
    with srv.EchoServer("127.0.0.1") as echo:
        lp, port = _start(proxy_path, echo.port, extra)
        srv.echo_roundtrip("127.0.0.1", port)
        assert len(os.listdir(tmp_path)) == 1
        assert lp.stop() == 0
    assert os.listdir(tmp_path) == []


def test_files_of_gone_proxies_are_swept_by_the_next(proxy_path, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: only a proxy that dropped privileges leaves its file behind")
    extra = {"SPLICEPROXY_STATS_FILE": str(tmp_path)}
    with srv.EchoServer("127.0.0.1") as echo:
        old, _ = _start(proxy_path, echo.port, extra)
        live, _ = _start(proxy_path, echo.port, extra)
        with live:
            assert old.stop() == 0
            old_name = "spliceproxy-%d.stats" % old.pid
            live_name = "spliceproxy-%d.stats" % live.pid
            # Unprivileged by now, it could not remove its file from root's directory.
            assert sorted(os.listdir(tmp_path)) == sorted([old_name, live_name])
            (tmp_path / "notes.txt").write_text("not a counters file\n")
            new, _ = _start(proxy_path, echo.port, extra)
            with new:
                names = sorted(os.listdir(tmp_path))
                # The gone proxy's file is swept; the live one's and others' stay.
                assert names == sorted([live_name, "spliceproxy-%d.stats" % new.pid,
                                        "notes.txt"]), names
                assert new.stop() == 0
            assert live.stop() == 0


def test_stats_directory_with_a_link_is_refused(proxy_path, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
    with pytest.raises(ProxyStartError) as info:
        spawn(argv, env=_env({"SPLICEPROXY_STATS_FILE": str(tmp_path / "link")}),
              stderr=subprocess.DEVNULL, timeout=10.0).stop(signal.SIGKILL)
    assert "symbolic link" in str(info.value), str(info.value)
    assert os.listdir(real) == []


def test_proxies_starting_together_in_one_directory_each_keep_a_file(proxy_path, tmp_path):
    # dockerd starts the proxies of a container at once; every start sweeps
    # the directory, and no sweep may remove a file a starting proxy just made.
    extra = {"SPLICEPROXY_STATS_FILE": str(tmp_path)}
    with srv.EchoServer("127.0.0.1") as echo:
        started: list = []

        def start():
            started.append(_start(proxy_path, echo.port, extra))

        try:
            srv.run_threads(*[start for _ in range(8)], timeout=60)
            for lp, port in started:
                srv.echo_roundtrip("127.0.0.1", port)
                path = str(tmp_path / ("spliceproxy-%d.stats" % lp.pid))
                assert _accepted(path, 1), (path, sorted(os.listdir(tmp_path)))
                assert stats.stats_file_pid(path) == lp.pid
            assert [lp.stop() for lp, _ in started] == [0] * 8
        finally:
            for lp, _ in started:
                if lp.proc.poll() is None:
                    lp.stop(signal.SIGKILL)
