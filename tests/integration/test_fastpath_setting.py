"""SPLICEPROXY_FASTPATH through the real process (no root needed).

A bad value is a startup error like any other setting's; a true one on a
proxy serving its port alone says once, in its log, that the fast path is
not active and why, and the proxy relays as before.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from spliceproxy.bench.launch import ProxyStartError, proxy_argv, spawn

from support import servers as srv


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLICEPROXY_")}
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
                      env={"SPLICEPROXY_FASTPATH": value}) as p:
        srv.echo_roundtrip("127.0.0.1", p.port, b"x" * 4096)
        lines = [ln for ln in p.log().splitlines() if "fast path" in ln]
    if value in ("1", "true"):
        assert len(lines) == 1 and "needs the host engine" in lines[0], lines
    else:
        assert lines == []
