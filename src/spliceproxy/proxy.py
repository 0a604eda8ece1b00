"""The proxy process: what happens between dockerd's exec and exit.

dockerd starts one proxy per published port with a pipe on fd 3 and, from
28.0 on, the listening socket on fd 4 (see docs: docker-proxy's interface).
This module keeps docker-proxy's contract exactly:

* flag errors exit 2 with nothing on fd 3; ``-h`` and ``-v`` exit 0;
* once the listener is ready, ``0\\n`` is written to fd 3 in one write and
  fd 3 is closed; a startup failure writes ``1\\n<message>`` and exits 1;
* SIGINT and SIGTERM end the process with status 0 at once.

and adds what docker-proxy lacks: it keeps serving through descriptor
exhaustion, logs to a file on request, and never lets its own sockets land
on fd 3 when started by hand without a status pipe.

Imports are kept to the minimum: the process is started once per port.
"""

from __future__ import annotations

import _signal
import os

from spliceproxy import _engine, cli
from spliceproxy.log import Logger

STATUS_FD = 3
LISTEN_FD = 4
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2

ENV_PREFIX = "SPLICEPROXY_"


class StartupError(Exception):
    """A failure to report on the status pipe (exit 1)."""


# --------------------------------------------------------------------------
# Configuration from the environment (inherited from dockerd).

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("90s", "1m30s", "250ms") or a plain number of seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0 or value != value or value == float("inf"):
            raise ValueError("duration out of range")
        return value
    total = 0.0
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and (s[j].isdigit() or s[j] == "."):
            j += 1
        if j == i:
            raise ValueError("invalid duration %r" % text)
        number = float(s[i:j])
        k = j
        while k < len(s) and not (s[k].isdigit() or s[k] == "."):
            k += 1
        unit = s[j:k]
        if unit not in _DURATION_UNITS:
            raise ValueError("unknown unit %r in duration %r" % (unit, text))
        total += number * _DURATION_UNITS[unit]
        i = k
    return total


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise StartupError("invalid %s%s=%r: not an integer" % (ENV_PREFIX, name, raw)) from None
    if not lo <= value <= hi:
        raise StartupError("invalid %s%s=%r: must be between %d and %d"
                           % (ENV_PREFIX, name, raw, lo, hi))
    return value


def _env_duration_ms(name: str, default_ms: int) -> int:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default_ms
    try:
        seconds = parse_duration(raw)
    except ValueError as e:
        raise StartupError("invalid %s%s=%r: %s" % (ENV_PREFIX, name, raw, e)) from None
    if seconds > 365 * 86400:
        raise StartupError("invalid %s%s=%r: longer than a year" % (ENV_PREFIX, name, raw))
    return int(round(seconds * 1000))


def privilege_target() -> tuple[int, int] | None:
    """The (uid, gid) to become once the sockets are set up, or None to stay.

    Root drops to SPLICEPROXY_USER (a name or a numeric uid, default
    "nobody"); SPLICEPROXY_KEEP_PRIVILEGES=1 turns the drop off.  A process
    that is not root keeps its ids and only loses the ability to gain more.
    """
    if os.environ.get(ENV_PREFIX + "KEEP_PRIVILEGES", "") not in ("", "0"):
        return None
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    import pwd

    name = os.environ.get(ENV_PREFIX + "USER", "") or "nobody"
    if name.isdigit() and int(name) >= 0xFFFFFFFF:
        raise StartupError("invalid %sUSER=%r: uid out of range" % (ENV_PREFIX, name))
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        if name.isdigit():
            return int(name), int(name)
        if name == "nobody":
            return 65534, 65534  # the conventional nobody/nogroup ids
        raise StartupError("invalid %sUSER=%r: no such user" % (ENV_PREFIX, name)) from None
    return entry.pw_uid, entry.pw_gid


def configure_engine(engine: _engine.Engine) -> None:
    """Apply the SPLICEPROXY_* tunables; StartupError on a bad value."""
    mode = os.environ.get(ENV_PREFIX + "COPY_MODE", "splice") or "splice"
    if mode not in ("splice", "readwrite"):
        raise StartupError("invalid %sCOPY_MODE=%r: use splice or readwrite" % (ENV_PREFIX, mode))
    engine.set_option(_engine.OPT_COPY_MODE,
                      _engine.COPY_READWRITE if mode == "readwrite" else _engine.COPY_SPLICE)
    engine.set_option(_engine.OPT_COPY_BUF, _env_int("COPY_BUF", 65536, 1, 64 << 20))
    engine.set_option(_engine.OPT_PIPE_SIZE, _env_int("PIPE_SIZE", 1 << 20, 4096, 1 << 30))
    udp_timeout = _env_duration_ms("UDP_TIMEOUT", 90_000)
    if udp_timeout < 1:
        raise StartupError("invalid %sUDP_TIMEOUT: must be positive" % ENV_PREFIX)
    engine.set_option(_engine.OPT_UDP_TIMEOUT_MS, udp_timeout)
    engine.set_option(_engine.OPT_UDP_MAX_FLOWS, _env_int("UDP_MAX_FLOWS", 16384, 1, 1 << 24))
    engine.set_option(_engine.OPT_UDP_MAX_FLOWS_PER_ADDR,
                      _env_int("UDP_MAX_FLOWS_PER_ADDR", 0, 0, 1 << 24))
    # Half-closed pairs are reclaimed after two minutes by default, as
    # conntrack forgets a CLOSE_WAIT entry; 0 = never.
    engine.set_option(_engine.OPT_IDLE_TIMEOUT_MS, _env_duration_ms("IDLE_TIMEOUT", 120_000))
    engine.set_option(_engine.OPT_CONNECT_TIMEOUT_MS,
                      _env_duration_ms("CONNECT_TIMEOUT", 30_000))


