"""The benchmark's dockerd-like spawner (launch.spawn_dockerd) over real processes.

What the child sees must be what a proxy under dockerd sees (Go's os/exec:
fds 0-2 on /dev/null, the status pipe on 3, the listener on 4, nothing else
inherited, SIGTERM as parent-death signal, no signal ignored or blocked),
and the status must be read as dockerd reads it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import pytest

from spliceproxy.bench import procs
from spliceproxy.bench.launch import ProxyStartError, spawn_dockerd

# Reports what it inherited into the file named by argv[1], then answers fd 3.
REPORT = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None)
sig = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
st = dict(l.split(":", 1) for l in open("/proc/self/status"))
fds = {}
for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
    try:
        fds[fd] = os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        pass
info = {"pdeathsig": sig.value, "sigign": st["SigIgn"].strip(),
        "sigblk": st["SigBlk"].strip(), "fds": fds,
        "flags0": os.get_blocking(0), "env": os.environ.get("SPB_MARK"),
        "acc": [os.open("/proc/self/fd/%d" % i, os.O_PATH) and
                (open("/proc/self/fdinfo/%d" % i).read().split("flags:")[1].split()[0])
                for i in (0, 1, 2)]}
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
os.write(3, b"0\n")
if len(sys.argv) > 2:
    s = __import__("socket").socket(fileno=4)
    c, _ = s.accept()
    c.sendall(b"via fd 4")
    c.close()
import select
select.select([], [], [])
"""


def _py(tmp_path, *extra):
    return [sys.executable, "-I", "-S", "-c", REPORT, str(tmp_path / "info.json"), *extra]


def test_child_gets_what_dockerd_gives(tmp_path):
    # A descriptor left inheritable by the parent must not reach the proxy
    # (under Go every descriptor is close-on-exec).
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_w, True)
    # Ignored here (as under nohup or in a background job) but at their
    # default under dockerd, whose children Go starts with every signal reset.
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGHUP, signal.SIGINT)}
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    try:
        lp = spawn_dockerd(_py(tmp_path, "listen"), env=dict(os.environ, SPB_MARK="m"),
                           listen_sock=ls)
        try:
            assert lp.status == b"0\n" and 0 < lp.ready_s < 10
            info = json.loads((tmp_path / "info.json").read_text())
            with socket.create_connection(ls.getsockname(), timeout=5) as c:
                assert c.recv(64) == b"via fd 4"
        finally:
            assert lp.stop() == 0 or lp.proc.returncode == -signal.SIGINT
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        ls.close()
        os.close(leak_r)
        os.close(leak_w)
    assert info["pdeathsig"] == signal.SIGTERM
    # The reporting interpreter ignores SIGPIPE and SIGXFSZ itself at start-up.
    own = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    assert int(info["sigign"], 16) == own and int(info["sigblk"], 16) == 0, info
    fds = {int(k): v for k, v in info["fds"].items()}
    assert fds[0] == fds[1] == fds[2] == "/dev/null"
    # stdin read-only, stdout and stderr write-only, as os/exec opens them.
    assert [int(a, 8) & 3 for a in info["acc"]] == [os.O_RDONLY, os.O_WRONLY, os.O_WRONLY]
    assert fds[3].startswith("pipe:") and fds[4].startswith("socket:")
    assert max(fds) <= 5, fds  # 5: the listdir of /proc/self/fd itself
    assert info["env"] == "m"


def test_failure_text_and_exit_code_as_dockerd_reads_them(tmp_path):
    prog = "import os,sys\nos.write(3, b'1\\nbad flag')\nsys.exit(3)\n"
    with pytest.raises(ProxyStartError) as ei:
        spawn_dockerd([sys.executable, "-I", "-S", "-c", prog])
    assert str(ei.value) == "bad flag" and ei.value.returncode == 3
    lp = spawn_dockerd([sys.executable, "-I", "-S", "-c", "import sys; sys.exit(0)"],
                       check=False)
    assert lp.status == b"" and lp.proc.wait(5) == 0


def _children() -> set:
    return set(procs.children(os.getpid()))


def test_an_unstartable_path_is_an_error_not_a_child(tmp_path):
    before = _children()
    with pytest.raises(ProxyStartError, match="No such file"):
        spawn_dockerd([str(tmp_path / "missing"), "-proto", "tcp"])
    assert _children() == before  # the failed child was reaped, nothing left


def test_status_timeout_is_reported_and_the_child_stopped(tmp_path):
    before = _children()
    prog = "import select\nselect.select([], [], [])\n"
    with pytest.raises(ProxyStartError, match="timed out"):
        spawn_dockerd([sys.executable, "-I", "-S", "-c", prog], timeout=0.3)
    assert _children() == before
