"""One published port: its addresses, its listener, and the engine serving it.

``Proxy`` is a mapping as dockerd asks for one (``-proto``, ``-host-ip``,
``-host-port``, ``-container-ip``, ``-container-port``, ``-use-listen-fd``):
it opens (or adopts from fd 4) the listener the way docker-proxy does, hands
it to a relay engine configured from the settings, relays until stopped,
and words the engine's events as docker-proxy's log lines.  The process
around it (status pipe, signals, identity, exit codes) is
``spliceproxy.process``.
"""

from __future__ import annotations

import os

from spliceproxy import _engine, goflags
from spliceproxy.log import Logger
from spliceproxy.settings import Settings
from spliceproxy.status import LISTEN_FD

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOL_SOCKET = 1
SO_REUSEADDR = 2


class StartupError(Exception):
    """A failure to report on the status pipe (exit 1)."""


# --------------------------------------------------------------------------
# Addresses and messages in Go's words.

def hostport(ip: str, port: int) -> str:
    """Go's net.JoinHostPort."""
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


def go_strerror(err: int) -> str:
    """errno text as Go prints it ("address already in use")."""
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


def configure_engine(engine: _engine.Engine, settings: Settings) -> None:
    """Apply every setting that is an engine option."""
    for option, value in settings.engine_options():
        if isinstance(value, str):
            value = getattr(_engine, value)  # a constant of the engine's, e.g. COPY_SPLICE
        engine.set_option(getattr(_engine, option), value)


