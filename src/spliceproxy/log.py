"""Log lines in the format of Go's ``log`` package: ``2006/01/02 15:04:05 msg``.

docker-proxy logs with Go's standard logger to stderr, which dockerd points
at /dev/null. The same happens here, unless SPLICEPROXY_LOG_FILE names a file
to append to (opened by ``spliceproxy.files``: no links, regular files only,
created 0600).

Logging must never be the reason the proxy stops relaying, and the loop
writes the lines itself, so a write never blocks:

* stderr on a pipe or terminal is reopened through /proc/self/fd/2, which
  gives a file description of our own that can be made non-blocking without
  changing the one shared with dockerd or the shell; on a socket every line
  is sent with MSG_DONTWAIT; a regular file does not block;
* a line that cannot be written now waits in a bounded buffer (64 KiB of
  whole lines) and is written before the next line; when the buffer is full
  further lines are dropped and counted, and once writing works again one
  line says how many were lost.

Each line (or the buffered lines together) is one ``write(2)``, so lines
from several proxies sharing one file never interleave.  ``reopen()``
(SIGHUP, after logrotate renamed the file) opens the path again.
"""

from __future__ import annotations

import os
import time

__all__ = ["BUFFER_LIMIT", "Logger"]

BUFFER_LIMIT = 64 * 1024

_S_IFMT = 0o170000
_S_IFCHR = 0o020000
_S_IFIFO = 0o010000
_S_IFSOCK = 0o140000


def _is_devnull(st: os.stat_result) -> bool:
    if st.st_mode & _S_IFMT != _S_IFCHR:
        return False
    try:
        null = os.stat(os.devnull)
    except OSError:
        return st.st_rdev == os.makedev(1, 3)
    return st.st_rdev == null.st_rdev


