"""SPLICEPROXY_FASTPATH through the real process (no root needed).

A bad value is a startup error like any other setting's; a true one on a
proxy serving its port alone says once, in its log, that the fast path is
not active and why, and the proxy relays as before.  The host engine says
once whether it is active and, if not, why.  (As root, the engine's
programs attach to a child cgroup made for the test, never the host's root:
nothing but processes moved into it would be rewritten, and none is.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from spliceproxy.bench.launch import ProxyStartError, proxy_argv, spawn
from spliceproxy.bench.procs import alive

from support import servers as srv


def _env(extra: dict) -> dict:
    """No setting but extra's; standalone unless extra chooses engine mode
    (the default), which the tests here name explicitly."""
    env = srv.env_without_settings({"SPLICEPROXY_ENGINE": "0"})
    env.update(extra)
    return env


@pytest.mark.parametrize("value", ["yes", "on", "enable", "tRUE"])
def test_bad_value_is_a_status_pipe_error(proxy_path, value):
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
    with pytest.raises(ProxyStartError) as info:
        spawn(argv, env=_env({"SPLICEPROXY_FASTPATH": value}), stderr=subprocess.DEVNULL,
              timeout=10.0).stop()
    msg = str(info.value)
    assert info.value.returncode == 1, msg
    assert msg.startswith("invalid SPLICEPROXY_FASTPATH=%r: not a boolean" % value), msg


@pytest.mark.parametrize("value", ["1", "true", "0", ""])
def test_standalone_proxy_relays_and_says_why_the_fast_path_is_off(proxy_path, tmp_path,
                                                                     value):
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      env={"SPLICEPROXY_FASTPATH": value, "SPLICEPROXY_ENGINE": "0"}) as p:
        srv.echo_roundtrip("127.0.0.1", p.port, b"x" * 4096)
        lines = [ln for ln in p.log().splitlines() if "fast path" in ln]
    if value in ("1", "true"):
        assert len(lines) == 1 and "needs the host engine" in lines[0], lines
    else:
        assert lines == []


def test_host_engine_says_once_that_the_fast_path_is_not_active(proxy_path):

    from spliceproxy import fastpath

    d = tempfile.mkdtemp(prefix="fps-")  # short: AF_UNIX paths are 108 bytes
    os.chmod(d, 0o700)
    log = os.path.join(d, "proxies.log")
    env = _env({"SPLICEPROXY_ENGINE": "1", "SPLICEPROXY_ENGINE_SOCKET": os.path.join(d, "e.sock"),
                "SPLICEPROXY_ENGINE_IDLE_EXIT": "1s", "SPLICEPROXY_LOG_FILE": log,
                "SPLICEPROXY_FASTPATH": "1"})
    cg = None
    root = fastpath.default_cgroup_path()
    if os.geteuid() == 0 and root is not None:
        cg = os.path.join(root, "fw-set-%d" % os.getpid())
        os.mkdir(cg)
        env["SPLICEPROXY_FASTPATH_CGROUP"] = cg
    engine_pid = None
    try:
        with srv.EchoServer("127.0.0.1") as echo:
            port = srv.free_port()
            stub = spawn(proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1",
                                    echo.port), env=env, stderr=subprocess.DEVNULL, timeout=15.0)
            try:
                with open(os.path.join(d, "e.sock.lock")) as f:
                    engine_pid = int(f.read().strip() or 0) or None
                srv.echo_roundtrip("127.0.0.1", port, b"x" * 64)  # served through the relay
            finally:
                stub.stop()
        assert srv.wait_for(lambda: "fast path" in open(log).read(), 5.0)
        with open(log) as f:
            lines = [ln for ln in f.read().splitlines() if "fast path" in ln]
        assert len(lines) == 1, lines
        if cg is None:  # unprivileged (or no cgroup v2): why not, in one line
            assert re.search(r"fast path not active \((permission|cgroup|kernel|module)\): "
                             r".*; every client takes the relay$", lines[0]), lines
        else:
            assert re.search(r"fast path (active: .*%s\)$|not active \((kernel|permission|"
                             r"module)\): )" % re.escape(cg), lines[0]), lines
    finally:
        if engine_pid:
            deadline = time.monotonic() + 10
            while alive(engine_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(engine_pid):
                os.kill(engine_pid, 9)
        shutil.rmtree(d, ignore_errors=True)
        if cg is not None:
            assert srv.wait_for(lambda: sum(fastpath.attached(cg).values()) == 0, 10.0)
            os.rmdir(cg)
