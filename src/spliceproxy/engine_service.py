"""The host engine: one process and one epoll loop for every published port.

In engine mode (the default) the process dockerd starts per port is
a small C stub (csrc/stub/stub.c) that hands its command line and
descriptors to this service over the control socket (control.py) and waits.
The service:

* parses the flags with goflags.parse, exactly as the standalone proxy (usage on
  the stub's stderr, its exit code sent back to the stub);
* opens the listener or adopts dockerd's fd 4, adds it to its one
  _engine.Engine, and answers fd 3 itself (``0\\n``, or ``1\\n<msg>``);
* sends the stub a duplicate of the listening socket, which the stub keeps,
  so that the port stays bound if this process dies: the stubs then start a
  new engine and register the same sockets again ("adopt");
* removes a mapping when its stub asks (dockerd stopped it) or hangs up
  (the stub was killed), and exits after a grace period without mappings.

One loop: the control socket and the stub connections live in a Python
``select.epoll`` whose descriptor the C engine watches, so the engine's
epoll_wait is the only place the process sleeps.
"""

from __future__ import annotations

import _signal
import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

from spliceproxy import _engine, control, goflags, metrics, settings, userns
from spliceproxy.helptext import HELP_POINTER
from spliceproxy.log import Logger, NoWaitOutput
from spliceproxy.proxy import (
    AF_INET,
    AF_INET6,
    SO_REUSEADDR,
    SOCK_DGRAM,
    SOCK_STREAM,
    SOL_SOCKET,
    Proxy,
    StartupError,
    _somaxconn,
    configure_engine,
    go_strerror,
    hostport,
)
from spliceproxy.settings import ENV_PREFIX, Settings, parse_duration

# --------------------------------------------------------------------------
# The standalone front end's pieces, applied to one mapping's command line
# and environment.  (The only place that knows how the front end parses
# flags and settings.)


def parse_flags(argv: list[str]):
    return goflags.parse(argv, HELP_POINTER)


