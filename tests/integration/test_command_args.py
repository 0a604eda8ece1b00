"""`spliceproxy engine` and `spliceproxy status` read their command line the
same way (one parser, control.parse_args): -h prints the usage and exits 0,
a bad argument is one clear line and the usage on stderr, exit 2, never a
traceback.  Run as the installed command, as a user would."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

COMMANDS = ("engine", "status")


def _run(proxy_path: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLICEPROXY_")}
    return subprocess.run([proxy_path, *args], capture_output=True, text=True, timeout=20,
                          env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_prints_the_usage_and_exits_0(proxy_path, cmd, flag):
    out = _run(proxy_path, cmd, flag)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: spliceproxy %s [--socket PATH]" % cmd)
    assert out.stderr == ""


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("args, why", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["extra"], "unknown argument 'extra'"),
    (["--socket"], "--socket needs a value"),
    (["--socket="], "--socket '': needs a path"),
    (["--socket", ""], "--socket '': needs a path"),
    (["--json=1"], "unknown argument '--json=1'"),
])
def test_a_bad_argument_is_one_line_and_the_usage_exit_2(proxy_path, cmd, args, why):
    out = _run(proxy_path, cmd, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    first, _, rest = out.stderr.partition("\n")
    assert first == "spliceproxy %s: %s" % (cmd, why)
    assert rest.startswith("usage: spliceproxy %s" % cmd)
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_the_engines_ready_fd_must_be_a_number(proxy_path):
    out = _run(proxy_path, "engine", "--ready-fd", "x")
    assert out.returncode == 2
    assert out.stderr.startswith("spliceproxy engine: --ready-fd 'x': not a descriptor number\n")


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_status_takes_the_socket_in_either_form(proxy_path, form):
    with tempfile.TemporaryDirectory(prefix="pm-") as d:
        path = os.path.join(d, "none.sock")
        args = ["--socket", path] if form == "separate" else ["--socket=" + path]
        out = _run(proxy_path, "status", "--json", *args)
    assert out.returncode == 1
    assert out.stderr == "spliceproxy status: no engine: %s does not exist\n" % path