class Proxy:
    """One docker-proxy mapping served by the engine."""

    def __init__(self, config: goflags.ProxyConfig, settings: Settings, log: Logger,
                 listen_fd_inherited: bool = True):
        self.config = config
        self.settings = settings
        self.log = log
        self.engine: _engine.Engine | None = None
        self.listeners = 0
        self.listen_fd_inherited = listen_fd_inherited
        proto = config.proto
        self.net = proto + ("4" if config.host_family == AF_INET else "6")
        # An empty -host-ip is a nil IP to Go: it listens on [::], IPv6-only.
        self.listen_hostport = hostport(config.host_ip or "::", config.host_port)
        self.front = "%s/%s" % (proto, self.listen_hostport)
        self.backend_hostport = hostport(config.container_ip or "0.0.0.0",
                                         config.container_port)
        self.back = "%s/%s" % (proto, self.backend_hostport)

    # -- startup ---------------------------------------------------------

    def validate(self) -> None:
        c = self.config
        if c.proto == "sctp":
            raise StartupError("unsupported protocol sctp: SCTP relaying is not implemented "
                               "by spliceproxy (and this kernel may lack SCTP)")
        if c.proto not in ("tcp", "udp"):
            raise StartupError("unsupported protocol %s" % c.proto)
        if not 1 <= c.container_port <= 65535:
            raise StartupError("invalid container port %d: must be between 1 and 65535"
                               % c.container_port)
        if not c.use_listen_fd and not 0 <= c.host_port <= 65535:
            raise StartupError("failed to listen on %s: listen %s: address %d: invalid port"
                               % (self.listen_hostport, self.net, c.host_port))

    def open_listener(self) -> int:
        c = self.config
        sock_type = SOCK_STREAM if c.proto == "tcp" else SOCK_DGRAM
        if c.use_listen_fd:
            return self._adopt_listen_fd(sock_type)
        fd, step = _engine.open_listener(sock_type, c.host_family, c.host_addr, c.host_port)
        if fd < 0:
            where = self.listen_hostport
            raise StartupError("failed to listen on %s: listen %s %s: %s: %s"
                               % (where, self.net, where, step, go_strerror(-fd)))
        return fd

    def _adopt_listen_fd(self, sock_type: int) -> int:
        """Take over the socket dockerd passed on fd 4 (and close fd 4)."""
        import _socket

        if not self.listen_fd_inherited:
            # Checked at startup: anything on fd 4 now is a descriptor of ours.
            raise StartupError("file file+net listen-sock: fcntl: bad file descriptor")
        try:
            sock = _socket.socket(fileno=LISTEN_FD)
        except OSError as e:
            raise StartupError("file file+net listen-sock: fcntl: %s"
                               % go_strerror(e.errno or 9)) from None
        try:
            if sock.type != sock_type or sock.family not in (AF_INET, AF_INET6):
                raise StartupError("unexpected socket type for listener fd: %s"
                                   % ("stream" if sock.type == SOCK_STREAM else
                                      "datagram" if sock.type == SOCK_DGRAM else
                                      "type %d" % sock.type))
            fd = os.dup(LISTEN_FD)  # close-on-exec, like every descriptor of ours
            if sock_type == SOCK_DGRAM:
                # dockerd before 29 bound it with SO_REUSEADDR.  The kernel
                # checks the flag of the socket already bound when a newcomer
                # binds, so while it is set any local user can bind the same
                # port with SO_REUSEADDR and receive the clients' datagrams.
                try:
                    sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 0)
                except OSError as e:
                    os.close(fd)
                    raise StartupError("setsockopt on fd 4: %s" % go_strerror(e.errno)) from None
            if sock_type == SOCK_STREAM:
                # dockerd passes it listening; listen() again is harmless and
                # makes a merely bound socket usable too.
                try:
                    sock.listen(_somaxconn())
                except OSError as e:
                    os.close(fd)
                    raise StartupError("listen on fd 4: %s" % go_strerror(e.errno)) from None
        finally:
            sock.close()  # closes fd 4 itself
        return fd

    def start(self, stats_fd: int | None = None) -> None:
        """Everything up to a ready listener; StartupError on failure.

        stats_fd: the counters file, already opened safely (not owned)."""
        self.validate()
        try:
            engine = _engine.Engine()
        except OSError as e:
            raise StartupError("cannot create the relay engine: %s" % go_strerror(e.errno)) \
                from None
        self.engine = engine
        if stats_fd is not None:
            # The engine writes images of its counters to it and never reads
            # it back; the descriptor stays the caller's.
            try:
                engine.set_stats_fd(stats_fd)
            except OSError as e:
                raise StartupError("cannot use the counters file: %s"
                                   % go_strerror(e.errno)) from None
        configure_engine(engine, self.settings)
        try:
            limit = _engine.raise_nofile()
        except OSError:
            limit = 0  # keep the limit we have; the engine then reacts to EMFILE only
        engine.set_option(_engine.OPT_FD_LIMIT, min(limit, 1 << 40))
        fd = self.open_listener()
        c = self.config
        try:
            if c.proto == "tcp":
                engine.add_tcp(fd, c.container_family, c.container_addr, c.container_port)
            else:
                engine.add_udp(fd, c.host_family, c.container_family, c.container_addr,
                               c.container_port)
        except OSError as e:
            raise StartupError("cannot serve %s: %s" % (self.front, go_strerror(e.errno))) from None
        self.listeners = 1

    # -- running ---------------------------------------------------------

    @property
    def serving(self) -> bool:
        """False once every listener failed (docker-proxy then exits 0)."""
        return self.listeners > 0

    def run(self) -> int:
        """Relay until something needs the caller: a stop, a signal, the
        watched descriptor, or log events (reported here).  Returns the
        engine's RUN_* code."""
        engine = self.engine
        assert engine is not None
        rc = engine.run(-1)
        if rc == _engine.RUN_EVENTS:
            self.report(engine.events())
        return rc

    def watch(self, fd: int) -> None:
        """Make run() return when fd is readable (the signal wakeup pipe)."""
        assert self.engine is not None
        self.engine.watch(fd)

    def reserve_pipes(self, n: int) -> None:
        assert self.engine is not None
        try:
            self.engine.reserve_pipes(n)
        except OSError:
            pass  # made on demand later

    def close(self) -> None:
        """Close every socket and free the engine."""
        if self.engine is not None:
            self.engine.close()

    def report(self, events) -> None:
        for kind, err, _listener, count in events:
            if kind == _engine.EV_LISTENER_FAILED:
                self.listeners -= 1
            if not self.log.enabled:
                continue
            self.log.log(self.describe(kind, err, count))

    def describe(self, kind: int, err: int, count: int) -> str:
        reason = go_strerror(err) if err else ""
        times = " (%d times)" % count if count > 1 else ""
        if kind == _engine.EV_CONNECT_FAILED:
            return "Can't forward traffic to backend %s: dial tcp %s: connect: %s%s" % (
                self.back, self.backend_hostport, reason, times)
        if kind == _engine.EV_ACCEPT_PAUSED:
            return ("Accepting on %s paused: accept4: %s; new connections wait in the "
                    "backlog until descriptors are free" % (self.front, reason))
        if kind == _engine.EV_ACCEPT_ERROR:
            return "Error on %s, still serving (%s: %s)%s" % (
                self.front, "accept4" if self.config.proto == "tcp" else "recvmmsg", reason, times)
        if kind == _engine.EV_ACCEPT_RESUMED:
            return "Accepting on %s again" % self.front
        if kind == _engine.EV_LISTENER_FAILED:
            return "Stopping proxy on %s for %s (%s: %s)" % (
                self.front, self.back, "accept4" if self.config.proto == "tcp" else "recvmmsg",
                reason)
        if kind == _engine.EV_UDP_SEND_FAILED:
            return "Can't proxy a datagram to %s: write: %s%s" % (self.back, reason, times)
        if kind == _engine.EV_UDP_REPLY_FAILED:
            return "Can't return a datagram from %s to a client of %s: %s%s" % (
                self.back, self.front, reason, times)
        if kind == _engine.EV_UDP_FLOW_FAILED:
            return "Can't proxy a datagram to %s: dial udp %s: %s%s" % (
                self.back, self.backend_hostport, reason, times)
        if kind == _engine.EV_UDP_EVICTED:
            return ("UDP table of %s full: evicted %d least recently used entr%s "
                    "(SPLICEPROXY_UDP_MAX_FLOWS)" % (self.front, count,
                                                     "y" if count == 1 else "ies"))
        if kind == _engine.EV_IDLE_RECLAIMED:
            return "Reclaimed %d idle half-closed connection%s on %s (SPLICEPROXY_IDLE_TIMEOUT)" % (
                count, "" if count == 1 else "s", self.front)
        if kind == _engine.EV_UDP_ADDR_EVICTED:
            return ("UDP entries of one client address on %s at their bound: evicted %d of "
                    "its least recently used (SPLICEPROXY_UDP_MAX_FLOWS_PER_ADDR)"
                    % (self.front, count))
        if kind == _engine.EV_HEADROOM_RECLAIMED:
            return ("Out of descriptors on %s: reset %d half-closed connection%s that made "
                    "no progress for longest, to serve new clients" % (
                        self.front, count, "" if count == 1 else "s"))
        why = _TRANSPARENT_FALLBACKS.get(kind)
        if why is not None:
            return ("%s: some clients reach %s from the host's address, not their own: %s%s "
                    "(logged once for this mapping)" % (
                        self.front, self.back, why, ": " + reason if reason else ""))
        return "engine event %d on %s: %s%s" % (kind, self.front, reason, times)


# Why a client of a transparent mapping was relayed from the host's address
# (SPLICEPROXY_TRANSPARENT, csrc/transparent.c).
_TRANSPARENT_FALLBACKS = {
    _engine.EV_TP_LOOPBACK: "a loopback, link-local or other unroutable client address",
    _engine.EV_TP_FAMILY: "an IPv4 client of an IPv6 port",
    _engine.EV_TP_NETWORK: "a client inside a container network (its container would "
                           "answer it directly)",
    _engine.EV_TP_LOCAL: "a client address local to the host",
    _engine.EV_TP_FAILED: "binding the client's address failed",
}


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            return max(1, min(int(f.read().strip() or 4096), 65535))
    except (OSError, ValueError):
        return 4096