def load_settings(env: dict[str, str], mode: str | None = None) -> Settings:
    """A mapping's SPLICEPROXY_* settings (as its stub's environment has them);
    StartupError with the standalone proxy's message if one is invalid (or,
    with mode, does not work in that mode)."""
    raw = {k.encode(): os.fsencode(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}
    try:
        return settings.load(raw, mode)
    except settings.SettingError as e:
        raise StartupError(str(e)) from None


_OPTION_VARS = {v.option: ENV_PREFIX + v.name for v in settings.VARIABLES if v.option}

# Events the engine emits for every listener at once (listener -1), and the
# per-listener counter that says how much of each is a mapping's.
SHARED_EVENTS = {_engine.EV_IDLE_RECLAIMED: "idle_reclaimed",
                 _engine.EV_HEADROOM_RECLAIMED: "headroom_reclaimed"}


def option_differences(mine: Settings, theirs: Settings) -> dict[str, object]:
    """The engine options (by name) whose value in theirs differs from mine."""
    a, b = dict(mine.engine_options()), dict(theirs.engine_options())
    return {k: b.get(k, a.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


# Every engine option, as the status shows it ("pipe_size", "idle_timeout_ms").
_OPTION_NAMES = sorted(n for n in dir(_engine) if n.startswith("OPT_"))
_COPY_MODES = {_engine.COPY_SPLICE: "splice", _engine.COPY_READWRITE: "readwrite"}


def engine_options(engine: _engine.Engine, lid: int = -1) -> dict[str, object]:
    """The options a listener runs with, those its protocol lets it have of
    its own (its value, else the engine's); with lid -1 the engine's, all."""
    out: dict[str, object] = {}
    for name in _OPTION_NAMES:
        try:
            value = engine.get_option(getattr(_engine, name), lid)
        except OSError:
            continue  # the engine's by nature: shown with the engine
        out[name[len("OPT_"):].lower()] = (_COPY_MODES.get(value, value)
                                           if name == "OPT_COPY_MODE" else value)
    return out


# Settings that are the engine process's, not options of its relay: whom it
# runs as, the fast path it loaded, the transparent mode's rules and where it
# serves /metrics.  A mapping cannot have its own.
ENGINE_WIDE = ("USER", "KEEP_PRIVILEGES", "FASTPATH", "FASTPATH_CGROUP", "TRANSPARENT",
               "METRICS_ADDR")


def engine_wide_differences(mine: Settings, theirs: Settings) -> list[str]:
    """The SPLICEPROXY_* names of ENGINE_WIDE whose value in theirs differs from mine."""
    return [ENV_PREFIX + n for n in ENGINE_WIDE
            if getattr(mine, n.lower()) != getattr(theirs, n.lower())]


def configure(engine: _engine.Engine, conf: Settings) -> None:
    configure_engine(engine, conf)


def new_proxy(config, conf: Settings, log: Logger) -> Proxy:
    return Proxy(config, conf, log)


def engine_identity(conf: Settings):
    """Whom the engine becomes (an identity.Identity, or None to stay);
    StartupError if SPLICEPROXY_USER names nobody."""
    from spliceproxy import identity

    try:
        return identity.choose(conf.user, conf.keep_privileges)
    except identity.IdentityError as e:
        raise StartupError(str(e)) from None


IDLE_EXIT_ENV = "SPLICEPROXY_ENGINE_IDLE_EXIT"
DEFAULT_IDLE_EXIT_S = 5.0
LOCK_WAIT_S = 3.0  # an engine that is exiting releases its lock within this
ACCEPT_BACKOFF_S = 0.1  # control socket out of descriptors
SEND_TIMEOUT_S = 1.0  # a status client that does not read its answer

_EPOLLIN = select.EPOLLIN
_HANGUP = select.EPOLLHUP | select.EPOLLRDHUP | select.EPOLLERR


class EngineError(Exception):
    """The service cannot start (another engine runs, the directory is foreign...)."""


class Mapping:
    """One published port served by the engine, and the stub that stands for it."""

    __slots__ = ("id", "proxy", "conn", "stub_pid", "started", "started_wall", "log",
                 "adopted", "host", "fd", "fp_id", "logged", "transparent")

    def __init__(self, lid: int, proxy: Proxy, conn: Conn, log: Logger, adopted: bool,
                 port: int, fd: int = -1):
        self.id = lid
        self.fd = fd  # the listener, owned by the engine until it is removed
        self.fp_id: int | None = None  # its fast-path mapping, when it has one
        # The port bound (-host-port 0 is any free one).
        self.host = hostport(proxy.config.host_ip or "::", port)
        self.proxy = proxy
        self.conn = conn
        self.stub_pid = conn.pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.log = log
        self.adopted = adopted
        # Of an engine-wide event's counter (SHARED_EVENTS): how much of it
        # this mapping's log has told.
        self.logged: dict[str, int] = {}
        self.transparent = False  # its backend sockets take the client's address

    def describe(self) -> dict:
        c = self.proxy.config
        return {
            "id": self.id,
            "proto": c.proto,
            "host": self.host,
            "container": self.proxy.backend_hostport,
            "stub_pid": self.stub_pid,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "started": self.started_wall,
            "adopted": self.adopted,
            "transparent": self.transparent,
        }


class Conn:
    """A connection on the control socket: a stub, or a status client."""

    __slots__ = ("sock", "pid", "uid", "mapping", "refused")

    def __init__(self, sock: socket.socket, pid: int, uid: int):
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.mapping: Mapping | None = None
        self.refused = False


def idle_exit_seconds(env=None) -> float | None:
    """SPLICEPROXY_ENGINE_IDLE_EXIT: seconds without mappings before exiting; None: never."""
    env = os.environ if env is None else env
    raw = env.get(IDLE_EXIT_ENV, "")
    if not raw:
        return DEFAULT_IDLE_EXIT_S
    if raw.strip() == "never":
        return None
    try:
        return parse_duration(raw)
    except ValueError as e:
        raise EngineError("invalid %s=%r: %s (a duration, or never)" % (IDLE_EXIT_ENV, raw, e)
                          ) from None


def _text_stream(fd: int | None):
    """A stream on a stub's stdout/stderr that never blocks the loop (a full
    pipe loses the text instead); None when there is nowhere to write."""
    if fd is None:
        return None
    out = NoWaitOutput.of(os.dup(fd))
    return _NoWaitText(out) if out is not None else None


def _parse_flags(argv: list[str], out_fd: int | None, err_fd: int | None):
    """goflags.parse with its output on the stub's descriptors: (config, None) or (None, code)."""
    out, err = _text_stream(out_fd), _text_stream(err_fd)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        return parse_flags(argv), None
    except SystemExit as e:
        return None, e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout, sys.stderr = saved
        for stream in (out, err):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


def _write_status(fd: int | None, payload: bytes) -> None:
    """The answer on a stub's fd 3, in one write, then closed.  Non-blocking,
    as docker-proxy 28+ sets it: dockerd reads it; nobody else may stall the
    loop every port shares with a pipe that does not drain."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.set_blocking(fd, False)
        os.write(fd, payload)
    with contextlib.suppress(OSError):
        os.close(fd)


class Service:
    """The engine process: control socket, mappings, and the relay engine."""

    def __init__(self, sock_path: str, idle_exit: float | None, log: Logger | None = None):
        self.sock_path = os.path.abspath(sock_path)
        self.dir = os.path.dirname(self.sock_path)
        self.idle_exit = idle_exit
        self.log = log if log is not None else Logger()
        self.owner_uid = os.geteuid()
        self.engine: _engine.Engine | None = None
        self.listener: socket.socket | None = None
        self.listener_ino = None
        self.lock_fd = -1
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.mappings: dict[int, Mapping] = {}
        self.settings: Settings | None = None
        self.identity = None  # held for the engine's life (a dynamic uid's lock)
        self.dirty_logs: set = set()
        self.started = time.monotonic()
        self.idle_since: float | None = time.monotonic()
        self.stopping = False
        self.hup = False
        self.sig_r = self.sig_w = -1
        self.accept_resume: float | None = None
        self.fastpath = None  # fastpath.FastPath while the programs are attached
        self.fastpath_reason = "SPLICEPROXY_FASTPATH is not set"
        self.fastpath_cgroup: str | None = None
        self.addr_watch = None  # fastpath.AddressWatch, for wildcard mappings
        # The one network namespace this engine serves: where it runs.
        self.netns = control.netns_id()
        self.tp_rules = None  # transparent.Rules when SPLICEPROXY_TRANSPARENT is on
        self.tp_reason = "SPLICEPROXY_TRANSPARENT is not set"
        self.tp_mappings: dict[int, str] = {}  # transparent listener id -> container address
        self.metrics: metrics.MetricsServer | None = None  # SPLICEPROXY_METRICS_ADDR

    # -- setup -----------------------------------------------------------

    def _take_lock(self) -> None:
        """<socket>.lock, held for the engine's life: one engine per socket (a
        directory may hold the sockets of several namespaces' engines)."""
        path = self.sock_path + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise EngineError("another engine serves %s" % self.sock_path) from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.lock_fd = fd

    def setup(self) -> None:
        try:
            control.check_dir(self.dir)
        except OSError as e:
            raise EngineError(str(e) if isinstance(e, PermissionError) and not e.filename
                              else "engine socket directory %s: %s"
                              % (self.dir, e.strerror or e)) from None
        self._take_lock()
        # A socket file left by an engine that died: nobody listens on it (we
        # hold the lock every live engine holds).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            ls.bind(self.sock_path)
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        ls.listen(512)
        ls.setblocking(False)
        self.listener = ls
        self.listener_ino = os.stat(self.sock_path).st_ino

        engine = _engine.Engine()
        try:
            self.settings = load_settings(dict(os.environ))
        except StartupError as e:
            # The environment of the stub that started this engine: its
            # mapping fails on the same value with the standalone message,
            # and the engine serves others with the defaults.
            self.log.log("engine settings: %s; the defaults apply" % e)
            self.settings = load_settings({})
        configure(engine, self.settings)
        if self.settings.fastpath:
            # Loading and attaching need privilege: before the drop, once.
            self._load_fastpath()
        if self.settings.transparent:
            self._transparent_setup()
        try:
            limit = _engine.raise_nofile()
        except OSError:
            limit = 0
        engine.set_option(_engine.OPT_FD_LIMIT, min(limit, 1 << 40))
        self.engine = engine

        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.signal(_signal.SIGINT, self._on_signal)
        _signal.signal(_signal.SIGTERM, self._on_signal)
        _signal.signal(_signal.SIGHUP, self._on_hup)
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
        _signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        self.ep.register(self.listener.fileno(), _EPOLLIN)
        self.ep.register(self.sig_r, _EPOLLIN)
        if self.addr_watch is not None:
            self.ep.register(self.addr_watch.fileno(), _EPOLLIN)
        engine.watch(self.ep.fileno())
        self.metrics = metrics.start(self.settings.metrics_addr, self.ep, self._metrics_text,
                                     self.log)
        self._drop_privileges()

    def _load_fastpath(self) -> None:
        """Load and attach the fast path's programs; one log line says whether
        it is active and, if not, why (every client takes the relay then)."""
        from spliceproxy import fastpath

        assert self.settings is not None
        path = fastpath.cgroup_path(self.settings)
        got = fastpath.load(path) if path is not None else fastpath.Unavailable(
            "cgroup", "cgroup v2 is not mounted (looked at %s)"
            % ", ".join(fastpath.CGROUP_CANDIDATES))
        if got:
            try:
                watch = fastpath.AddressWatch()
            except OSError as e:
                got.close()
                got = fastpath.Unavailable("other", "address events: %s" % go_strerror(e.errno))
            else:
                self.fastpath, self.addr_watch = got, watch
                self.fastpath_cgroup = path
                self.fastpath_reason = ""
                self.log.log("fast path active: host-local clients of the published ports "
                             "skip the relay (programs attached to cgroup %s)" % path)
                return
        self.fastpath_reason = "%s: %s" % (got.kind, got.reason)
        detail = ""
        if got.log:
            last = [ln for ln in got.log.splitlines() if ln.strip()]
            if last:
                detail = " (verifier: %s)" % last[-1].strip()
        self.log.log("fast path not active (%s): %s%s; every client takes the relay"
                     % (got.kind, got.reason, detail))

    def _fastpath_add(self, mapping: Mapping) -> None:
        """Give a mapping its entries and tag its listener; a refusal (a
        kernel before 6.5 refuses bpf() once the capabilities are gone)
        leaves that mapping on the relay, with one log line."""
        fp = self.fastpath
        if fp is None or mapping.fd < 0:
            return
        c = mapping.proxy.config
        try:
            host_ip = socket.inet_ntop(c.host_family, c.host_addr)
            container = socket.inet_ntop(c.container_family, c.container_addr)
            port = _bound_port(mapping.fd, c.host_port)
            m = fp.add_mapping(c.proto, host_ip, port, container, c.container_port, mapping.fd)
        except (OSError, ValueError) as e:
            why = go_strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
            mapping.log.log("%s: fast path not serving this mapping (%s); its clients take "
                            "the relay" % (mapping.proxy.front, why))
            self._logged(mapping.log)
            return
        mapping.fp_id = m.id
        if not m.addresses:
            mapping.log.log("%s: fast path not serving this mapping (%s); its clients take "
                            "the relay" % (mapping.proxy.front, m.reason))
            self._logged(mapping.log)

    def _fastpath_remove(self, mapping: Mapping, listener_open: bool = True) -> None:
        """Entries first, then the tag, while the listener is still open."""
        fp, fid = self.fastpath, mapping.fp_id
        if fp is None or fid is None:
            return
        mapping.fp_id = None
        if not listener_open:
            # Its descriptor number may be another socket's by now: never untag it.
            for m in fp.mappings():
                if m.id == fid:
                    m.listener_fd = -1
        try:
            fp.remove_mapping(fid)
        except OSError as e:
            self.log.log("%s: removing its fast-path entries: %s"
                         % (mapping.proxy.front, go_strerror(e.errno)))

    def _address_events(self) -> None:
        fp, watch = self.fastpath, self.addr_watch
        if fp is None or watch is None:
            return
        try:
            fp.apply(watch.read())
        except OSError as e:
            self.log.log("fast path: following local addresses: %s" % go_strerror(e.errno))

    # -- transparent mode (transparent.py) --------------------------------

    def _transparent_setup(self) -> None:
        """Find the host's firewall tool; the rules wait for the first mapping."""
        from spliceproxy import transparent

        try:
            tool = transparent.firewall()
        except transparent.Unavailable as e:
            self.tp_reason = str(e)
            self.log.log("transparent mode not available: %s; every mapping relays from the "
                         "host's address" % e)
            return
        self.tp_rules = transparent.Rules(tool)
        self.tp_reason = ""
        note = ""
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
                if int(f.read()):
                    note = ("; net.ipv4.ip_nonlocal_bind is 1, so no client address can be "
                            "told from a local one: every client falls back")
        self.log.log("transparent mode on (firewall: %s): containers see their clients' own "
                     "addresses%s" % (tool, note))

    def _transparent_add(self, mapping: Mapping) -> None:
        """Make a mapping transparent, adding the rules with the first one; a
        mapping that cannot be relays from the host's address, logged once."""
        rules, engine = self.tp_rules, self.engine
        if rules is None or engine is None:
            return
        from spliceproxy import transparent

        c = mapping.proxy.config
        front = mapping.proxy.front
        why = ""
        if c.host_family != c.container_family:
            why = ("its clients are IPv%s and the container IPv%s"
                   % ("6" if c.host_family == AF_INET6 else "4",
                      "6" if c.container_family == AF_INET6 else "4"))
        elif not self.tp_mappings:
            try:
                stale = rules.install()
            except (transparent.Unavailable, OSError, subprocess.SubprocessError) as e:
                why = "cannot add its policy route: %s" % e
            else:
                if stale:
                    self.log.log("transparent mode: removed what a previous engine left: %s"
                                 % ", ".join(stale))
                self.log.log("transparent mode: policy route added (mark %#x, table %d, "
                             "rule priority %d)" % (transparent.MARK, transparent.TABLE,
                                                    transparent.PREF))
        if not why and c.container_family not in rules.families:
            why = "the host has no IPv6 policy routing for it"
        if why:
            mapping.log.log("%s: the container sees the host's address, not the client's (%s)"
                            % (front, why))
            self._logged(mapping.log)
            if not self.tp_mappings:
                self._transparent_rules_down()
            return
        self.tp_mappings[mapping.id] = socket.inet_ntop(c.container_family, c.container_addr)
        self._transparent_exclude()
        try:
            engine.set_listener_option(mapping.id, _engine.OPT_TRANSPARENT, 1)
        except OSError as e:
            del self.tp_mappings[mapping.id]
            mapping.log.log("%s: the container sees the host's address, not the client's (%s)"
                            % (front, go_strerror(e.errno)))
            self._logged(mapping.log)
            if not self.tp_mappings:
                self._transparent_rules_down()
            return
        mapping.transparent = True

    def _transparent_exclude(self) -> None:
        """Give the engine the container networks again (they come and go)."""
        from spliceproxy import transparent

        assert self.engine is not None
        nets = transparent.container_networks(sorted(set(self.tp_mappings.values())))
        try:
            self.engine.set_transparent_exclude(nets[:_engine.TRANSPARENT_EXCLUDE_MAX])
        except (OSError, ValueError) as e:
            self.log.log("transparent mode: container networks: %s" % e)

    def _transparent_remove(self, mapping: Mapping) -> None:
        if self.tp_mappings.pop(mapping.id, None) is None:
            return
        mapping.transparent = False
        if not self.tp_mappings:
            self._transparent_rules_down()

    def _transparent_rules_down(self) -> None:
        rules = self.tp_rules
        if rules is None or not rules.families:
            return
        from spliceproxy import transparent

        try:
            rules.remove()
        except (transparent.Unavailable, OSError, subprocess.SubprocessError) as e:
            self.log.log("transparent mode: removing its policy route: %s" % e)
            return
        self.log.log("transparent mode: policy route removed (no transparent mapping)")

    def _drop_privileges(self) -> None:
        """As the standalone proxy, but keeping the right to bind low ports."""
        engine = self.engine
        assert engine is not None
        assert self.settings is not None
        try:
            who = engine_identity(self.settings)
        except StartupError as e:
            self.log.log("engine user: %s; the default applies" % e)
            who = engine_identity(load_settings({}))
        if who is None:
            return
        self.identity = who
        target = (who.uid, who.gid)
        if os.geteuid() == 0 and target[0] != 0:
            # Pipes made now count against root's pipe-user-pages limits, not
            # the small budget the unprivileged user shares (see proxy.main).
            with contextlib.suppress(OSError):
                engine.reserve_pipes(16)
        # The one privilege the engine's work needs: binding a port below
        # 1024 for a mapping that comes later (dockerd before 28.0 passes no
        # socket).  The transparent mode keeps CAP_NET_ADMIN as well:
        # IP_TRANSPARENT on every backend socket, and the policy route it
        # adds and removes as mappings come and go (ip and iptables/nft run
        # with that one capability ambient, hence inheritable).
        keep = [CAP_NET_BIND_SERVICE]
        inheritable = []
        if self.tp_rules is not None:
            keep.append(CAP_NET_ADMIN)
            inheritable.append(CAP_NET_ADMIN)
        # Root of a user namespace (a rootless dockerd's) that stays uid 0
        # there (identity.choose: no dynamic uid is mapped) is the user on
        # the host already; it still gives up every capability over that
        # namespace but these.
        stay = target[0] == 0 and not userns.in_initial()
        try:
            if os.geteuid() == 0 and (target[0] != 0 or stay):
                _engine.drop_privileges(*target, keep, inheritable)
            else:
                _engine.no_new_privs()
        except OSError as e:
            raise EngineError("cannot drop privileges to uid %d gid %d: %s: %s"
                              % (target[0], target[1], e.filename, go_strerror(e.errno))
                              ) from None

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _on_hup(self, signum, frame) -> None:
        self.hup = True  # reopen the engine's log file (logrotate)

    def _flush_logs(self) -> None:
        """Lines a log could not take at once (a pipe, a slow disk) go out
        when it takes them; the loop never waits for a log."""
        if self.dirty_logs:
            self.dirty_logs = {log for log in self.dirty_logs if not log.flush()}

    def _logged(self, log: Logger) -> None:
        if not log.flush():
            self.dirty_logs.add(log)

    # -- the loop --------------------------------------------------------

    def run(self) -> int:
        engine = self.engine
        assert engine is not None
        self.log.log("spliceproxy engine %d serving %s" % (os.getpid(), self.sock_path))
        while not self.stopping:
            now = time.monotonic()
            deadlines = []
            if self.accept_resume is not None:
                if now >= self.accept_resume:
                    self.accept_resume = None
                    if self.listener is not None:
                        self.ep.register(self.listener.fileno(), _EPOLLIN)
                else:
                    deadlines.append(self.accept_resume)
            if self.idle_since is not None and self.idle_exit is not None:
                at = self.idle_since + self.idle_exit
                if now >= at:
                    if self._may_exit_idle():
                        break
                    at = now + 0.05
                deadlines.append(at)
            if self.metrics is not None:
                self.metrics.expire(now)
                if self.metrics.deadline() is not None:
                    deadlines.append(self.metrics.deadline())
            timeout = max(1, int((min(deadlines) - now) * 1000) + 1) if deadlines else -1
            rc = engine.run(timeout)
            if rc == _engine.RUN_EVENTS:
                self._engine_events(engine.events())
            for fd, ev in self.ep.poll(0):
                if fd == self.sig_r:
                    with contextlib.suppress(OSError):
                        os.read(self.sig_r, 512)
                    if self.hup:
                        self.hup = False
                        self.log.reopen()
                elif self.listener is not None and fd == self.listener.fileno():
                    self._accept()
                elif self.addr_watch is not None and fd == self.addr_watch.fileno():
                    self._address_events()
                elif self.metrics is not None and self.metrics.handles(fd):
                    self.metrics.event(fd, ev)
                else:
                    self._conn_event(fd, ev)
            self._flush_logs()
            self._logged(self.log)
        self.shutdown()
        return 0

    def _may_exit_idle(self) -> bool:
        """Exit only with no mapping and nobody waiting to register one."""
        if self.mappings or self.conns:
            self.idle_since = time.monotonic() if not self.mappings else None
            return False
        # Look once more at the backlog: a stub that connected meanwhile is
        # served.  Then stop taking connections: a stub that connects after
        # the close is refused (or hung up on, and tries again) and starts a
        # new engine, which waits for this one's lock.  The file goes last
        # (unprivileged, the engine cannot unlink it in root's directory; a
        # refused connect means the same to a stub).
        self._accept()
        if self.conns:
            return False
        if self.listener is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self._unlink_socket()
        return True

    def _unlink_socket(self) -> None:
        try:
            if os.stat(self.sock_path).st_ino == self.listener_ino:
                os.unlink(self.sock_path)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Close everything: listeners, connections, the control socket."""
        self._unlink_socket()
        for conn in list(self.conns.values()):
            self._close_conn(conn, remove=False)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.fastpath is not None:
            self.fastpath.close()  # detach: every connect goes where it is addressed
            self.fastpath = None
        if self.engine is not None:
            self.engine.close()
        # After the engine: its transparent sockets are closed.
        self.tp_mappings.clear()
        self._transparent_rules_down()
        if self.addr_watch is not None:
            self.addr_watch.close()
            self.addr_watch = None
        if self.metrics is not None:
            self.metrics.close()
        self.log.log("spliceproxy engine %d exiting" % os.getpid())

    # -- control connections ---------------------------------------------

    def _accept(self) -> None:
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Level-triggered: stop watching it for a while rather
                    # than spin; the stubs wait in the backlog.
                    self.log.log("control socket: accept: %s; pausing for %d ms"
                                 % (go_strerror(e.errno), ACCEPT_BACKOFF_S * 1000))
                    with contextlib.suppress(OSError, ValueError):
                        self.ep.unregister(self.listener.fileno())
                    self.accept_resume = time.monotonic() + ACCEPT_BACKOFF_S
                return
            sock.setblocking(False)
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            conn = Conn(sock, pid, uid)
            if uid not in (self.owner_uid, 0):
                # Every request of this peer gets the error; the connection is
                # closed when the peer hangs up (closing first could reset it
                # before it reads the reason).
                self.log.log("control socket: refused pid %d uid %d (this engine is uid %d's)"
                             % (pid, uid, self.owner_uid))
                conn.refused = True
            self.conns[sock.fileno()] = conn
            self.ep.register(sock.fileno(), _EPOLLIN | select.EPOLLRDHUP)
            self.idle_since = None
            # A stub sends its request right after connecting: serve it now
            # rather than one loop round later (start-up latency).
            self._conn_event(sock.fileno(), _EPOLLIN)

    def _conn_event(self, fd: int, ev: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        if ev & _EPOLLIN:
            # Read what is queued even on a hang-up: a stub's last request
            # ("remove") may be there.
            for _ in range(16):
                try:
                    data, fds, truncated = control.recv(conn.sock)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._close_conn(conn, remove=True)
                    return
                if not data and not fds:
                    if ev & _HANGUP:
                        break
                    self._reply_error(conn, "empty message")
                    break
                self._request(conn, data, fds, truncated)
                if conn.sock.fileno() < 0:
                    return
        if ev & _HANGUP:
            self._close_conn(conn, remove=True)

    def _close_conn(self, conn: Conn, remove: bool) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(fd)
            self.conns.pop(fd, None)
        if remove and conn.mapping is not None:
            self._remove(conn.mapping, "its stub (pid %d) went away" % conn.pid)
        conn.sock.close()
        self._note_idle()

    def _note_idle(self) -> None:
        if not self.mappings and self.idle_since is None:
            self.idle_since = time.monotonic()

    def _send(self, conn: Conn, data: bytes, fds=()) -> None:
        try:
            control.send(conn.sock, data, fds)
        except OSError:
            pass  # its hang-up is handled when epoll reports it

    def _reply_error(self, conn: Conn, text: str) -> None:
        self._send(conn, b"error\0" + text.encode("utf-8", "replace") + b"\0")

    def _request(self, conn: Conn, data: bytes, fds: list[int], truncated: bool) -> None:
        if conn.refused:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._reply_error(conn, "permission denied: uid %d may not use the engine of uid %d"
                              % (conn.uid, self.owner_uid))
            return
        if truncated:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._reply_error(conn, "message too long or too many descriptors")
            return
        try:
            req = control.decode(data, fds)
        except control.ProtocolError as e:
            self._reply_error(conn, "malformed request: %s" % e)
            return
        try:
            if req.command == "map" or req.command == "adopt":
                if conn.mapping is not None:
                    self._reply_error(conn, "this connection already has a mapping")
                else:
                    self._map(conn, req, adopt=req.command == "adopt")
            elif req.command == "remove":
                if conn.mapping is not None:
                    self._remove(conn.mapping, "stopped by its stub (pid %d)" % conn.pid)
                self._send(conn, b"removed\0")
            elif req.command == "status":
                self._status(conn)
            elif req.command == "log":
                self._new_log(conn, req)
            else:
                self._reply_error(conn, "unknown command %r" % req.command)
        finally:
            req.close_fds()

    def _new_log(self, conn: Conn, req: control.Request) -> None:
        """SIGHUP to a stub (logrotate): it opened its log file's path again,
        with its privileges, and the mapping logs to that file from now on."""
        fd = req.take("log")
        m = conn.mapping
        if m is None or fd is None:
            if fd is not None:
                os.close(fd)
            self._reply_error(conn, "log: needs this connection's mapping and a log descriptor")
            return
        if not m.log.use_fd(fd):
            self._reply_error(conn, "log: not a file")

    # -- mappings --------------------------------------------------------

    def _map(self, conn: Conn, req: control.Request, adopt: bool) -> None:
        status_fd = None if adopt else req.take("3")
        err_fd = req.take("2")
        config, code = _parse_flags(req.argv, req.fds.get("1"), err_fd)
        if config is None:
            # A flag error writes nothing on fd 3, as docker-proxy.
            for fd in (err_fd, status_fd):
                if fd is not None:
                    os.close(fd)
            self._send(conn, b"exit\0%d\0" % code)
            return
        log_fd = req.take("log")
        log = _mapping_logger(log_fd, err_fd, req.env)
        try:
            self._check_netns(req.take("netns"))
            options = load_settings(req.env, "engine")
        except StartupError as e:
            self._startup_failed(conn, status_fd, log, str(e))
            return
        proxy = new_proxy(config, options, log)
        try:
            lid, dup, port, fd = self._start_mapping(proxy, req, options, adopt)
        except StartupError as e:
            self._startup_failed(conn, status_fd, log, str(e))
            return
        mapping = Mapping(lid, proxy, conn, log, adopt, port, fd)
        conn.mapping = mapping
        self.mappings[lid] = mapping
        self._fastpath_add(mapping)
        self._transparent_add(mapping)
        self.idle_since = None
        _write_status(status_fd, b"0\n")
        try:
            self._send(conn, b"ok\0", [dup] if dup is not None else [])
        finally:
            if dup is not None:
                os.close(dup)

    def _check_netns(self, fd: int | None) -> None:
        """A mapping is served only in the network namespace of its stub (fd, its
        /proc/self/ns/net): bound and connected from anywhere else it would take
        another namespace's port and miss the route to the container."""
        if fd is None:
            raise StartupError("the proxy passed no network namespace (is its stub of "
                               "another spliceproxy version? reinstall)")
        try:
            theirs = control.netns_id(fd)
        except OSError as e:
            raise StartupError("the proxy's network namespace: %s"
                               % go_strerror(e.errno or errno.EBADF)) from None
        finally:
            os.close(fd)
        if theirs != self.netns:
            raise StartupError(
                "the spliceproxy engine at %s serves network namespace %s; this proxy runs "
                "in %s: unset SPLICEPROXY_ENGINE_SOCKET, and each namespace gets an "
                "engine of its own" % (self.sock_path, control.netns_name(self.netns),
                                        control.netns_name(theirs)))

    def _startup_failed(self, conn: Conn, status_fd: int | None, log: Logger, msg: str) -> None:
        """Exit code 1 and the text for the stub to write on dockerd's fd 3
        (or on a status fd a client passed), logged as standalone."""
        text = msg.encode("utf-8", "replace")
        _write_status(status_fd, b"1\n" + text)
        log.log(msg)
        log.close()
        # Well below the stub's reply buffer; NULs would end the field.
        self._send(conn, b"exit\0" + b"1\0" + text.replace(b"\0", b" ")[:900] + b"\0")

    def _start_mapping(self, proxy: Proxy, req: control.Request, options, adopt: bool):
        """Validate, open or adopt the listener, add it: (listener id, dup for the
        stub, bound port)."""
        engine = self.engine
        assert engine is not None
        proxy.validate()
        assert self.settings is not None
        differ = option_differences(self.settings, options)
        c = proxy.config
        sock_type = SOCK_STREAM if c.proto == "tcp" else SOCK_DGRAM
        if adopt:
            fd = req.take("listen")
            if fd is None:
                raise StartupError("adopt: no listener passed")
            fd = _adopt_socket(fd, sock_type, "listener")
            dup = None
        else:
            if c.use_listen_fd:
                fd = req.take("4")
                if fd is None:
                    raise StartupError("file file+net listen-sock: fcntl: bad file descriptor")
                fd = _adopt_socket(fd, sock_type, "listener fd")
            else:
                fd, step = _engine.open_listener(sock_type, c.host_family, c.host_addr,
                                                 c.host_port)
                if fd < 0:
                    where = proxy.listen_hostport
                    raise StartupError("failed to listen on %s: listen %s %s: %s: %s"
                                       % (where, proxy.net, where, step, go_strerror(-fd)))
            dup = os.dup(fd)
        port = _bound_port(fd, c.host_port)
        try:
            if c.proto == "tcp":
                lid = engine.add_tcp(fd, c.container_family, c.container_addr, c.container_port)
            else:
                lid = engine.add_udp(fd, c.host_family, c.container_family, c.container_addr,
                                     c.container_port)
        except OSError as e:
            if dup is not None:
                os.close(dup)
            raise StartupError("cannot serve %s: %s" % (proxy.front, go_strerror(e.errno))
                               ) from None
        # This mapping's own values wherever its listener can have them: the
        # engine says which (its protocol's list); the rest are the engine's
        # by nature (the busy-poll, say), and the log says which.  Before the
        # loop runs again, so no connection of this listener is accepted
        # with the engine's values.
        for name in sorted(differ):
            value = differ[name]
            if isinstance(value, str):
                value = getattr(_engine, value)  # a constant of the engine's
            try:
                engine.set_listener_option(lid, getattr(_engine, name), value)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    continue
                # settings.py and the engine disagree on what is valid.
                engine.remove(lid)
                if dup is not None:
                    os.close(dup)
                raise StartupError("cannot serve %s: %s=%r: %s"
                                   % (proxy.front, _OPTION_VARS[name], differ[name],
                                      go_strerror(e.errno))) from None
            del differ[name]
        wide = [_OPTION_VARS[k] for k in differ] + engine_wide_differences(self.settings,
                                                                            options)
        if wide:
            proxy.log.log("%s: the engine's settings apply (%s differ from this mapping's "
                          "environment)" % (proxy.front, ", ".join(sorted(wide))))
        return lid, dup, port, fd

    def _remove(self, mapping: Mapping, why: str) -> None:
        if self.mappings.pop(mapping.id, None) is None:
            return
        mapping.conn.mapping = None
        assert self.engine is not None
        self._fastpath_remove(mapping)
        self._transparent_remove(mapping)
        try:
            self.engine.remove(mapping.id)
        except OSError as e:
            self.log.log("removing %s: %s" % (mapping.proxy.front, go_strerror(e.errno)))
        mapping.log.log("Stopping proxy on %s for %s (%s)" % (mapping.proxy.front,
                                                             mapping.proxy.back, why))
        mapping.log.close()
        self._note_idle()

    def _engine_events(self, events) -> None:
        for kind, err, lid, count in events:
            if lid == -1 and kind in SHARED_EVENTS:
                self._shared_event(kind, err)
                continue
            mapping = self.mappings.get(lid)
            if mapping is None:
                continue
            if mapping.log.enabled:
                mapping.log.log(mapping.proxy.describe(kind, err, count))
                self._logged(mapping.log)
            if kind == _engine.EV_LISTENER_FAILED:
                # The engine dropped the listener; docker-proxy would exit 0.
                # Removing it frees what is left (its connections, the slot).
                self.mappings.pop(lid, None)
                self._fastpath_remove(mapping, listener_open=False)
                self._transparent_remove(mapping)
                with contextlib.suppress(OSError):
                    self.engine.remove(lid)
                mapping.conn.mapping = None
                self._send(mapping.conn, b"exit\0" + b"0\0")
                mapping.log.close()
                self._note_idle()

    def _shared_event(self, kind: int, err: int) -> None:
        """An event of a scan over every listener (no listener of its own):
        each mapping's log tells its own part, from its own counter, as a
        standalone proxy's log tells the whole."""
        name = SHARED_EVENTS[kind]
        per_listener = getattr(self.engine, "listener_stats", None)
        if per_listener is None:
            return
        for mapping in list(self.mappings.values()):
            try:
                now = per_listener(mapping.id)[name]
            except (OSError, KeyError):
                continue
            new = now - mapping.logged.get(name, 0)
            mapping.logged[name] = now
            if new > 0 and mapping.log.enabled:
                mapping.log.log(mapping.proxy.describe(kind, err, new))
                self._logged(mapping.log)

    # -- status ----------------------------------------------------------

    def status(self) -> dict:
        engine = self.engine
        assert engine is not None
        per_listener = getattr(engine, "listener_stats", None)
        fp_stats = {}
        if self.fastpath is not None:
            try:
                fp_stats = self.fastpath.stats()
            except OSError:
                fp_stats = {}
        maps = []
        for m in sorted(self.mappings.values(), key=lambda m: m.id):
            d = m.describe()
            st = fp_stats.get(m.fp_id) if m.fp_id is not None else None
            # Connects (UDP: connected sockets) and unconnected datagrams
            # that went straight to the container; None: not on the fast path.
            d["fastpath"] = None if st is None or not st["addresses"] and not any(
                (st["connections"], st["datagrams"])) else {
                    "connections": st["connections"], "datagrams": st["datagrams"],
                    "addresses": st["addresses"]}
            if per_listener is not None:
                try:
                    d["counters"] = per_listener(m.id)
                except OSError:
                    d["counters"] = None
            else:
                d["counters"] = None
            d["options"] = engine_options(engine, m.id)
            maps.append(d)
        return {
            "engine": {
                "pid": os.getpid(),
                "uid": os.geteuid(),
                "socket": self.sock_path,
                "netns": control.netns_name(self.netns),
                "uptime_s": round(time.monotonic() - self.started, 3),
                "mappings": len(maps),
                "counters": engine.stats(),
                "options": engine_options(engine),
                "fastpath": {"active": self.fastpath is not None,
                             "reason": self.fastpath_reason,
                             "cgroup": self.fastpath_cgroup},
                "transparent": {"on": self.tp_rules is not None,
                                "reason": self.tp_reason,
                                "firewall": self.tp_rules.tool if self.tp_rules else None,
                                "rules": bool(self.tp_rules and self.tp_rules.families),
                                "mappings": len(self.tp_mappings)},
                "metrics": self.metrics.describe() if self.metrics is not None else None,
            },
            "mappings": maps,
        }

    def _metrics_text(self) -> str:
        from spliceproxy import engine_status

        return engine_status.prometheus(self.status())

    def _status(self, conn: Conn) -> None:
        text = json.dumps(self.status(), separators=(",", ":")).encode()
        # One message per chunk, well below the socket's message size limit;
        # sent blocking (briefly: the client reads as fast as it can), since
        # a status of thousands of mappings is more than the socket buffers.
        chunk = 32768
        conn.sock.settimeout(SEND_TIMEOUT_S)
        try:
            for i in range(0, len(text), chunk):
                control.send(conn.sock, b"status\0" + text[i:i + chunk])
            control.send(conn.sock, b"end\0")
        except OSError:
            self._close_conn(conn, remove=True)
            return
        conn.sock.setblocking(False)


class _NoWaitText:
    """The text stream goflags writes usage and flag errors to (lost if the
    output does not take them at once)."""

    def __init__(self, out: NoWaitOutput):
        self.out = out
        self.buffer = self

    def write(self, data) -> int:
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        with contextlib.suppress(OSError):
            self.out.send(raw)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.out.fd)


def _mapping_logger(log_fd: int | None, err_fd: int | None, env: dict[str, str]) -> Logger:
    """The mapping's log: the file its stub opened, else the stub's stderr."""
    if log_fd is not None and err_fd is not None:
        os.close(err_fd)
    if log_fd is not None:
        return Logger.for_fd(log_fd, env.get("SPLICEPROXY_LOG_FILE", ""))
    return Logger.for_fd(err_fd)


def _bound_port(fd: int, default: int) -> int:
    s = socket.socket(fileno=fd)
    try:
        return s.getsockname()[1]
    except (OSError, IndexError):
        return default
    finally:
        s.detach()


def _adopt_socket(fd: int, sock_type: int, what: str) -> int:
    """Check a passed socket like the standalone proxy checks fd 4; returns fd (owned)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        os.close(fd)
        raise StartupError("file file+net listen-sock: fcntl: %s" % go_strerror(e.errno or 9)
                           ) from None
    try:
        if sock.type != sock_type or sock.family not in (AF_INET, AF_INET6):
            raise StartupError("unexpected socket type for %s: %s" % (
                what, "stream" if sock.type == SOCK_STREAM else
                "datagram" if sock.type == SOCK_DGRAM else "type %d" % sock.type))
        if sock_type == SOCK_DGRAM:
            # As the standalone proxy: dockerd before 29 bound it with
            # SO_REUSEADDR, which would let any local user bind the same
            # port and receive the clients' datagrams.
            try:
                sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 0)
            except OSError as e:
                raise StartupError("setsockopt on fd 4: %s" % go_strerror(e.errno)) from None
        if sock_type == SOCK_STREAM:
            try:
                sock.listen(_somaxconn())
            except OSError as e:
                raise StartupError("listen on fd 4: %s" % go_strerror(e.errno)) from None
    except BaseException:
        sock.close()
        raise
    return sock.detach()


# --------------------------------------------------------------------------
# Privileges: the capabilities the engine may keep (linux/capability.h).

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12


# --------------------------------------------------------------------------
# Privileges: the capabilities the engine may keep (linux/capability.h).

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12


# --------------------------------------------------------------------------
# `spliceproxy engine`

USAGE = """\
usage: spliceproxy engine [--socket PATH]

Run the host engine in the foreground: one process serving every port that
stubs (engine mode, the default) register on its control socket.  Stubs
start it by themselves when none runs; run it under a service manager to
keep it up.

  --socket PATH   control socket (default: SPLICEPROXY_ENGINE_SOCKET, else
                  engine-netns-<dev>-<inode>.sock of this network namespace
                  in SPLICEPROXY_ENGINE_DIR, /run/spliceproxy for root,
                  $XDG_RUNTIME_DIR/spliceproxy for a user)

An engine serves the proxies of its own network namespace only: each
namespace where dockerd runs gets an engine of its own.

SPLICEPROXY_ENGINE_IDLE_EXIT (default 5s; "never") is how long it stays up
without mappings.  Each mapping has the relay settings of its stub's
environment (SPLICEPROXY_*, unset ones their defaults); the busy-poll, the
user, the fast path and the metrics address are the engine's alone, from
its own environment.
"""


def _tell_ready(fd: int | None, text: str) -> None:
    """Answer the stub that started this engine ("ok", or why not)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, text.encode("utf-8", "replace")[:500])
    with contextlib.suppress(OSError):
        os.close(fd)


def _descriptor(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError("not a descriptor number")
    return int(text)


def main(argv: list[str]) -> int:
    args = control.parse_args(argv, "spliceproxy engine", USAGE,
                              values={"--ready-fd": _descriptor})
    if isinstance(args, int):
        return args
    sock_path = args["socket"]
    # Internal: the stub that started this engine waits on it.
    ready_fd = args.get("ready_fd")
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.set_inheritable(ready_fd, False)
    if sock_path is None:
        sock_path = control.resolve_socket()
    if not sock_path:
        msg = ("no control socket: set SPLICEPROXY_ENGINE_DIR, SPLICEPROXY_ENGINE_SOCKET "
               "or XDG_RUNTIME_DIR")
        _tell_ready(ready_fd, msg)
        sys.stderr.write("spliceproxy engine: %s\n" % msg)
        return 1
    sock_path = os.path.abspath(sock_path)
    log = _engine_logger()
    # Started from a stub, the working directory is dockerd's; hold no mount.
    with contextlib.suppress(OSError):
        os.chdir("/")
    try:
        _engine.set_process_name("spliceproxy-eng")
    except OSError:
        pass
    try:
        service = Service(sock_path, idle_exit_seconds(), log)
        service.setup()
    except (EngineError, OSError) as e:
        _tell_ready(ready_fd, str(e))
        msg = "spliceproxy engine: %s" % e
        log.log(msg)
        if not log.enabled or log.fd != 2:
            sys.stderr.write(msg + "\n")
        return 1
    _tell_ready(ready_fd, "ok\n")
    return service.run()


def _engine_logger() -> Logger:
    """The engine's own log: SPLICEPROXY_LOG_FILE of its environment, else stderr."""
    from spliceproxy import files

    try:
        path = settings.load().log_file
    except settings.SettingError:
        path = None
    if path:
        try:
            return Logger(path)
        except (OSError, files.FileRefused):
            pass
    return Logger()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))


__all__ = ["EngineError", "Mapping", "Service", "idle_exit_seconds", "main"]
