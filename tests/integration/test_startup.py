"""The installed command starts lean: no site processing, and ps shows its name."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import spliceproxy

from support.servers import proxy_argv, spawn


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.standalone_only(
    reason="the standalone process's interpreter and name; engine mode: test_engine_mode.py"
           "::test_an_engine_mode_port_needs_no_shell_and_no_interpreter")
def test_launcher_runs_isolated_without_site_and_keeps_its_name(proxy_path):
    port = _free_port()
    with spawn(proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9)) as p:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")[:-1]
        with open(f"/proc/{p.pid}/comm") as f:
            comm = f.read().strip()
        # The interpreter runs with -I -S, then the script, then dockerd's argv untouched.
        assert argv[1:3] == [b"-I", b"-S"]
        # The launcher the `spliceproxy` stub execs, beside it.
        assert os.path.samefile(argv[3], os.path.join(os.path.dirname(proxy_path),
                                                      "spliceproxy-front"))
        assert [a.decode() for a in argv[4:]] == proxy_argv(
            proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", 9)[1:]
        assert comm == "spliceproxy"
        assert p.stop() == 0


def test_standalone_start_skips_the_launchers_shell(proxy_path, tmp_path):
    """The stub runs the launcher's interpreter itself when it is beside it:
    a prefix whose launcher's shell part would exit 42 still starts."""
    real = os.path.dirname(os.path.realpath(proxy_path))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy2(os.path.join(real, "spliceproxy"), bindir / "spliceproxy")
    front = Path(real, "spliceproxy-front").read_text()
    assert "\nself=$0\n" in front
    (bindir / "spliceproxy-front").write_text(front.replace("\nself=$0\n", "\nexit 42\n", 1))
    (bindir / "python3").symlink_to(os.path.join(real, "python3"))
    site = tmp_path / "lib" / ("python%d.%d" % sys.version_info[:2]) / "site-packages"
    site.mkdir(parents=True)
    (site / "spliceproxy").symlink_to(os.path.dirname(spliceproxy.__file__))
    r = subprocess.run([str(bindir / "spliceproxy"), "-v"], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.startswith("spliceproxy (docker-proxy compatible) version "), r.stdout
