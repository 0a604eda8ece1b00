"""What a test must leave as it found it: descriptors, children, namespaces.

``tests/conftest.py`` takes a snapshot before every test and fails the test
when, once things had a moment to settle, this process holds descriptors it
did not hold before, has child processes it did not have (zombies aside: a
process that exited is not running anywhere), or a network namespace appeared
whose name carries this process's pid.  Only those namespaces are checked:
other work on the host creates namespaces too, and every test here names its
own with ``os.getpid()`` (the bench harness's ``<prefix><pid>-...`` included),
so that is what attributes a namespace to this run.

Engines too: engine mode is the default, so a proxy started without a mode
of its own would reach root's engine.  The session points
SPLICEPROXY_ENGINE_SOCKET at a stray socket that nothing serves
(``set_stray_socket``); a test that starts an engine there, or under root's
/run/spliceproxy socket, fails, and one on the stray socket is killed.  A test
of the engine-mode pass (``expect_engine``) must leave no mapping in the
session's engine once its stubs are gone.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

NETNS_DIR = "/run/netns"  # what `ip netns list` lists
SETTLE_S = 3.0
ROOT_DIR = "/run/spliceproxy/"  # root's engines, one socket per network namespace

_stray: list[str] = []      # the session's stray socket
_kept: set[int] = set()     # the session's own children (its engine)
_expected: list = []        # the session engine the running test uses


def set_stray_socket(path: str) -> None:
    _stray[:] = [path]


def stray_socket() -> str | None:
    return _stray[0] if _stray else None


def keep_child(pid: int) -> None:
    """A child of the session's, not of a test's: never a leak."""
    _kept.add(pid)


def expect_engine(shared) -> None:
    """The running test uses the session's engine (a support.engine.SharedEngine);
    the mappings it holds now (a module-scoped fixture's) are not the test's."""
    _kept.update(shared.pids)
    _kept.add(shared.watcher.pid)  # ends its engines should the session die
    try:
        held = {m["stub_pid"] for m in shared.mappings()}
    except Exception:  # noqa: BLE001 - check() reports an engine that does not answer
        held = set()
    _expected[:] = [(shared, held)]


@dataclass
class Snapshot:
    fds: dict[int, str] = field(default_factory=dict)
    children: dict[int, str] = field(default_factory=dict)
    netns: set[str] = field(default_factory=set)
    engines: dict[int, str] = field(default_factory=dict)


def proc_files(what: str):
    """(pid, contents) of /proc/PID/what for every process that still has it."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/%s" % (name, what), "rb") as f:
                data = f.read()
        except OSError:
            continue
        yield int(name), data


def engine_cmdline(sock: str) -> bytes:
    """What the command line of the engine of the control socket sock contains."""
    return b"engine\0--socket\0" + sock.encode() + b"\0"


def _engines() -> dict[int, str]:
    """Engines of the stray socket and of root's directory: {pid: socket}."""
    out = {}
    for pid, cmd in proc_files("cmdline"):
        _, found, rest = cmd.partition(b"\0engine\0--socket\0")
        if not found:
            continue
        path = os.fsdecode(rest.partition(b"\0")[0])
        if path in _stray or path.startswith(ROOT_DIR):
            out[pid] = path
    return out


def _fds() -> dict[int, str]:
    out = {}
    listing = "/proc/self/fd"
    for name in os.listdir(listing):
        try:
            target = os.readlink(os.path.join(listing, name))
        except OSError:
            continue  # the listing's own descriptor, closed by now
        out[int(name)] = target
    return out


def _children() -> dict[int, str]:
    me = os.getpid()
    out = {}
    for pid, raw in proc_files("stat"):
        stat = raw.decode("ascii", "replace")
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) < 2 or rest[0] == "Z" or int(rest[1]) != me or pid in _kept:
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            cmd = "?"
        out[pid] = cmd
    return out


def _netns() -> set[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return set()
    mine = re.compile(r"(?<!\d)%d(?!\d)" % os.getpid())
    return {n for n in names if mine.search(n)}


def snapshot() -> Snapshot:
    return Snapshot(_fds(), _children(), _netns(), _engines())


def _leaks(before: Snapshot) -> tuple[dict[int, str], dict[int, str], set[str]]:
    now = snapshot()
    fds = {fd: t for fd, t in now.fds.items() if before.fds.get(fd) != t}
    kids = {pid: c for pid, c in now.children.items() if pid not in before.children}
    return fds, kids, now.netns - before.netns


def _engine_problems(before: Snapshot, deadline: float) -> list[str]:
    problems = []
    for pid, path in sorted(_engines().items()):
        if pid in before.engines:
            continue
        problems.append("an engine the test did not choose (pid %d, socket %s): a proxy "
                        "reached engine mode without a mode of the test's" % (pid, path))
        if not path.startswith(ROOT_DIR):  # root's may be the host's own: never ours to end
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    if _expected:
        shared, held = _expected.pop()
        left = None
        while True:
            try:
                left = [m for m in shared.mappings() if m["stub_pid"] not in held]
            except Exception as e:  # noqa: BLE001 - reported, whatever it is
                problems.append("the session's engine does not answer: %s" % e)
                break
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if left:
            problems.append("mappings left in the session's engine: %s"
                            % ", ".join("%s %s (stub %s)" % (m["proto"], m["host"], m["stub_pid"])
                                        for m in left))
    return problems


def check(before: Snapshot, settle: float = SETTLE_S) -> list[str]:
    """What the test left behind (waiting up to settle seconds for it to go);
    leaked children are killed and leaked namespaces deleted, so one leak
    does not fail the tests after it.  Descriptors are left alone: closing a
    number some object still owns would break whatever closes it later."""
    deadline = time.monotonic() + settle
    collected = False
    engine_problems = _engine_problems(before, deadline)
    while True:
        fds, kids, netns = _leaks(before)
        if not (fds or kids or netns):
            return engine_problems
        if fds and not collected:
            gc.collect()  # what a collection closes was garbage, not a leak
            collected = True
            continue
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    problems = engine_problems
    for fd, target in sorted(fds.items()):
        problems.append("descriptor %d -> %s" % (fd, target))
    for pid, cmd in sorted(kids.items()):
        problems.append("child process %d: %s" % (pid, cmd))
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    for name in sorted(netns):
        problems.append("network namespace %s" % name)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
    return problems
