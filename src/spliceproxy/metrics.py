"""The host engine's /metrics endpoint (SPLICEPROXY_METRICS_ADDR).

``GET /metrics`` answers the text exposition format (version 0.0.4) that
`spliceproxy status --prometheus` prints: the same renderer
(engine_status.prometheus) over the same status document.

It runs in the engine's one loop, beside the relay, and must never hold it
up.  So every socket here is non-blocking and watched by the service's
epoll, and what a scraper can cost is bounded:

* at most MAX_CONNECTIONS scrape connections at once; one more is answered
  503 and closed, and at most ACCEPTS_PER_ROUND are taken per loop round;
* the request (request line and headers) must arrive within
  REQUEST_DEADLINE_S and fit in REQUEST_MAX bytes, else the connection is
  dropped (or answered 400 when it is too long);
* the reply is written as the socket takes it and must be taken within
  REPLY_DEADLINE_S, else the connection is dropped: taken by the peer, not
  just by the kernel (what is still queued is asked, SIOCOUTQ);
* dropping is an abortive close (RST): no unsent reply stays queued in the
  kernel for a peer that does not read;
* rendering takes at most about RENDER_SHARE of the loop's time: a scrape
  that comes sooner after the last rendering than that allows waits until
  it does, and every scrape waiting then gets the one rendering (always
  made after its request arrived, never an older text).

One request per connection (``Connection: close``).  GET and HEAD of
/metrics (any query string) are answered; another path 404, another method
405, anything that is not an HTTP/1.x request 400.

A failure to open the address is logged and shown by `spliceproxy status`;
the relay goes on without the endpoint.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import time

from spliceproxy import files

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_CONNECTIONS = 8
ACCEPTS_PER_ROUND = 16
REQUEST_MAX = 8192
REQUEST_DEADLINE_S = 5.0
REPLY_DEADLINE_S = 10.0
RENDER_SHARE = 0.1
SOCKET_MODE = 0o660
BACKLOG = 16

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_HANGUP = select.EPOLLHUP | select.EPOLLERR
_LINGER_RESET = struct.pack("ii", 1, 0)
_SIOCOUTQ = 0x5411  # bytes the peer has not taken yet (TCP: not acknowledged)

_READING, _WAITING, _WRITING, _DRAINING = range(4)


def describe_address(addr: tuple) -> str:
    """The address as SPLICEPROXY_METRICS_ADDR writes it."""
    if addr[0] == "unix":
        return "unix:" + addr[1]
    return ("[%s]:%d" if addr[0] == "tcp6" else "%s:%d") % (addr[1], addr[2])


def _reply(status: bytes, body: bytes, head: bool = False, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: "
            + (CONTENT_TYPE if status.startswith(b"200") else b"text/plain; charset=utf-8")
            + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"Connection: close\r\n\r\n"
            + (b"" if head else body))


_BUSY = _reply(b"503 Service Unavailable", b"too many scrapers at once\n",
               extra=b"Retry-After: 1\r\n")
_TOO_LONG = _reply(b"400 Bad Request", b"request too long\n")


def parse_request(head: bytes) -> tuple[bytes, bool]:
    """(the reply's status line, whether it is a HEAD) for a request head
    (request line and headers, without the blank line)."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha() \
            or not parts[0].isupper():
        return b"400 Bad Request", False
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return b"405 Method Not Allowed", False
    if target.startswith((b"http://", b"https://")):  # absolute form: its path
        target = b"/" + (target.split(b"/", 3)[3:] or [b""])[0]
    if not target.startswith(b"/"):
        return b"400 Bad Request", False
    if target.split(b"?", 1)[0] != b"/metrics":
        return b"404 Not Found", method == b"HEAD"
    return b"200 OK", method == b"HEAD"


class _Scrape:
    """One scraper's connection."""

    __slots__ = ("sock", "fd", "buf", "out", "state", "deadline")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.state = _READING
        self.deadline = now + REQUEST_DEADLINE_S


class MetricsServer:
    """The endpoint: its listening socket and scrape connections, in the
    service's epoll (ep).  render() returns the exposition text."""

    def __init__(self, addr: tuple, ep, render, log):
        self.addr = addr
        self.address = describe_address(addr)
        self.ep = ep
        self.render = render
        self.log = log
        self.listener: socket.socket | None = None
        self.error: str | None = None
        self.conns: dict[int, _Scrape] = {}
        self.waiting: list[tuple[_Scrape, bool]] = []  # (scrape, HEAD) to render for
        self.next_render = 0.0  # monotonic time from which rendering is allowed again
        self.counts = {"scrapes": 0, "bad_requests": 0, "refused": 0, "dropped": 0}

    # -- the listening socket ----------------------------------------------

    def open(self) -> bool:
        """Bind and listen; on failure log why and serve nothing (the relay
        goes on).  Returns whether it listens."""
        try:
            self.listener = self._bind()
        except (OSError, ValueError, files.FileRefused) as e:
            if isinstance(e, files.FileRefused):
                why = str(e)
            elif isinstance(e, OSError) and e.errno:
                why = os.strerror(e.errno)
                why = why[:1].lower() + why[1:]
            else:
                why = str(e)
            self.error = why
            self.log.log("metrics not served on %s (SPLICEPROXY_METRICS_ADDR): %s; the "
                         "ports are served all the same" % (self.address, why))
            return False
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.log.log("metrics served on %s" % self.address)
        return True

    def _bind(self) -> socket.socket:
        if self.addr[0] == "unix":
            return self._bind_unix(self.addr[1])
        family = socket.AF_INET6 if self.addr[0] == "tcp6" else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                           | socket.SOCK_CLOEXEC)
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            ls.bind((self.addr[1], self.addr[2]))
            ls.listen(BACKLOG)
        except BaseException:
            ls.close()
            raise
        return ls

    def _bind_unix(self, path: str) -> socket.socket:
        """Bind in the directory checked by files.socket_parent, through its
        descriptor (no component of the path is looked up again); a socket
        left by an engine that is gone is replaced, a live one or any other
        file is not."""
        dfd, name = files.socket_parent(path)
        at = "/proc/self/fd/%d/%s" % (dfd, name)
        try:
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                st = None
            if st is not None:
                if st.st_mode & 0o170000 != 0o140000:
                    raise files.FileRefused("%s exists and is not a socket" % path)
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                try:
                    probe.connect(at)
                except (ConnectionRefusedError, FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)  # nobody listens: left by an engine gone
                except BlockingIOError:
                    raise files.FileRefused("%s is in use by another process" % path) from None
                else:
                    raise files.FileRefused("%s is in use by another process" % path)
                finally:
                    probe.close()
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                               | socket.SOCK_CLOEXEC)
            old = os.umask(0o777 & ~SOCKET_MODE)
            try:
                ls.bind(at)
                ls.listen(BACKLOG)
            except BaseException:
                ls.close()
                raise
            finally:
                os.umask(old)
            return ls
        finally:
            os.close(dfd)

    # -- the loop's side ---------------------------------------------------

    def handles(self, fd: int) -> bool:
        return fd in self.conns or (self.listener is not None and fd == self.listener.fileno())

    def event(self, fd: int, ev: int) -> None:
        if self.listener is not None and fd == self.listener.fileno():
            self._accept()
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        if conn.state == _READING:
            self._read(conn, ev)
        elif conn.state == _WAITING:
            if ev & _HANGUP:
                self._close(conn)
        elif conn.state == _WRITING:
            self._write(conn)
        else:
            self._drain(conn)

    def deadline(self) -> float | None:
        """The earliest time expire() has work, or None."""
        at = min((c.deadline for c in self.conns.values()), default=None)
        if self.waiting and (at is None or self.next_render < at):
            at = self.next_render
        return at

    def expire(self, now: float) -> None:
        """Answer the scrapes that waited for their rendering; drop every
        connection past its deadline."""
        self._render_for_waiting()
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.state == _DRAINING and not _unsent(conn.sock):
                self._close(conn)  # the reply was taken; the peer just did not close
            else:
                self.counts["dropped"] += 1
                self._close(conn, reset=True)

    def describe(self) -> dict:
        """The endpoint in the status document (the engine's "metrics")."""
        return dict(self.counts, address=self.address, listening=self.listener is not None,
                    error=self.error, connections=len(self.conns))

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, reset=True)
        if self.listener is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None

    # -- connections -------------------------------------------------------

    def _accept(self) -> None:
        now = time.monotonic()
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # the next round tries again; relaying goes on meanwhile
                continue  # ECONNABORTED and the like: that client's own
            sock.setblocking(False)
            if len(self.conns) >= MAX_CONNECTIONS:
                # A scraper that asks again at once can be here before its
                # last connection's close was seen (this loop answers each
                # connection as it takes it): count only those still open.
                for conn in [c for c in self.conns.values() if c.state == _DRAINING]:
                    self._drain(conn)
            if len(self.conns) >= MAX_CONNECTIONS:
                self.counts["refused"] += 1
                with contextlib.suppress(OSError):
                    sock.send(_BUSY)  # a few bytes: always taken by a new socket
                    sock.recv(REQUEST_MAX)  # what it sent, lest the close reset the reply
                sock.close()
                continue
            conn = _Scrape(sock, now)
            self.conns[conn.fd] = conn
            self.ep.register(conn.fd, _IN)
            # A scraper sends its request with the connect: serve it now.
            self._read(conn, select.EPOLLIN)

    def _read(self, conn: _Scrape, ev: int) -> None:
        try:
            data = conn.sock.recv(REQUEST_MAX + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            if ev & _HANGUP:
                self._close(conn)
            return
        except OSError:
            self._close(conn, reset=True)
            return
        if not data:
            self._close(conn)  # gone before asking
            return
        conn.buf += data
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.buf.find(b"\n\n")
        if end < 0:
            if len(conn.buf) > REQUEST_MAX:
                self.counts["bad_requests"] += 1
                conn.deadline = time.monotonic() + REPLY_DEADLINE_S
                self._answer(conn, _TOO_LONG)
            return
        # From here the reply (rendering included) has REPLY_DEADLINE_S.
        conn.deadline = time.monotonic() + REPLY_DEADLINE_S
        status, head = parse_request(bytes(conn.buf[:end]))
        if status.startswith(b"200"):
            conn.state = _WAITING
            conn.buf = bytearray()
            self.ep.modify(conn.fd, 0)  # a hang-up is still reported
            self.waiting.append((conn, head))
            self._render_for_waiting()
        else:
            self.counts["bad_requests"] += 1
            body = status[4:].lower() + b"; this server answers GET /metrics only\n"
            extra = b"Allow: GET, HEAD\r\n" if status.startswith(b"405") else b""
            self._answer(conn, _reply(status, body, head=head, extra=extra))

    def _render_for_waiting(self) -> None:
        """One rendering for every scrape waiting, once the last one's cost
        is paid back (1 / RENDER_SHARE - 1)-fold in time left to the relay."""
        now = time.monotonic()
        waiting = [(c, head) for c, head in self.waiting if c.fd in self.conns]
        self.waiting = waiting
        if not waiting or now < self.next_render:
            return
        self.waiting = []
        self.counts["scrapes"] += len(waiting)
        try:
            text = self.render().encode("utf-8")
            status = b"200 OK"
        except Exception as e:  # a fault here must cost these scrapes only
            self.log.log("metrics: rendering failed: %r" % e)
            text, status = b"rendering failed\n", b"500 Internal Server Error"
        done = time.monotonic()
        self.next_render = done + (done - now) * (1 / RENDER_SHARE - 1)
        for conn, head in waiting:
            self._answer(conn, _reply(status, text, head=head))

    def _answer(self, conn: _Scrape, reply: bytes) -> None:
        conn.state = _WRITING
        conn.buf = bytearray()
        conn.out = memoryview(reply)
        self.ep.modify(conn.fd, _OUT)
        self._write(conn)

    def _write(self, conn: _Scrape) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn, reset=True)
                return
            conn.out = conn.out[n:]
        # All of it is with the kernel: end our side, and read (and throw
        # away) until the peer closes, so that a request it sent on does
        # not turn the close into a reset that could cut the reply short.
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.state = _DRAINING
        self.ep.modify(conn.fd, _IN)

    def _drain(self, conn: _Scrape) -> None:
        for _ in range(4):
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return

    def _close(self, conn: _Scrape, reset: bool = False) -> None:
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(conn.fd)
        if reset:
            self._abort(conn.sock)
        else:
            conn.sock.close()

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with a reset: nothing left queued for a peer that does not read."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()


def _unsent(sock: socket.socket) -> int:
    """Bytes written to sock that its peer has not taken yet (-1: unknown)."""
    out = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _SIOCOUTQ, out, True)
    except OSError:
        return -1
    return out[0]


def start(addr: tuple | None, ep, render, log) -> MetricsServer | None:
    """The endpoint for SPLICEPROXY_METRICS_ADDR's value (None: off)."""
    if addr is None:
        return None
    server = MetricsServer(addr, ep, render, log)
    server.open()
    return server


__all__ = ["MetricsServer", "parse_request", "start"]
