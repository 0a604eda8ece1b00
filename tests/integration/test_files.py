"""The log and counters files are opened as root: no links, regular files only, no hang.

dockerd starts proxies as root with its own environment, so whoever can
write into the directory of SPLICEPROXY_LOG_FILE or SPLICEPROXY_STATS_FILE
must not be able to redirect the proxy's writes (a symlink to a root-only
file) or stall its start (a FIFO, before fd 3 is answered).  Every refusal
is ``1\\n<reason>`` on fd 3 and exit 1.
"""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from support import servers as srv
from support.servers import ProxyStartError, proxy_argv, spawn

# In engine mode the stub opens the log file (with dockerd's privileges, by
# the same rules); counters files are the standalone proxy's alone.
VARS = ["SPLICEPROXY_LOG_FILE",
        pytest.param("SPLICEPROXY_STATS_FILE", marks=pytest.mark.standalone_only(
            reason="counters files are written by the standalone proxy only; engine mode "
                   "reports with spliceproxy status: test_engine_mode.py::"
                   "test_status_table_json_and_prometheus_during_traffic"))]
ROOT_ONLY = b"root:$y$j9T$secret:19000:0:99999:7:::\n"


def _env(extra: dict) -> dict:
    env = srv.env_without_settings()
    env.update(extra)
    return env


def _refused(proxy_path: str, extra: dict, timeout: float = 10.0) -> str:
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
    t0 = time.monotonic()
    with pytest.raises(ProxyStartError) as info:
        spawn(argv, env=_env(extra), timeout=timeout).stop(
            signal.SIGKILL)  # started: a failure of the test, and never left running
    assert time.monotonic() - t0 < timeout
    msg = str(info.value)
    assert info.value.returncode == 1, msg
    assert "Traceback" not in msg
    return msg


def _root_only(tmp_path) -> str:
    secret = tmp_path / "shadow"
    secret.write_bytes(ROOT_ONLY)
    os.chmod(secret, 0o600)
    return str(secret)


@pytest.mark.parametrize("var", VARS)
def test_symlink_to_a_root_only_file_is_refused(proxy_path, tmp_path, var):
    secret = _root_only(tmp_path)
    before = os.stat(secret)
    link = tmp_path / "proxy.out"
    os.symlink(secret, link)
    msg = _refused(proxy_path, {var: str(link)})
    assert var in msg and "symbolic link" in msg, msg
    after = os.stat(secret)
    with open(secret, "rb") as f:
        assert f.read() == ROOT_ONLY
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("var", VARS)
def test_fifo_is_refused_at_once(proxy_path, tmp_path, var):
    fifo = tmp_path / "proxy.out"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    msg = _refused(proxy_path, {var: str(fifo)}, timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    assert "FIFO" in msg and "not a regular file" in msg, msg


@pytest.mark.parametrize("var", VARS)
def test_symlinked_directory_component_is_refused(proxy_path, tmp_path, var):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    msg = _refused(proxy_path, {var: str(tmp_path / "link" / "proxy.out")})
    assert "link" in msg and "not a directory" in msg, msg
    assert os.listdir(real) == []


@pytest.mark.parametrize("var", VARS)
def test_devices_and_directories_are_refused(proxy_path, tmp_path, var):
    if var == "SPLICEPROXY_LOG_FILE":
        target = "/dev/zero"  # /dev/null is allowed: it turns logging off
    else:
        target = "/dev/null"
    msg = _refused(proxy_path, {var: target})
    assert "character device" in msg, msg
    if var == "SPLICEPROXY_LOG_FILE":
        msg = _refused(proxy_path, {var: str(tmp_path)})
        assert "directory" in msg, msg


@pytest.mark.parametrize("var", VARS)
def test_hard_link_is_refused(proxy_path, tmp_path, var):
    secret = _root_only(tmp_path)
    os.link(secret, tmp_path / "proxy.out")
    msg = _refused(proxy_path, {var: str(tmp_path / "proxy.out")})
    assert "hard links" in msg, msg
    with open(secret, "rb") as f:
        assert f.read() == ROOT_ONLY


@pytest.mark.parametrize("var", VARS)
def test_file_of_another_user_is_refused(proxy_path, tmp_path, var):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    planted = tmp_path / "proxy.out"
    planted.write_bytes(b"")
    os.chown(planted, 65534, 65534)
    msg = _refused(proxy_path, {var: str(planted)})
    assert "owned by uid 65534" in msg, msg


@pytest.mark.parametrize("var", VARS)
def test_new_files_are_0600(proxy_path, tmp_path, var):
    path = tmp_path / "proxy.out"
    old = os.umask(0o022)
    try:
        with srv.EchoServer("127.0.0.1") as echo:
            port = srv.free_port()
            argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
            with spawn(argv, env=_env({var: str(path)}), timeout=10.0) as lp:
                srv.echo_roundtrip("127.0.0.1", port)
                assert lp.stop() == 0
    finally:
        os.umask(old)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
    assert st.st_uid == os.geteuid()


def test_existing_regular_files_are_used(proxy_path, tmp_path):
    log = tmp_path / "proxy.log"
    log.write_text("earlier\n")
    with srv.EchoServer("127.0.0.1") as echo:
        port = srv.free_port()
        argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
        with spawn(argv, env=_env({"SPLICEPROXY_LOG_FILE": str(log)}), timeout=10.0) as lp:
            assert lp.stop() == 0
    assert log.read_text().startswith("earlier\n")
