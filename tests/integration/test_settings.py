"""Bad SPLICEPROXY_* settings through the real process: ``1\\n<message>`` on fd 3, exit 1.

Each form here used to fail open or crash: KEEP_PRIVILEGES=no kept root with
every capability, USER=<Arabic-Indic zero> became uid 0, USER=<superscript
two> and a non-UTF-8 path raised a traceback and left fd 3 empty, and a bad
USER was only found after the port was bound.  Now every setting is checked
before any socket is opened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess

import pytest

from spliceproxy import settings

from support import servers as srv
from support.servers import ProxyStartError, proxy_argv, spawn

BAD = [
    ({"SPLICEPROXY_KEEP_PRIVILEGES": "false "}, "SPLICEPROXY_KEEP_PRIVILEGES", "not a boolean"),
    ({"SPLICEPROXY_KEEP_PRIVILEGES": "no"}, "SPLICEPROXY_KEEP_PRIVILEGES", "not a boolean"),
    ({"SPLICEPROXY_KEEP_PRIVILEGES": "off"}, "SPLICEPROXY_KEEP_PRIVILEGES", "not a boolean"),
    ({"SPLICEPROXY_KEEP_PRIVILEGES": "yes"}, "SPLICEPROXY_KEEP_PRIVILEGES", "not a boolean"),
    ({"SPLICEPROXY_USER": "\u0660"}, "SPLICEPROXY_USER", "neither a user name nor a uid"),
    ({"SPLICEPROXY_USER": "\u00b2"}, "SPLICEPROXY_USER", "neither a user name nor a uid"),
    ({"SPLICEPROXY_USER": "4294967295"}, "SPLICEPROXY_USER", "uid out of range"),
    ({"SPLICEPROXY_PIPE_SIZE": "\u0664\u0660\u0669\u0666"}, "SPLICEPROXY_PIPE_SIZE",
     "ASCII digits"),
    ({"SPLICEPROXY_UDP_MAX_FLOWS": "0x10"}, "SPLICEPROXY_UDP_MAX_FLOWS", "ASCII digits"),
    ({"SPLICEPROXY_IDLE_TIMEOUT": "\u0663s"}, "SPLICEPROXY_IDLE_TIMEOUT", "invalid duration"),
    ({"SPLICEPROXY_UDP_TIMEOUT": "inf"}, "SPLICEPROXY_UDP_TIMEOUT", "invalid duration"),
    ({"SPLICEPROXY_COPY_MODE": "zerocopy"}, "SPLICEPROXY_COPY_MODE", "use splice or readwrite"),
    ({"SPLICEPROXY_LOG_FILE": os.fsdecode(b"/tmp/sp-\xff.log")}, "SPLICEPROXY_LOG_FILE",
     "not valid UTF-8"),
    ({"SPLICEPROXY_STATS_FILE": os.fsdecode(b"/tmp/sp-\xfe.stats")}, "SPLICEPROXY_STATS_FILE",
     "not valid UTF-8"),
    ({"SPLICEPROXY_USER": os.fsdecode(b"n\xffbody")}, "SPLICEPROXY_USER", "not valid UTF-8"),
]
IDS = ["keep-false-space", "keep-no", "keep-off", "keep-yes", "user-arabic-zero",
       "user-superscript-two", "user-out-of-range", "pipe-arabic-digits", "flows-hex",
       "idle-arabic-digit", "udp-inf", "copy-mode", "log-not-utf8", "stats-not-utf8",
       "user-not-utf8"]


def _env(extra: dict) -> dict:
    env = srv.env_without_settings()
    env.update(extra)
    return env


def _start_failure(proxy_path: str, port: int, extra: dict) -> ProxyStartError:
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9)
    with pytest.raises(ProxyStartError) as info:
        spawn(argv, env=_env(extra), stderr=subprocess.DEVNULL, timeout=10.0).stop(
            signal.SIGKILL)  # started: a failure of the test, and never left running
    return info.value


@pytest.mark.parametrize("extra,name,reason", BAD, ids=IDS)
def test_bad_setting_is_a_status_pipe_error(proxy_path, extra, name, reason):
    err = _start_failure(proxy_path, srv.free_port(), extra)
    msg = str(err)
    assert err.returncode == 1, msg
    assert msg.startswith("invalid %s=" % name), msg
    assert reason in msg, msg
    assert "Traceback" not in msg


@pytest.mark.parametrize("extra,name,reason", BAD[:7], ids=IDS[:7])
def test_bad_setting_is_found_before_the_port_is_bound(proxy_path, extra, name, reason):
    # The port is taken (no SO_REUSEADDR): a proxy that bound before checking
    # its settings would report "address already in use" instead.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        msg = str(_start_failure(proxy_path, port, extra))
    assert msg.startswith("invalid %s=" % name), msg
    assert "address already in use" not in msg


def test_bad_setting_never_leaves_the_port_bound(proxy_path):
    port = srv.free_port()
    _start_failure(proxy_path, port, {"SPLICEPROXY_USER": "\u0660"})
    with socket.socket() as s:  # no SO_REUSEADDR: would fail if anything held the port
        s.bind(("127.0.0.1", port))


def test_bad_setting_with_a_passed_listener_leaves_nothing_open(proxy_path):
    # dockerd 28+ binds the port itself and passes it on fd 4; after a
    # failure the proxy must be gone, so only dockerd's copy holds the port.
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9, use_listen_fd=True)
    with pytest.raises(ProxyStartError) as info:
        lp = spawn(argv, listen_sock=ls, env=_env({"SPLICEPROXY_KEEP_PRIVILEGES": "off"}),
                   timeout=10.0)
        lp.stop(signal.SIGKILL)
    ls.close()
    assert info.value.returncode == 1
    assert "SPLICEPROXY_KEEP_PRIVILEGES" in str(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_flag_errors_still_come_first(proxy_path):
    # docker-proxy parses its flags before anything else: exit 2, nothing on fd 3.
    argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1", 9)
    with spawn(argv + ["-bogus"], env=_env({"SPLICEPROXY_KEEP_PRIVILEGES": "no"}),
               check=False, timeout=10.0) as lp:
        assert lp.status == b""
        assert lp.proc.wait(10) == 2


@pytest.mark.standalone_only(
    reason="the standalone process's own uid; engine mode: test_engine_mode.py"
           "::test_engine_drops_privileges_keeping_only_low_port_binding")
@pytest.mark.parametrize("value", ["0", "false", "F", "FALSE"])
def test_go_false_drops_privileges(proxy_path, value):
    if os.geteuid() != 0:
        pytest.skip("the privilege drop is only done (and checkable) when started as root")
    with srv.EchoServer("127.0.0.1") as echo:
        port = srv.free_port()
        argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
        with spawn(argv, env=_env({"SPLICEPROXY_KEEP_PRIVILEGES": value}), timeout=10.0) as lp:
            with open("/proc/%d/status" % lp.pid) as f:
                status = dict(line.split(":", 1) for line in f)
            assert int(status["Uid"].split()[0]) != 0
            assert int(status["CapEff"], 16) == 0
            srv.echo_roundtrip("127.0.0.1", port)
            assert lp.stop() == 0


# A value that parses, for each variable that works in one mode only: set in
# the other, it must be refused, never silently ignored.
_ONE_MODE_SAMPLES = {"STATS_FILE": "/tmp/sp-mode-check.stats", "TRANSPARENT": "1",
                     "METRICS_ADDR": "127.0.0.1:19998"}


@pytest.mark.parametrize("var", [v for v in settings.VARIABLES if v.modes != settings.MODES],
                         ids=lambda v: v.name)
def test_a_setting_that_does_nothing_in_this_mode_is_refused(proxy_path, var):
    mode = "standalone" if os.environ.get("SPLICEPROXY_ENGINE") == "0" else "engine"
    assert var.name in _ONE_MODE_SAMPLES, "give %s a sample value here" % var.name
    extra = {settings.ENV_PREFIX + var.name: _ONE_MODE_SAMPLES[var.name]}
    if mode in var.modes:
        # Not refused for the mode (whether it starts depends on the host).
        port = srv.free_port()
        argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9)
        with spawn(argv, env=_env(extra), check=False, timeout=10.0) as lp:
            assert b"mode only" not in (lp.status or b""), lp.status
            if lp.status == b"0\n":
                assert lp.stop() == 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_ONE_MODE_SAMPLES[var.name])
        return
    port = srv.free_port()
    msg = str(_start_failure(proxy_path, port, extra))
    assert msg == "%s%s works in %s mode only: %s" % (
        settings.ENV_PREFIX, var.name, " and ".join(var.modes), var.instead), msg
    assert var.instead  # says what to use instead
    assert not os.path.exists(_ONE_MODE_SAMPLES[var.name])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
