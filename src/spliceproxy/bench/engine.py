"""A host engine of the benchmark's own: private control socket, never idle-exits.

The stubs of an engine-mode path start it (the first stub's spawn does, in
the host namespace, where the stubs run: an engine serves only its own
network namespace).  Its socket lives in a private 0700 directory, so no
engine of the machine (or of another run) can take a mapping of ours, and
ours takes none of theirs; SPLICEPROXY_ENGINE_IDLE_EXIT=never keeps it up
between rounds.  stop() ends it and checks that it is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time

from spliceproxy import engine_status
from spliceproxy.bench import procs


class PrivateEngine:
    """One engine, found by the stubs through SPLICEPROXY_ENGINE_SOCKET in env."""

    def __init__(self, base_env: dict, parent: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="engine-", dir=parent)
        os.chmod(self.dir, 0o700)
        self.sock = os.path.join(self.dir, "engine.sock")
        self.env = dict(base_env, SPLICEPROXY_ENGINE="1", SPLICEPROXY_ENGINE_SOCKET=self.sock,
                        SPLICEPROXY_ENGINE_IDLE_EXIT="never")
        self.env.pop("SPLICEPROXY_ENGINE_DIR", None)
        self.pid: int | None = None

    def attach(self) -> int:
        """The engine's pid, once a stub has started it."""
        self.pid = int(engine_status.query(self.sock)["engine"]["pid"])
        return self.pid

    def status(self) -> dict:
        return engine_status.query(self.sock)

    def counters(self) -> dict:
        """The whole engine's counters (system calls are counted engine-wide)."""
        return self.status()["engine"]["counters"]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL past timeout; RuntimeError if it survives both."""
        pid, self.pid = self.pid, None
        try:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while procs.alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
                if procs.alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + timeout
                    while procs.alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.01)
                if procs.alive(pid):
                    raise RuntimeError("the bench's engine (pid %d) did not exit" % pid)
            # An engine whose pid was never learnt (a stub that failed
            # half-way): its command line names the socket.
            for other in self.leftovers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.05) if self.leftovers() else None
            left = self.leftovers()
            if left:
                raise RuntimeError("the bench's engine left processes behind: %s" % left)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Live processes whose command line names this engine's socket."""
        needle = os.fsencode(self.sock)
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    if needle in f.read() and procs.alive(int(entry)):
                        out.append(int(entry))
            except OSError:
                continue
        return out