class Logger:
    """Writes timestamped lines to stderr or to a file, never blocking.

    ``Logger()`` logs to stderr, ``Logger(path)`` appends to path and raises
    ``spliceproxy.files.FileRefused`` when path may not be opened.
    ``enabled`` is False when the lines would go to /dev/null (the usual case
    under dockerd), so callers can skip building messages.
    """

    __slots__ = ("fd", "path", "enabled", "dropped", "_pending", "_own_fd", "_send")

    def __init__(self, path: str | None = None) -> None:
        self.fd = 2
        self.path = path or ""
        self.enabled = True
        self.dropped = 0
        self._pending = bytearray()
        self._own_fd = False
        self._send = None
        if self.path:
            self.fd = self._open(self.path)
            self._own_fd = True
            self.enabled = not _is_devnull(os.fstat(self.fd))
        else:
            self._use_stderr()

    @classmethod
    def for_fd(cls, fd: int | None, path: str = "") -> Logger:
        """A log on a descriptor another process opened (a stub's log file or
        its stderr), owned from now on, whose writes never wait (NoWaitOutput):
        the engine logs each mapping there.  fd None, or a socket: a log that
        writes nothing."""
        log = cls.__new__(cls)
        log.fd, log.path, log.enabled, log.dropped = -1, path, False, 0
        log._pending, log._own_fd, log._send = bytearray(), False, None
        if fd is not None:
            log.use_fd(fd)
        return log

    def use_fd(self, fd: int) -> bool:
        """Log to fd from now on (a stub's SIGHUP reopen), as for_fd() does;
        False, with fd closed and nothing changed, when it is a socket."""
        out = NoWaitOutput.of(fd)
        if out is None:
            return False
        self.flush()
        old = self.fd if self._own_fd else None
        self.fd, self._send, self._own_fd = out.fd, out.send, True
        self.enabled = not _is_devnull(os.fstat(out.fd))
        if old is not None:
            try:
                os.close(old)
            except OSError:
                pass
        self.flush()
        return True

    @staticmethod
    def _open(path: str) -> int:
        from spliceproxy import files

        if path == os.devnull:
            # The one device worth allowing: logging explicitly turned off.
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        return files.open_path(path, os.O_WRONLY | os.O_APPEND)

    def _use_stderr(self) -> None:
        try:
            st = os.fstat(2)
        except OSError:
            self.enabled = False  # not open at all
            return
        if _is_devnull(st):
            self.enabled = False
            return
        kind = st.st_mode & _S_IFMT
        if kind == _S_IFSOCK:
            import _socket

            try:
                sock = _socket.socket(fileno=os.dup(2))
            except OSError:
                self.enabled = False
                return
            flag = getattr(_socket, "MSG_DONTWAIT", 0x40)
            self._send = lambda data: sock.send(data, flag)
            return
        if kind in (_S_IFIFO, _S_IFCHR):
            # A description of our own, so O_NONBLOCK changes nobody else's.
            try:
                self.fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK |
                                  os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                # No reader (ENXIO) or no /proc: writing could block or fail;
                # blocking the relay for a log line is the worse of the two.
                self.enabled = False
                return
            self._own_fd = True

    # -- writing -----------------------------------------------------------

    def _write(self, data) -> int:
        if self._send is not None:
            return self._send(data)
        return os.write(self.fd, data)

    def _drain(self) -> bool:
        """Write what is pending; True when nothing is left."""
        while self._pending:
            try:
                n = self._write(self._pending)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                # EPIPE, ENOSPC, EBADF...: what is pending is lost.
                self.dropped += self._pending.count(b"\n")
                self._pending.clear()
                return True
            if n <= 0:
                return False
            del self._pending[:n]
        return True

    def _queue(self, data: bytes) -> None:
        if len(self._pending) + len(data) <= BUFFER_LIMIT:
            self._pending += data
        else:
            self.dropped += 1

    def _line(self, msg: str) -> bytes:
        t = time.localtime()
        line = (
            f"{t.tm_year:04d}/{t.tm_mon:02d}/{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {msg}"
        )
        if not line.endswith("\n"):
            line += "\n"
        try:
            return line.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return line.encode("utf-8", "backslashreplace")

    def flush(self) -> bool:
        """Write pending lines (and the dropped count) if the output takes them now."""
        if not self.enabled:
            return True
        if not self._drain():
            return False
        if self.dropped:
            n, self.dropped = self.dropped, 0
            self._pending += self._line("%d log line%s dropped: the log output did not take "
                                        "them in time" % (n, "" if n == 1 else "s"))
            return self._drain()
        return True

    def log(self, msg: str) -> None:
        """Write one line (a newline is added unless ``msg`` ends with one)."""
        if not self.enabled:
            return
        data = self._line(msg)
        if not self.flush():
            self._queue(data)
            return
        try:
            n = self._write(data)
        except (BlockingIOError, InterruptedError):
            self._queue(data)
            return
        except OSError:
            self.dropped += 1  # EPIPE, ENOSPC, EBADF...
            return
        if n < len(data):
            # Only the rest of this line may follow, or lines would mix.
            self._pending[:0] = data[n:]

    # -- files -------------------------------------------------------------

    def reopen(self) -> None:
        """Open the log file's path again (logrotate renamed it); stderr stays.

        A failure keeps the current file and says why in it."""
        if not self.path or not self._own_fd:
            return
        from spliceproxy import files

        try:
            fd = self._open(self.path)
        except (OSError, files.FileRefused) as e:
            self.log("cannot reopen log file %s: %s; still writing to the old one"
                     % (self.path, e.strerror if isinstance(e, OSError) else e))
            return
        self.flush()
        old, self.fd = self.fd, fd
        os.close(old)
        self.enabled = not _is_devnull(os.fstat(fd))
        self.flush()

    def close(self) -> None:
        """Try once more to write what is pending, then close the file (stderr
        is left alone). Later lines are dropped."""
        self.flush()
        self.enabled = False
        self._send = None
        if self._own_fd:
            self._own_fd = False
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        where = self.path or "stderr"
        return f"Logger({where}, enabled={self.enabled})"


class NoWaitOutput:
    """Writes to another process's stdout, stderr or log file that never block.

    The descriptor is shared (with dockerd, a terminal, other proxies), so it
    is not made O_NONBLOCK; each write asks for no waiting instead
    (pwritev2 RWF_NOWAIT, which pipes honour): a pipe nobody reads drops
    lines rather than stopping every port.  A terminal, which does not take
    the flag, gets plain writes.  send() raises BlockingIOError like a
    non-blocking descriptor, which Logger expects.
    """

    __slots__ = ("fd", "plain")

    def __init__(self, fd: int):
        self.fd = fd
        self.plain = False

    @classmethod
    def of(cls, fd: int) -> NoWaitOutput | None:
        """A writer for fd (owned from now on), or None (fd closed) for a socket,
        which takes no such flag (under dockerd stdio is /dev/null anyway)."""
        try:
            kind = os.fstat(fd).st_mode & _S_IFMT
        except OSError:
            kind = _S_IFSOCK
        if kind == _S_IFSOCK:
            os.close(fd)
            return None
        return cls(fd)

    def send(self, data) -> int:
        if not self.plain:
            try:
                return os.pwritev(self.fd, [data], -1, os.RWF_NOWAIT)
            except OSError as e:
                import errno  # here: the proxy's start-up path imports as little as it can

                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE):
                    raise
                self.plain = True
        return os.write(self.fd, data)
