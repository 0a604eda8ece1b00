"""The status pipe (fd 3) and the inherited listener (fd 4), as dockerd passes them.

dockerd reads fd 3 once: ``0\\n`` means ready; anything else is a failure
whose text follows up to EOF.  The whole payload goes out in one write and
fd 3 is closed right after, success or not.
"""

from __future__ import annotations

import os

__all__ = ["LISTEN_FD", "STATUS_FD", "StatusPipe"]

STATUS_FD = 3
LISTEN_FD = 4


class StatusPipe:
    """fd 3 (if dockerd gave one) and whether fd 4 was inherited."""

    __slots__ = ("have_status", "have_listen_fd", "done")

    def __init__(self) -> None:
        """Make fds 3 and 4 close-on-exec; reserve fd 3 if it is absent.

        When fd 3 is absent (started by hand), /dev/null is put there so
        that no socket or file of ours gets fd 3 and is closed by report().
        """
        self.done = False
        self.have_status = True
        try:
            os.set_inheritable(STATUS_FD, False)
        except OSError:
            self.have_status = False
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if null != STATUS_FD:
                os.dup2(null, STATUS_FD, inheritable=False)
                os.close(null)
        self.have_listen_fd = True
        try:
            os.set_inheritable(LISTEN_FD, False)
        except OSError:
            self.have_listen_fd = False

    def _send(self, payload: bytes) -> None:
        if self.done:
            return
        self.done = True
        if self.have_status:
            try:
                os.write(STATUS_FD, payload)
            except OSError:
                pass  # dockerd went away; nothing to tell
        try:
            os.close(STATUS_FD)
        except OSError:
            pass

    def ready(self) -> None:
        self._send(b"0\n")

    def failed(self, message: str) -> None:
        self._send(b"1\n" + message.encode("utf-8", "backslashreplace"))
