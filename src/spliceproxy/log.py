"""Log lines in the format of Go's ``log`` package: ``2006/01/02 15:04:05 msg``.

docker-proxy logs with Go's standard logger to stderr, which dockerd points
at /dev/null. The same happens here, unless SPLICEPROXY_LOG_FILE names a file
to append to. Each line is one ``write(2)``, so lines from several proxies
sharing one file never interleave, and a failed write drops the line: logging
must never be the reason the proxy stops.
"""

from __future__ import annotations

import os
import time

__all__ = ["LOG_FILE_ENV", "Logger"]

LOG_FILE_ENV = "SPLICEPROXY_LOG_FILE"

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def _is_devnull(fd: int) -> bool:
    """True when ``fd`` is /dev/null (or not open at all): nobody will read the lines."""
    try:
        st = os.fstat(fd)
    except OSError:
        return True
    if st.st_mode & 0o170000 != 0o020000:  # not a character device
        return False
    try:
        null = os.stat(os.devnull)
    except OSError:
        return st.st_rdev == os.makedev(1, 3)
    return st.st_rdev == null.st_rdev or (st.st_dev, st.st_ino) == (null.st_dev, null.st_ino)


class Logger:
    """Writes timestamped lines to stderr or to the file in SPLICEPROXY_LOG_FILE.

    ``enabled`` is False when the lines would go to /dev/null (the usual case
    under dockerd), so callers can skip building messages.
    """

    __slots__ = ("fd", "path", "enabled", "_own_fd")

    def __init__(self, path: str | None = None) -> None:
        """``path`` overrides the environment; ``""`` means stderr."""
        if path is None:
            path = os.environ.get(LOG_FILE_ENV, "")
        self.fd = 2
        self.path = ""
        self._own_fd = False
        problem = ""
        if path:
            try:
                self.fd = os.open(path, _OPEN_FLAGS, 0o644)
            except OSError as e:
                problem = f"cannot open log file {path}: {e.strerror or e}; logging to stderr"
            except ValueError as e:  # e.g. an embedded NUL byte in the name
                problem = f"cannot open log file {path!r}: {e}; logging to stderr"
            else:
                self.path = path
                self._own_fd = True
        self.enabled = not _is_devnull(self.fd)
        if problem:
            self.log(problem)

    def log(self, msg: str) -> None:
        """Write one line (a newline is added unless ``msg`` ends with one)."""
        if not self.enabled:
            return
        t = time.localtime()
        line = (
            f"{t.tm_year:04d}/{t.tm_mon:02d}/{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {msg}"
        )
        if not line.endswith("\n"):
            line += "\n"
        try:
            data = line.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = line.encode("utf-8", "backslashreplace")
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # EPIPE, ENOSPC, EAGAIN, EBADF...: the line is dropped

    def close(self) -> None:
        """Close the log file (stderr is left alone). Later lines are dropped."""
        if self._own_fd:
            self._own_fd = False
            self.enabled = False
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        where = self.path or "stderr"
        return f"Logger({where}, enabled={self.enabled})"
