"""A host engine of the tests' own: its socket directory, its stubs, its end.

Every engine a test reaches has a control socket in a private 0700
directory made here, never root's /run/spliceproxy or a user's runtime
directory: ``EngineHost`` is one such socket, the stubs started on it and
the cleanup (every stub stopped, every engine of the socket killed, and a
check that none is left running).  test_engine_mode.py makes one per test;
the mode fixture in tests/conftest.py shares one per session for the
engine-mode pass of the other suites (an engine started once, as dockerd's
first port starts it, then serves every test's mappings).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from spliceproxy.bench.launch import proxy_argv, spawn
from spliceproxy.bench.procs import alive

from support import guard
from support import servers as srv


def engine_processes(sock: str) -> list[int]:
    """Every live `spliceproxy engine` process of the control socket sock (from /proc)."""
    want = guard.engine_cmdline(sock)
    return [pid for pid, cmd in guard.proc_files("cmdline") if want in cmd and alive(pid)]


def private_dir(prefix: str) -> str:
    """A new directory only this uid can enter, with a short path (AF_UNIX
    paths are 108 bytes)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o700)
    return d


def kill_engines(sock: str, known: set[int] | None = None, settle: float = 0.3) -> set[int]:
    """Kill every engine of sock (and the known pids), including one a stub
    started just before it was killed (an engine outlives its stub), until
    none has appeared for ``settle`` seconds; return every pid killed or known."""
    seen = set(known or ())
    quiet_since = time.monotonic()
    deadline = quiet_since + 5.0
    while time.monotonic() - quiet_since < settle and time.monotonic() < deadline:
        found = set(engine_processes(sock)) | {p for p in seen if alive(p)}
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            seen.add(pid)
            quiet_since = time.monotonic()
        time.sleep(0.02)
    return seen


