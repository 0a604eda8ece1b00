"""Where a proxy's counters file is, and making sure it is this proxy's alone.

dockerd gives every proxy the same environment, so one SPLICEPROXY_STATS_FILE
reaches all of them.  Counters of two processes must never land in one
file, so the value is read as:

* a directory: each proxy writes ``<dir>/spliceproxy-<pid>.stats``;
* a path containing ``%p``: the pid is put in its place (``%%`` is a
  literal ``%``);
* any other path: one file for one proxy; it is locked
  (flock LOCK_EX|LOCK_NB) and a second proxy given the same file fails to
  start with a message saying how to give each its own.

Every file is opened by ``spliceproxy.files`` (no links, regular files only,
created 0600) and locked for the process's life, so "is a proxy still
writing it?" has an answer: whoever can take the lock knows it is not.
Per-process files (directory and ``%p`` forms) are removed at exit when the
proxy still may (it kept its privileges, or can write the directory); a
proxy that dropped its privileges cannot, so each proxy starting in a
directory first removes the ``spliceproxy-<pid>.stats`` files there that no
live proxy holds.
"""

from __future__ import annotations

import fcntl
import os

from spliceproxy import files

__all__ = ["StatsFile", "open_for"]

_PREFIX = "spliceproxy-"
_SUFFIX = ".stats"
_S_IFMT = 0o170000
_S_IFDIR = 0o040000


class StatsFile:
    """An open, locked counters file (``fd``) and how to remove it at exit."""

    __slots__ = ("fd", "path", "_dir_fd", "_name")

    def __init__(self, fd: int, path: str, dir_fd: int = -1, name: str = "") -> None:
        self.fd = fd
        self.path = path
        self._dir_fd = dir_fd  # set for per-process files, removed at exit
        self._name = name

    def close(self) -> None:
        """Remove a per-process file if it is still ours, close everything."""
        if self._dir_fd >= 0:
            try:
                mine = os.fstat(self.fd)
                there = os.lstat(self._name, dir_fd=self._dir_fd)
                if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                    os.unlink(self._name, dir_fd=self._dir_fd)
            except OSError:
                pass  # gone already, or no longer allowed (the next proxy sweeps it)
            os.close(self._dir_fd)
            self._dir_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock(fd: int, shown: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise files.FileRefused(
            "%s is in use by another proxy; dockerd gives every proxy the same environment, "
            "so name a directory (each proxy writes spliceproxy-<pid>.stats in it) or put %%p "
            "(the pid) in the path" % shown) from None
    except OSError as e:
        raise files.FileRefused("%s: flock: %s" % (shown, e.strerror)) from None


def _open_locked(dir_fd: int, name: str, shown: str, flags: int) -> int:
    """Create-or-open name, lock it, and make sure the name still leads to it.

    Another proxy's sweep may take the lock of a file that was just created
    and not yet locked, and remove it: then the name no longer leads to the
    file, and a new one is made."""
    for _ in range(8):
        fd = files.open_in(dir_fd, name, shown, flags)
        try:
            _lock(fd, shown)
            st = os.fstat(fd)
            try:
                there = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                there = None
        except BaseException:
            os.close(fd)
            raise
        if there is not None and (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino):
            return fd
        os.close(fd)
    raise files.FileRefused("%s keeps disappearing" % shown)


def _sweep(dir_fd: int) -> None:
    """Remove per-process files of proxies that are gone (nobody holds the lock)."""
    try:
        lfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        names = os.listdir(lfd)
    except OSError:
        return
    finally:
        os.close(lfd)
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
            continue
        pid = name[len(_PREFIX):-len(_SUFFIX)]
        if not pid or not all("0" <= c <= "9" for c in pid):
            continue
        try:
            fd = files.open_in(dir_fd, name, name, os.O_RDONLY, create=False)
        except files.FileRefused:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            there = os.lstat(name, dir_fd=dir_fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass  # held by a live proxy, or not ours to remove
        finally:
            os.close(fd)


def _substitute(spec: str, pid: int) -> str:
    out = []
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == "%" and spec[i + 1:i + 2] == "p":
            out.append(str(pid))
            i += 2
        elif c == "%" and spec[i + 1:i + 2] == "%":
            out.append("%")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _is_dir(path: str) -> bool:
    """True when path names a directory (reached without following links)."""
    try:
        fd = files.open_dir(path)
    except files.FileRefused:
        return False
    try:
        return os.fstat(fd).st_mode & _S_IFMT == _S_IFDIR
    finally:
        os.close(fd)


def open_for(spec: str) -> StatsFile:
    """Open this process's counters file for SPLICEPROXY_STATS_FILE=spec."""
    pid = os.getpid()
    flags = os.O_RDWR
    if "%p" in spec or "%%" in spec:
        path = _substitute(spec, pid)
        dfd, name = files.open_parent(path)
        try:
            fd = files.open_in(dfd, name, path, flags)
            _lock(fd, path)
        except BaseException:
            os.close(dfd)
            raise
        return StatsFile(fd, path, dfd, name)
    if _is_dir(spec):
        dfd = files.open_dir(spec)
        name = "%s%d%s" % (_PREFIX, pid, _SUFFIX)
        path = spec.rstrip("/") + "/" + name
        try:
            _sweep(dfd)
            fd = _open_locked(dfd, name, path, flags)
        except BaseException:
            os.close(dfd)
            raise
        return StatsFile(fd, path, dfd, name)
    fd = files.open_path(spec, flags)
    try:
        _lock(fd, spec)
    except BaseException:
        os.close(fd)
        raise
    return StatsFile(fd, spec)
