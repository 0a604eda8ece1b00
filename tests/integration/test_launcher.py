"""The launcher's own word when it cannot start the front end at all."""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from support import servers as srv
from support.servers import proxy_argv, spawn

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to make a directory closed to another user, and setpriv")
def test_an_interpreter_closed_to_the_user_is_named_not_called_gone():
    """A rootless dockerd's user runs an install whose interpreter lies under a
    directory it cannot enter (root's 0700 home, as a pyenv interpreter): the
    reason names that directory, not "neither ... exists"."""
    front = Path(srv.installed_proxy_path()).with_name("spliceproxy-front")
    text = front.read_text()
    built_with = re.search(r'for py in "\$dir/python3" (\S+); do', text).group(1)
    base = Path(tempfile.mkdtemp(prefix="spl-", dir="/tmp"))
    try:
        base.chmod(0o755)
        closed = base / "closed"
        closed.mkdir(mode=0o700)
        (closed / "python3").symlink_to(sys.executable)
        bindir = base / "venv" / "bin"
        bindir.mkdir(parents=True)
        os.chmod(base / "venv", 0o755)
        bindir.chmod(0o755)
        (bindir / "python3").symlink_to(closed / "python3")
        copy = bindir / "spliceproxy-front"
        copy.write_text(text.replace(built_with, str(closed / "python3")))
        copy.chmod(0o755)
        lp = spawn(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups",
                    "--", *proxy_argv(str(copy), "tcp", "127.0.0.1", srv.free_port(),
                                      "127.0.0.1", 9)],
                   env={"PATH": os.environ["PATH"], "SPLICEPROXY_ENGINE": "0"}, check=False,
                   timeout=10.0)
        assert lp.proc.wait(10) == 1
        assert lp.status.decode() == (
            "1\nspliceproxy: cannot start: %s exists but uid %d cannot run it: %s (on the way "
            "to %s) is not open to it (owner uid 0, mode %o). Install spliceproxy where that "
            "user can read it, or open that directory to it."
            % (bindir / "python3", NOBODY, closed, closed / "python3",
               stat.S_IMODE(closed.stat().st_mode)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