class EngineHost:
    """A control socket of the test's own, the stubs started on it, and cleanup.

    Teardown stops every stub, then kills the engine (whose pid is in
    <socket>.lock) and checks that nothing of it is left running.
    """

    def __init__(self, proxy_path: str, idle_exit: str = "30s", extra_env: dict | None = None,
                 prefix: str = "en-"):
        self.proxy_path = proxy_path
        self.dir = private_dir(prefix)
        self.sock = os.path.join(self.dir, "engine.sock")
        self.log_path = os.path.join(self.dir, "proxies.log")
        self.env = dict(os.environ)
        self.env.update({"SPLICEPROXY_ENGINE": "1", "SPLICEPROXY_ENGINE_SOCKET": self.sock,
                         "SPLICEPROXY_ENGINE_IDLE_EXIT": idle_exit,
                         "SPLICEPROXY_LOG_FILE": self.log_path})
        self.env.update(extra_env or {})
        self.stubs: list = []
        self.engine_pids: set[int] = set()

    def argv(self, proto: str, host_ip: str, host_port: int, container_ip: str,
             container_port: int, use_listen_fd: bool = False) -> list[str]:
        return proxy_argv(self.proxy_path, proto, host_ip, host_port, container_ip,
                          container_port, use_listen_fd=use_listen_fd)

    def start(self, proto: str, container_port: int, host_port: int | None = None,
              host_ip: str = "127.0.0.1", container_ip: str = "127.0.0.1", listen_sock=None,
              check: bool = True, env: dict | None = None, stderr=subprocess.DEVNULL,
              wrap: tuple[str, ...] = ()):
        """A stub for one mapping; wrap prefixes its argv (e.g. a seccomp launcher)."""
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        port = host_port if host_port is not None else srv.free_port(host_ip, kind)
        full_env = dict(self.env)
        full_env.update(env or {})
        lp = spawn([*wrap, *self.argv(proto, host_ip, port, container_ip, container_port,
                                      use_listen_fd=listen_sock is not None)],
                   listen_sock=listen_sock, env=full_env, stderr=stderr, check=check,
                   timeout=15.0)
        lp.port = port
        self.stubs.append(lp)
        self.note_engine()
        return lp

    def engine_pid(self) -> int | None:
        try:
            with open(self.sock + ".lock") as f:
                pid = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid and alive(pid) else None

    def note_engine(self) -> int | None:
        pid = self.engine_pid()
        if pid:
            self.engine_pids.add(pid)
        return pid

    def status_output(self, *flags: str) -> str:
        """What `spliceproxy status [flags]` prints, run as a user runs it."""
        out = subprocess.run([self.proxy_path, "status", "--socket", self.sock, *flags],
                             capture_output=True, text=True, timeout=10, env=self.env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def status(self) -> dict:
        """`spliceproxy status --json`, run as a user runs it."""
        return json.loads(self.status_output("--json"))

    def query(self) -> dict:
        """The same document, asked in this process (no command started)."""
        from spliceproxy import engine_status

        return engine_status.query(self.sock, timeout=10.0)

    def mapping(self, stub_pid: int) -> dict | None:
        """The status entry of the mapping whose stub is stub_pid, or None."""
        for m in self.query()["mappings"]:
            if m["stub_pid"] == stub_pid:
                return m
        return None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def engine_processes(self) -> list[int]:
        """Every live `spliceproxy engine` process of this socket (from /proc)."""
        return engine_processes(self.sock)

    def close(self) -> None:
        for lp in self.stubs:
            if lp.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    lp.proc.kill()
        for lp in self.stubs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                lp.proc.wait(5.0)
        self.note_engine()
        self.engine_pids |= kill_engines(self.sock, self.engine_pids)
        left = srv.wait_for(lambda: not any(alive(p) for p in self.engine_pids), 5.0)
        shutil.rmtree(self.dir, ignore_errors=True)
        assert left, "engine processes left running: %r" % self.engine_pids


class SharedEngine:
    """The session's engine for the engine-mode pass of the suites.

    Started once, with no SPLICEPROXY_* setting but its own (a test's
    settings reach it with each mapping, as a stub's environment), on a
    socket in a private 0700 directory; it stays up between tests
    (SPLICEPROXY_ENGINE_IDLE_EXIT=never).  Should a test's stub start another
    (the engine killed), that one stays up too, and close() ends them all
    and checks that none is left and that the directory is gone.

    It dies with the test session that started it, however that ends (a
    killed or cancelled run does not reach close()): a watcher process, in a
    session of its own so a Ctrl-C does not reach it first, waits on a pipe
    whose other end only this process holds, and at its end of file kills
    every engine of the socket and removes the directory.  (A parent-death
    signal would not do: the engine changes its credentials, which clears
    it.)
    """

    def __init__(self, proxy_path: str):
        self.proxy_path = proxy_path
        self.dir = private_dir("sp-eng-")
        self.sock = os.path.join(self.dir, "engine.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLICEPROXY_")}
        env.update(self.mode_env())
        r, w = os.pipe()

        def ready_on_3():
            os.dup2(w, 3)  # then kept open: pass_fds names 3

        with open(os.path.join(self.dir, "engine.stderr"), "ab") as err:
            self.proc = subprocess.Popen(
                [proxy_path, "engine", "--socket", self.sock, "--ready-fd", "3"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                pass_fds=(3,), preexec_fn=ready_on_3, start_new_session=True)
        os.close(w)
        try:
            ready = b""
            if select_readable(r, 20.0):
                ready = os.read(r, 512)
        finally:
            os.close(r)
        if not ready.startswith(b"ok"):
            self.proc.kill()
            self.proc.wait()
            why = self.stderr()
            kill_engines(self.sock, {self.proc.pid})
            shutil.rmtree(self.dir, ignore_errors=True)
            raise AssertionError("the session's engine did not start: %r %s" % (ready, why))
        self.pids = {self.proc.pid}
        self.watcher, self._lifeline = watch_session(self.sock, self.dir, self.proc.pid)

    def mode_env(self) -> dict[str, str]:
        """What a test's environment holds in engine mode."""
        return {"SPLICEPROXY_ENGINE": "1", "SPLICEPROXY_ENGINE_SOCKET": self.sock,
                "SPLICEPROXY_ENGINE_IDLE_EXIT": "never"}

    def stderr(self) -> str:
        try:
            with open(os.path.join(self.dir, "engine.stderr"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def query(self) -> dict:
        from spliceproxy import engine_status

        return engine_status.query(self.sock, timeout=10.0)

    def mappings(self) -> list[dict]:
        return self.query()["mappings"]

    def close(self) -> None:
        mappings = []
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                srv.wait_for(lambda: not self.mappings(), 3.0)
                mappings = self.mappings()
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        self.pids |= kill_engines(self.sock, self.pids)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        left = srv.wait_for(lambda: not any(alive(p) for p in self.pids), 5.0)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lifeline)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.watcher.wait(10.0)
        assert left, "engine processes left running: %r" % self.pids
        assert not os.path.exists(self.dir)
        assert not mappings, "mappings left in the session's engine at its end: %r" % mappings


# The watcher: blocks on stdin until every writer is gone, then kills the
# engines of the socket (argv[2]; argv[3] the first one's pid) and removes
# their directory (argv[4]).
_WATCH = ("import os, shutil, sys; sys.path.insert(0, sys.argv[1]); "
          "from support.engine import kill_engines\n"
          "while os.read(0, 64): pass\n"
          "kill_engines(sys.argv[2], {int(sys.argv[3])}); "
          "shutil.rmtree(sys.argv[4], ignore_errors=True)")


def watch_session(sock: str, directory: str, pid: int) -> tuple[subprocess.Popen, int]:
    """Start the process that ends the engines of sock when this process ends;
    return it and the pipe end to close (only this process holds it)."""
    r, w = os.pipe()  # not inherited by anything else started later
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.Popen([sys.executable, "-c", _WATCH, tests, sock, str(pid),
                                 directory], stdin=r, stdout=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        os.close(r)
    return proc, w


def select_readable(fd: int, timeout: float) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout)[0])


def mapping_counters(sock: str, stub_pid: int) -> dict[str, int]:
    """The counters of the mapping whose stub is stub_pid, as a counters
    file holds them: the mapping's own, and for what only the engine as a
    whole keeps (pipes, descriptors, system calls), the engine's figures."""
    from spliceproxy import engine_status

    doc = engine_status.query(sock, timeout=10.0)
    for m in doc["mappings"]:
        if m["stub_pid"] == stub_pid:
            out = dict(doc["engine"]["counters"])
            out.update(m["counters"] or {})
            return out
    raise AssertionError("no mapping of stub %d in the engine at %s" % (stub_pid, sock))
