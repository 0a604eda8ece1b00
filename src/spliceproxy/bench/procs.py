"""What /proc and strace say about a proxy process (tree)."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    """All descendants of pid."""
    parent: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(_stat_fields(int(d))[1])
            except (OSError, ValueError, IndexError):
                continue
            parent.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in parent.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _schedstat_seconds(pid: int) -> float | None:
    """CPU time of pid's live threads in nanoseconds' resolution (schedstat), or None."""
    total = 0
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """CPU seconds of pid; with tree, utime+stime of it, its reaped children and live
    descendants.

    A single process is read from schedstat: utime+stime count 10 ms clock
    ticks, and a 128 MiB transfer through the engine takes about three of
    them, which made CPU per GB jump between 0.43x, 0.5x and 0.75x of
    docker-proxy's from round to round.
    """
    if not tree:
        ns = _schedstat_seconds(pid)
        if ns is not None and ns > 0:
            return ns
    total = 0.0
    for i, p in enumerate([pid] + (children(pid) if tree else [])):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        ticks = int(f[11]) + int(f[12])
        if i == 0:
            ticks += int(f[13]) + int(f[14])
        total += ticks / CLK_TCK
    return total


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * PAGE


def uss_bytes(pid: int) -> int:
    """Private memory (Private_Clean + Private_Dirty of smaps_rollup): what the process
    alone costs, shared libraries and the shared engine left out."""
    total = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total * 1024


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie or a dead task does not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def raise_nofile(want: int = 1 << 20) -> int:
    """Raise this process's soft fd limit to at least want, and the hard one with it
    when allowed (dockerd runs with LimitNOFILE=infinity); else as far as the hard
    limit goes.  Returns the soft limit now."""
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == inf or soft >= want:
        return soft
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (limit, hard if hard == inf else max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def tasks(pid: int) -> list[int]:
    """Thread ids of pid (empty when it is gone)."""
    try:
        return [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    except OSError:
        return []


def thread_count(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


class StraceCount:
    """`strace -c -f -p PID` around a block: total system calls of the process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.total = None
        self.by_name: dict[str, int] = {}

    def __enter__(self) -> StraceCount:
        self.out = tempfile.NamedTemporaryFile(prefix="spb-strace-", suffix=".txt", delete=False)
        self.out.close()
        self.proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(self.pid), "-o",
                                      self.out.name], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # strace prints "attached" once per thread; wait for the first one.
        deadline = time.monotonic() + 5
        os.set_blocking(self.proc.stderr.fileno(), False)
        buf = b""
        while b"attached" not in buf and time.monotonic() < deadline:
            chunk = self.proc.stderr.read() or b""
            buf += chunk
            if self.proc.poll() is not None:
                raise RuntimeError("strace failed: %s" % buf.decode(errors="replace"))
            time.sleep(0.02)
        time.sleep(0.2)  # let it attach to every thread
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            with open(self.out.name) as f:
                text = f.read()
        finally:
            os.unlink(self.out.name)
        for line in text.splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m:
                if m.group(2) == "total":
                    self.total = int(m.group(1))
                else:
                    self.by_name[m.group(2)] = int(m.group(1))
        if self.total is None and self.by_name:
            self.total = sum(self.by_name.values())


def time_wait_count(netns: str | None) -> int:
    """TIME_WAIT TCP sockets (IPv4 and IPv6) in a network namespace."""
    from spliceproxy.bench import topology as topo_mod

    count = 0
    with topo_mod.in_netns(netns):
        for table in ("/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"):
            try:
                with open(table) as f:
                    next(f, None)
                    count += sum(1 for line in f if line.split(None, 4)[3] == "06")
            except OSError:
                pass
    return count
