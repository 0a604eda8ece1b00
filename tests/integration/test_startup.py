"""The installed command starts lean: no site processing, and ps shows its name."""

from __future__ import annotations

import os
import socket

from support.servers import proxy_argv, spawn


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