# --------------------------------------------------------------------------
# Addresses and messages in Go's words.

def hostport(ip: str, port: int) -> str:
    """Go's net.JoinHostPort."""
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


def go_strerror(err: int) -> str:
    """errno text as Go prints it ("address already in use")."""
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


class Proxy:
    """One docker-proxy mapping served by the engine."""

    def __init__(self, config: cli.ProxyConfig, log: Logger):
        self.config = config
        self.log = log
        self.engine: _engine.Engine | None = None
        self.stats_fd = -1
        self.stopping = False
        self.listeners = 0
        self.listen_fd_inherited = True
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

    def start(self, stats_path: str | None) -> None:
        """Everything up to a ready listener; StartupError on failure."""
        self.validate()
        try:
            engine = _engine.Engine()
        except OSError as e:
            raise StartupError("cannot create the relay engine: %s"
                               % go_strerror(e.errno)) from None
        self.engine = engine
        if stats_path:
            try:
                # Kept open for the life of the process; the engine writes
                # copies of its counters to it and never reads it back.
                self.stats_fd = os.open(stats_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                        0o600)
                engine.set_stats_fd(self.stats_fd)
            except OSError as e:
                raise StartupError("cannot create the relay engine: %s (%s)" % (
                    go_strerror(e.errno), stats_path)) from None
        configure_engine(engine)
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

    def serve(self) -> None:
        """Relay until a stop signal (or until every listener failed)."""
        engine = self.engine
        assert engine is not None
        while not self.stopping:
            if engine.run(-1) == _engine.RUN_EVENTS:
                self.report(engine.events())
            if self.listeners <= 0:
                return

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
        return "engine event %d on %s: %s%s" % (kind, self.front, reason, times)


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            return max(1, min(int(f.read().strip() or 4096), 65535))
    except (OSError, ValueError):
        return 4096


# --------------------------------------------------------------------------
# The status pipe.

def _claim_inherited_fds() -> tuple[bool, bool]:
    """Make fds 3 and 4 close-on-exec; reserve fd 3 if it is absent.

    Returns whether fd 3 (the status pipe) and fd 4 (a listening socket)
    were inherited.  When fd 3 is absent (started by hand), /dev/null is put
    there so that no socket of ours gets fd 3.
    """
    have_status = True
    try:
        os.set_inheritable(STATUS_FD, False)
    except OSError:
        have_status = False
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if null != STATUS_FD:
            os.dup2(null, STATUS_FD, inheritable=False)
            os.close(null)
    have_listen_fd = True
    try:
        os.set_inheritable(LISTEN_FD, False)
    except OSError:
        have_listen_fd = False
    return have_status, have_listen_fd


def _report(have_status: bool, payload: bytes) -> None:
    """One write of the whole payload to fd 3, then close it."""
    if have_status:
        try:
            os.write(STATUS_FD, payload)
        except OSError:
            pass  # dockerd went away; nothing to tell
    try:
        os.close(STATUS_FD)
    except OSError:
        pass


# --------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    """Run the proxy; never returns (exits with docker-proxy's codes)."""
    have_status, have_listen_fd = _claim_inherited_fds()
    try:
        # The launcher execs the interpreter; show the command's name instead.
        _engine.set_process_name(os.path.basename(argv[0]) if argv and argv[0] else "spliceproxy")
    except OSError:
        pass
    config = cli.parse(argv)  # SystemExit(2/0) on flag errors, -h, -v
    log = Logger()
    proxy = Proxy(config, log)
    proxy.listen_fd_inherited = have_listen_fd

    def on_signal(signum, frame):
        proxy.stopping = True

    try:
        # Handlers and the wakeup descriptor are in place before "0\n".
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        _signal.signal(_signal.SIGINT, on_signal)
        _signal.signal(_signal.SIGTERM, on_signal)
        _signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        proxy.start(os.environ.get(ENV_PREFIX + "STATS_FILE") or None)
        proxy.engine.watch(rfd)
        target = privilege_target()
        if target is not None:
            if os.geteuid() == 0 and target[0] != 0 and proxy.config.proto == "tcp":
                # Pipes made now count against root's pipe-user-pages limits;
                # made later they would share the unprivileged user's small
                # budget with every other proxy.  Enough for two busy
                # connections; more are made on demand.
                try:
                    proxy.engine.reserve_pipes(4)
                except OSError:
                    pass
            try:
                _engine.drop_privileges(*target)
            except OSError as e:
                raise StartupError("cannot drop privileges to uid %d gid %d: %s: %s"
                                   % (target[0], target[1], e.filename,
                                      go_strerror(e.errno))) from None
    except StartupError as e:
        _report(have_status, b"1\n" + str(e).encode("utf-8", "replace"))
        log.log(str(e))
        os._exit(1)
    _report(have_status, b"0\n")

    try:
        proxy.serve()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        log.log("Stopping proxy on %s for %s (engine: %s)" % (proxy.front, proxy.back,
                                                             go_strerror(e.errno or 5)))
    # Close every socket and free the engine (a few milliseconds even with
    # thousands of connections; it also lets leak checkers see a clean exit),
    # then skip interpreter teardown.  docker-proxy exits 0 on a stop signal
    # and when its listener fails.
    proxy.engine.close()
    os._exit(0)
