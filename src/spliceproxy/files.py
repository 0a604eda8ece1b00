"""Opening the files a proxy writes (log, counters) as root, safely.

dockerd starts proxies as root with the environment it was given, so
SPLICEPROXY_LOG_FILE and SPLICEPROXY_STATS_FILE name files that root opens.
Whoever can write into a directory on that path must not be able to turn
the open into a write somewhere else, or into a hang before fd 3 is
answered.  So every open here:

* walks the path one component at a time from a directory descriptor, with
  O_NOFOLLOW: a symbolic link anywhere in it is refused, not followed;
* refuses anything that is not a regular file (FIFO, device, socket,
  directory) before opening it, and checks the opened file again (fstat),
  so a swap in between is caught too;
* opens with O_NONBLOCK | O_NOCTTY | O_CLOEXEC: the open itself never
  blocks and never acquires a terminal;
* creates new files with mode 0600 (the umask may only narrow it);
* refuses a file owned by anyone but root or the proxy's own user, and a
  file with more than one hard link (a link to some other file).

A socket the proxy creates (the engine's metrics socket) is bound in a
directory reached the same way, which must be owned by root or the proxy's
own user and writable by nobody else (``socket_parent``): whoever could
write there could put a socket of theirs in its place.

A refusal is a ``FileRefused`` whose text says what and why; main reports it
on the status pipe.  Imports nothing but ``os``.
"""

from __future__ import annotations

import os

__all__ = ["FileRefused", "open_dir", "open_in", "open_parent", "open_path", "socket_parent",
           "split"]

_S_IFMT = 0o170000
_S_IFREG = 0o100000
_S_IFDIR = 0o040000
_S_IFLNK = 0o120000

_KINDS = {0o010000: "a FIFO", 0o020000: "a character device", 0o060000: "a block device",
          0o140000: "a socket", _S_IFDIR: "a directory", _S_IFLNK: "a symbolic link"}

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0o10000000)


class FileRefused(Exception):
    """A file the proxy will not open (reported on fd 3)."""


def _kind(mode: int) -> str:
    return _KINDS.get(mode & _S_IFMT, "not a regular file")


def _allowed_owners() -> tuple[int, ...]:
    euid = os.geteuid()
    return (0,) if euid == 0 else (0, euid)


def split(path: str) -> tuple[list[str], str]:
    """Directory components and last name of path (which must name a file)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise FileRefused("%s: not a file name" % path)
    return parts[:-1], parts[-1]


def _walk(path: str, components: list[str]) -> int:
    """A descriptor of the directory reached through components, no link followed."""
    start = "/" if path.startswith("/") else "."
    try:
        fd = os.open(start, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FileRefused("%s: %s" % (start, e.strerror)) from None
    walked = ""
    try:
        for name in components:
            walked += "/" + name if (walked or start == "/") else name
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError as e:
                raise FileRefused("%s: %s" % (walked, e.strerror)) from None
            if st.st_mode & _S_IFMT != _S_IFDIR:
                raise FileRefused("%s is %s, not a directory (symbolic links are not followed; "
                                  "give the real path)" % (walked, _kind(st.st_mode)))
            try:
                nfd = os.open(name, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError as e:
                raise FileRefused("%s: %s" % (walked, e.strerror)) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(path: str) -> int:
    """A descriptor (O_PATH) of the directory path itself, no link followed."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return _walk(path, parts)


def open_in(dir_fd: int, name: str, shown: str, flags: int, create: bool = True) -> int:
    """Open the regular file name in dir_fd (see the module text for the checks).

    flags: the access mode and O_APPEND; shown is the path for messages."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        st = None
        if not create:
            raise FileRefused("%s: No such file or directory" % shown) from None
    except OSError as e:
        raise FileRefused("%s: %s" % (shown, e.strerror)) from None
    if st is not None and st.st_mode & _S_IFMT != _S_IFREG:
        raise FileRefused("%s is %s, not a regular file" % (shown, _kind(st.st_mode)))
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise FileRefused("%s: %s" % (shown, e.strerror)) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & _S_IFMT != _S_IFREG:
            raise FileRefused("%s is %s, not a regular file" % (shown, _kind(st.st_mode)))
        if st.st_uid not in _allowed_owners():
            raise FileRefused("%s is owned by uid %d, not by root%s" % (
                shown, st.st_uid, "" if os.geteuid() == 0 else " or uid %d" % os.geteuid()))
        if st.st_nlink > 1:
            raise FileRefused("%s has %d hard links (a link to another file?)"
                              % (shown, st.st_nlink))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent(path: str) -> tuple[int, str]:
    """(descriptor of the directory path's file is in, the file's name)."""
    components, name = split(path)
    return _walk(path, components), name


def open_path(path: str, flags: int, create: bool = True) -> int:
    """Open the regular file at path, every component checked (see the module text)."""
    dfd, name = open_parent(path)
    try:
        return open_in(dfd, name, path, flags, create)
    finally:
        os.close(dfd)


def socket_parent(path: str) -> tuple[int, str]:
    """(descriptor of the directory a socket at path is to be bound in, its name).

    The directory is reached as every other (no link followed), and must be
    owned by root or this user and not writable by group or others (a
    sticky bit does not make it safe: anyone could take the name first)."""
    dfd, name = open_parent(path)
    try:
        st = os.fstat(dfd)
        shown = path.rsplit("/", 1)[0] or "/"
        if st.st_uid not in _allowed_owners():
            raise FileRefused("directory %s is owned by uid %d, not by root%s" % (
                shown, st.st_uid, "" if os.geteuid() == 0 else " or uid %d" % os.geteuid()))
        if st.st_mode & 0o022:
            raise FileRefused("directory %s is writable by %s (mode %04o): anyone who can "
                              "write there could replace the socket" % (
                                  shown, "group and others" if st.st_mode & 0o022 == 0o022
                                  else "its group" if st.st_mode & 0o020 else "others",
                                  st.st_mode & 0o7777))
    except BaseException:
        os.close(dfd)
        raise
    return dfd, name
