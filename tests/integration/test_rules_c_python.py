"""Rules the stub (C) and the front end (Python) both apply, held to one table.

The stub decides before any interpreter starts, so some rules exist twice:
Go's boolean words (SPLICEPROXY_ENGINE), where the control socket of this
namespace's engine is, and which socket directory is refused.  Each table
below runs the real stub and the Python function on the same inputs and
expects the same answer, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading

import pytest

from spliceproxy import control, settings
from spliceproxy.bench.launch import proxy_argv, spawn

from support import servers as srv
from support.engine import kill_engines, private_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root (another uid's directories, setpriv)")

USER = 23457  # an unprivileged uid for the user's runtime directory
FAKE_REPLY = b"exit\x001\x00the fake engine\x00"


class FakeEngine:
    """A control socket that records who connects and refuses every mapping."""

    def __init__(self, path: str, uid: int = 0):
        self.path = path
        self.requests: list[control.Request] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        os.chown(path, uid, uid)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    data, fds, _f, _a = socket.recv_fds(conn, control.MSG_MAX, control.MAX_FDS)
                    req = control.decode(data, list(fds))
                    req.close_fds()
                    self.requests.append(req)
                    conn.send(FAKE_REPLY)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _stub(proxy_path: str, env: dict, as_user: bool | str = False, log: str | None = None):
    """Run a stub for a port with nothing behind it: what it said on fd 3.
    as_user: True for USER, "userns" for root of a user namespace of its own
    (which maps root only, as RootlessKit's maps only its user)."""
    full = srv.env_without_settings()
    for k in srv.MODE_VARIABLES:
        full.pop(k, None)
    full.update(env)
    if log:
        full["SPLICEPROXY_LOG_FILE"] = log
    wrap = (["unshare", "--user", "--map-root-user", "--"] if as_user == "userns" else
            ["setpriv", "--reuid=%d" % USER, "--regid=%d" % USER, "--clear-groups", "--"]
            if as_user else [])
    lp = spawn(wrap + proxy_argv(proxy_path, "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1",
                                 9), env=full, check=False, timeout=15.0)
    if lp.status == b"0\n":
        lp.stop()
    else:
        lp.proc.wait(10)
    return lp.status


# -- Go's boolean words: SPLICEPROXY_ENGINE --------------------------------

VALUES = ["", *settings.GO_TRUE, *settings.GO_FALSE, "yes", "no", "on", "tRuE", " 1", "1 ",
          "true\n", "2", "\u0661", "FALSE "]


def _python_verdict(value: str) -> str:
    if control.engine_enabled({"SPLICEPROXY_ENGINE": value}):
        return "engine"
    try:
        settings.boolean(value)
    except ValueError:
        return "refused"
    return "standalone"


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_go_booleans_the_stub_and_the_front_end_agree(proxy_path, value):
    d = private_dir("rb-")
    fake = FakeEngine(os.path.join(d, "e.sock"))
    try:
        status = _stub(proxy_path, {"SPLICEPROXY_ENGINE": value,
                                    "SPLICEPROXY_ENGINE_SOCKET": fake.path})
        stub = ("engine" if fake.requests else
                "standalone" if status == b"0\n" else
                "refused" if status.startswith(b"1\ninvalid SPLICEPROXY_ENGINE=") else
                "other: %r" % status)
        assert stub == _python_verdict(value)
    finally:
        fake.close()
        shutil.rmtree(d, ignore_errors=True)


# -- Where this namespace's engine is --------------------------------------

def _path_cases(d: str):
    long_dir = os.path.join(d, "x" * 110)
    return [
        ("socket", {"SPLICEPROXY_ENGINE_SOCKET": os.path.join(d, "named.sock")}, False),
        ("dir", {"SPLICEPROXY_ENGINE_DIR": d}, False),
        ("socket-over-dir", {"SPLICEPROXY_ENGINE_SOCKET": os.path.join(d, "n.sock"),
                             "SPLICEPROXY_ENGINE_DIR": "/nonexistent"}, False),
        ("too-long", {"SPLICEPROXY_ENGINE_DIR": long_dir}, False),
        ("user-runtime-dir", {"XDG_RUNTIME_DIR": d}, True),
        ("user-relative-runtime-dir", {"XDG_RUNTIME_DIR": "run/user"}, True),
        ("user-no-runtime-dir", {}, True),
        # RootlessKit's root: /run there is a copy (/run/spliceproxy may be
        # a link to the host's); its user's runtime directory is the place.
        ("userns-root-runtime-dir", {"XDG_RUNTIME_DIR": d}, "userns"),
        ("userns-root-dir", {"XDG_RUNTIME_DIR": "/nonexistent", "SPLICEPROXY_ENGINE_DIR": d},
         "userns"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _path_cases("/d")])
def test_the_stub_finds_the_socket_the_front_end_names(proxy_path, case, tmp_path):
    d = private_dir("rp-")
    env, as_user = next((e, u) for name, e, u in _path_cases(d) if name == case)
    log = os.path.join(d, "p.log")
    fake = None
    try:
        user = as_user is True
        if user:
            os.chown(d, USER, USER)
            open(log, "w").close()
            os.chown(log, USER, USER)
        want = control.resolve_socket(env, USER if user else 0,
                                      initial_userns=as_user != "userns")
        if want is not None:
            os.makedirs(os.path.dirname(want), mode=0o700, exist_ok=True)
            if user:
                os.chown(os.path.dirname(want), USER, USER)
            fake = FakeEngine(want, USER if user else 0)
        status = _stub(proxy_path, dict(env, SPLICEPROXY_ENGINE="1"), as_user, log)
        if want is None:
            # No socket possible: served standalone, its log says why; or,
            # where the user cannot run this install's interpreter (one
            # under root's home, as a sanitizer build's), the launcher the
            # stub handed the port to says so: standalone all the same.
            if status.startswith(b"1\nspliceproxy: cannot start: ") and \
                    b"cannot run it" in status:
                return
            assert status == b"0\n", status
            with open(log) as f:
                assert "engine mode not possible" in f.read()
        else:
            assert status == b"1\nthe fake engine"
            assert [r.command for r in fake.requests] == ["map"]
    finally:
        if fake is not None:
            fake.close()
        shutil.rmtree(d, ignore_errors=True)


# -- Which socket directory is refused -------------------------------------

def _make(kind: str, base: str) -> str:
    path = os.path.join(base, "dir")
    if kind == "missing":
        return path
    if kind == "file":
        open(path, "w").close()
        return path
    if kind == "symlink":
        os.mkdir(path + ".real", 0o700)
        os.symlink(path + ".real", path)
        return path
    os.mkdir(path, 0o700)
    if kind == "group-readable":
        os.chmod(path, 0o750)
    elif kind == "other-owner":
        os.chown(path, USER, USER)
    return path


@pytest.mark.parametrize("kind", ["missing", "private", "group-readable", "symlink", "file",
                                  "other-owner"])
def test_socket_directory_rules_agree(proxy_path, kind):
    base = private_dir("rd-")
    try:
        path = _make(kind, base)
        python = None
        if kind != "missing":  # the stub creates a missing one, as check_dir(create=True)
            try:
                control.check_dir(path, create=False)
            except PermissionError as e:
                python = str(e)
        log = os.path.join(base, "p.log")
        status = _stub(proxy_path, {"SPLICEPROXY_ENGINE": "1",
                                    "SPLICEPROXY_ENGINE_SOCKET": os.path.join(path, "e.sock"),
                                    "SPLICEPROXY_ENGINE_IDLE_EXIT": "1s"}, log=log)
        with open(log) as f:
            logged = f.read()
        if python is None:
            assert "refusing the engine socket directory" not in logged
        else:
            assert status == b"0\n"  # served standalone
            assert "engine mode not possible (%s)" % python in logged, (python, logged)
    finally:
        kill_engines(os.path.join(base, "dir", "e.sock"))
        shutil.rmtree(base, ignore_errors=True)
