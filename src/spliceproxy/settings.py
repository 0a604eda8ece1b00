"""Every SPLICEPROXY_* environment variable, parsed and validated once.

dockerd gives each proxy its own environment, so these are the proxy's
settings.  ``load()`` reads all of them before any socket or file is opened
and returns one immutable ``Settings``; a bad value is a ``SettingError``
whose text main reports on the status pipe (``1\\n<message>``, exit 1).

The rules are strict on purpose: a setting that is misread fails open (a
"no" that keeps root, an Arabic-Indic zero that becomes uid 0).  So:

* booleans are exactly Go's ``strconv.ParseBool`` values, nothing else;
* numbers are ASCII digits only (``str.isdigit()`` and ``int()`` accept
  "²" and "٠", which is why neither is used on raw text here);
* values are read as bytes and must be UTF-8; a path must be UTF-8 too.

Adding a variable is one line in ``VARIABLES`` (a default of None leaves
the engine's own default in force).  A variable with an engine
option is applied to the engine by the mapping (``Settings.engine_options``).

This module is on the startup path: it imports nothing but ``os``.
"""

from __future__ import annotations

import os

__all__ = ["ENV_PREFIX", "SettingError", "Settings", "VARIABLES", "load", "parse_duration"]

ENV_PREFIX = "SPLICEPROXY_"


class SettingError(Exception):
    """An invalid SPLICEPROXY_* value (reported on fd 3, exit 1); mode_refused:
    a valid one set in a mode where it would do nothing."""

    def __init__(self, msg: str, mode_refused: bool = False):
        super().__init__(msg)
        self.mode_refused = mode_refused


# --------------------------------------------------------------------------
# Value parsers: text -> value, ValueError(reason) on a bad value.

# Go's strconv.ParseBool words: the one Python copy (goflags and control use
# it; the stub's go_true() is C, held to the same table by
# tests/integration/test_rules_c_python.py).
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_DIGITS = "0123456789"


def _ascii_digits(s: str) -> bool:
    return bool(s) and all(c in _DIGITS for c in s)


def boolean(text: str) -> bool:
    """Go's strconv.ParseBool, exactly."""
    if text in GO_TRUE:
        return True
    if text in GO_FALSE:
        return False
    raise ValueError("not a boolean: use one of %s" % ", ".join(GO_TRUE + GO_FALSE))


def integer(lo: int, hi: int):
    """A decimal number of ASCII digits between lo and hi."""

    def parse(text: str) -> int:
        if not _ascii_digits(text):
            raise ValueError("not a number (ASCII digits 0-9 only)")
        value = int(text, 10)
        if not lo <= value <= hi:
            raise ValueError("must be between %d and %d" % (lo, hi))
        return value

    return parse


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0}


def _decimal(s: str) -> float | None:
    """An ASCII decimal ("90", "2.5", ".5", "1.") as a float, or None."""
    whole, dot, frac = s.partition(".")
    if not whole and not frac:
        return None
    if (whole and not _ascii_digits(whole)) or (frac and not _ascii_digits(frac)):
        return None
    return float((whole or "0") + "." + (frac or "0")) if dot else float(whole)


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("90s", "1m30s", "250ms") or a plain number of seconds.

    Only ASCII digits count, no sign, no exponent, no "inf"/"nan"."""
    plain = _decimal(text)
    if plain is not None:
        return plain
    if not text:
        raise ValueError("empty duration")
    total = 0.0
    i = 0
    n = len(text)
    while i < n:
        j = i
        while j < n and (text[j] in _DIGITS or text[j] == "."):
            j += 1
        number = _decimal(text[i:j])
        if number is None:
            raise ValueError("invalid duration %r" % text)
        k = j
        while k < n and not (text[k] in _DIGITS or text[k] == "."):
            k += 1
        unit = text[j:k]
        if unit not in _DURATION_UNITS:
            raise ValueError("unknown unit %r in duration %r" % (unit, text))
        total += number * _DURATION_UNITS[unit]
        i = k
    return total


def _bounded_duration(per_second: float, lo: int, hi: int, lo_text: str, hi_text: str):
    """A duration (see parse_duration) in whole 1/per_second seconds between lo and
    hi; out of range, an error naming the bound as lo_text or hi_text."""

    def parse(text: str) -> int:
        n = int(round(parse_duration(text) * per_second))
        if n < lo:
            raise ValueError("must be at least " + lo_text)
        if n > hi:
            raise ValueError("must be at most " + hi_text)
        return n

    return parse


def duration_ms(lo_ms: int, hi_ms: int):
    """A duration (see parse_duration) in whole milliseconds between lo_ms and hi_ms."""
    return _bounded_duration(1000, lo_ms, hi_ms, "%dms" % lo_ms, "%ds" % (hi_ms // 1000))


def duration_us(lo_us: int, hi_us: int):
    """A duration (see parse_duration) in whole microseconds between lo_us and hi_us."""
    return _bounded_duration(1e6, lo_us, hi_us, "%dus" % lo_us, "%dus" % hi_us)


def choice(**values):
    """One of the given words; the value is what the word maps to."""

    def parse(text: str):
        if text not in values:
            raise ValueError("use %s" % " or ".join(values))
        return values[text]

    return parse


def path(text: str) -> str:
    """A file name (UTF-8 is checked for every value)."""
    return text


def cgroup2_dir(text: str) -> str:
    """An absolute path to a cgroup v2 directory (one with cgroup.controllers,
    which only cgroup v2 has): the programs attach there, so a typo must not
    leave the fast path silently attached nowhere, or somewhere else."""
    if not text.startswith("/"):
        raise ValueError("not an absolute path")
    if not os.path.isdir(text):
        raise ValueError("not a directory")
    if not os.path.exists(os.path.join(text, "cgroup.controllers")):
        raise ValueError("not a cgroup v2 directory (no cgroup.controllers)")
    return text


_UID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to setresuid


def user(text: str) -> str | int:
    """A user name, or a numeric uid of ASCII digits (returned as int).

    Anything else that is not a plausible name ("²", "٠", "1 2") is refused
    here rather than looked up: a lookup of a digit-like name must never be
    mistaken for a uid."""
    if _ascii_digits(text):
        uid = int(text, 10)
        if uid > _UID_MAX:
            raise ValueError("uid out of range")
        return uid
    if text[:1] in _DIGITS or text[:1] in "-+" or any(
            c in ":/," or c.isspace() or not c.isprintable() or (not c.isascii() and c.isdigit())
            for c in text):
        raise ValueError("neither a user name nor a uid (ASCII digits)")
    return text


_SUN_PATH_MAX = 107  # sockaddr_un's 108 bytes, one for the terminating NUL


def metrics_address(text: str) -> tuple:
    """Where the engine serves /metrics: ``host:port`` with an IPv4 address,
    ``[v6]:port``, or ``unix:/absolute/path``.

    Returns ("unix", path) or (family, address, port) with family "tcp4" or
    "tcp6" and the address as written.  Literal addresses only: a name
    would need a DNS lookup before fd 3 is answered."""
    if text.startswith("unix:"):
        where = text[len("unix:"):]
        if not where.startswith("/"):
            raise ValueError("unix: needs an absolute path (unix:/run/spliceproxy/metrics.sock)")
        if where.endswith("/") or where.rsplit("/", 1)[1] in (".", ".."):
            raise ValueError("unix: the path must name a socket file, not a directory")
        if len(where.encode("utf-8")) > _SUN_PATH_MAX:
            raise ValueError("unix: the path is longer than %d bytes" % _SUN_PATH_MAX)
        return ("unix", where)
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError("use host:port (an IPv4 address), [v6]:port or unix:/path")
    if not _ascii_digits(port) or not 1 <= int(port, 10) <= 65535:
        raise ValueError("port must be a number between 1 and 65535")
    import socket  # only when the variable is set: off the common start-up path

    if host.startswith("[") and host.endswith("]"):
        family, kind, host = socket.AF_INET6, "tcp6", host[1:-1]
    else:
        family, kind = socket.AF_INET, "tcp4"
    try:
        socket.inet_pton(family, host)
    except (OSError, ValueError):
        raise ValueError("%r is not an IP%s address (IPv6 in brackets: [::1]:9465)"
                         % (host, "v4" if kind == "tcp4" else "v6")) from None
    return (kind, host, int(port, 10))


# --------------------------------------------------------------------------
# The variables.  Empty counts as unset (dockerd's environment may carry
# "VAR=" to mean "not set").


MODES = ("standalone", "engine")


class Var:
    __slots__ = ("name", "parse", "default", "option", "help", "shown", "modes", "instead",
                 "doc", "doc_default")

    def __init__(self, name: str, parse, default, option: str | None = None, help: str = "",
                 shown: str = "", modes: tuple[str, ...] = MODES, instead: str = "",
                 doc: str = "", doc_default: str = ""):
        self.name = name          # without the SPLICEPROXY_ prefix
        self.parse = parse        # text -> value, ValueError(reason)
        self.default = default    # the value when unset or empty
        self.option = option      # engine option (an _engine.OPT_* name) it sets, if any
        self.help = help          # its meaning, for `spliceproxy help` (helptext)
        self.shown = shown        # the default as `spliceproxy help` shows it
        self.modes = modes        # where it works; set elsewhere, the start is refused
        self.instead = instead    # what to use there instead (the refusal says it)
        # The manual's row (docs/configuration.md, made by spliceproxy.manual):
        # its meaning in Markdown (links relative to docs/), else help; its
        # default, else shown as code.
        self.doc = doc
        self.doc_default = doc_default

    @property
    def attr(self) -> str:
        return self.name.lower()


_YEAR_MS = 365 * 86400 * 1000

VARIABLES = (
    # Read by the stub (csrc/stub/stub.c, engine_wanted()) before anything
    # else; here so that a value that is no Go boolean fails the start-up
    # like every other bad setting (the stub hands such a command line to
    # the standalone front end, which reports it), and so that the help
    # lists it with the others.
    Var("ENGINE", boolean, True, shown="true",
        help="false (0, f, false, ...) serves each port in its own process, standalone; "
             "otherwise one host engine serves every port and each proxy is a small stub "
             "(docs/engine-mode.md); with no control socket possible the port is served "
             "standalone and a log line says why",
        doc="a Go false (`0`, `false`, ...) serves each port in its own process, standalone; "
            "otherwise one host engine serves every port, see [Engine mode](engine-mode.md); "
            "anything but a Go boolean is a startup error"),
    Var("LOG_FILE", path, None, shown="stderr",
        help="append log lines (docker-proxy's format) to this file; dockerd discards "
             "stderr; SIGHUP reopens it",
        doc="append log lines (docker-proxy's format) to this regular file (see "
            "[Files](#files-the-proxy-writes)); SIGHUP reopens it",
        doc_default="stderr"),
    Var("STATS_FILE", path, None, shown="none", modes=("standalone",),
        instead="in engine mode (the default) `spliceproxy status --json` (or --prometheus) "
                "has every mapping's counters; SPLICEPROXY_ENGINE=0 serves each port in its "
                "own process, with this file",
        help="standalone mode: write copies of the engine's counters to this file, readable "
             "while the proxy runs; a directory or a path with %p gives each proxy its own "
             "file (engine mode refuses it: `spliceproxy status` has the counters)",
        doc="standalone mode only: write copies of the engine's counters to this file, "
            "readable while it runs (`spliceproxy.stats.read_stats_file`); a directory or a "
            "path with `%p` gives each proxy its own file; see "
            "[Counters file](#counters-file); engine mode refuses it at start-up "
            "(`spliceproxy status` has every mapping's counters)",
        doc_default="none"),
    Var("UDP_TIMEOUT", duration_ms(1, _YEAR_MS), 90_000, "OPT_UDP_TIMEOUT_MS", shown="90s",
        help="UDP client entry expiry (Go duration or seconds)",
        doc="UDP client entry expiry (Go duration or seconds); an entry lives while either "
            "side sends"),
    Var("UDP_MAX_FLOWS", integer(1, 1 << 24), 16384, "OPT_UDP_MAX_FLOWS", shown="16384",
        help="UDP client entries per port; beyond it one of the least recently used is "
             "evicted",
        doc="UDP client entries per port; beyond it an entry is evicted: of the least "
            "recently used few, one of the client address holding the most entries"),
    Var("UDP_MAX_FLOWS_PER_ADDR", integer(0, 1 << 24), 0, "OPT_UDP_MAX_FLOWS_PER_ADDR",
        shown="a 16th of SPLICEPROXY_UDP_MAX_FLOWS",
        help="UDP client entries one client address (any port) may hold; beyond it the "
             "address's own least recently used entry is replaced; 0 = the default",
        doc="UDP entries one client address (any port) may hold; a new entry of an address "
            "at its bound replaces that address's own least recently used one, never another "
            "address's, so a flood of source ports cannot push established clients to new "
            "backend ports. IPv6 addresses count whole (not by /64). `0` = the default",
        doc_default="a 16th of `SPLICEPROXY_UDP_MAX_FLOWS` (1024)"),
    # Half-closed pairs are reclaimed after two minutes by default, as
    # conntrack forgets a CLOSE_WAIT entry; 0 = never.
    Var("IDLE_TIMEOUT", duration_ms(0, _YEAR_MS), 120_000, "OPT_IDLE_TIMEOUT_MS", shown="2m",
        help="reset half-closed TCP pairs that saw no traffic for this long; 0 = never",
        doc="reset half-closed TCP pairs that saw no traffic for this long (Go duration or "
            "seconds; conntrack forgets such a pair after about as long); `0` = never"),
    Var("CONNECT_TIMEOUT", duration_ms(0, _YEAR_MS), 30_000, "OPT_CONNECT_TIMEOUT_MS",
        shown="30s",
        help="give up a backend connect not completed after this long; 0 = the kernel's own "
             "limit (about two minutes)",
        doc="give up a backend connect that has not completed after this long (the client's "
            "connection is closed, as for a refused connect); `0` = the kernel's own limit "
            "(about two minutes)"),
    Var("PIPE_SIZE", integer(4096, 1 << 30), 1 << 20, "OPT_PIPE_SIZE", shown="1048576",
        help="bytes per relay pipe (capped by /proc/sys/fs/pipe-max-size)",
        doc="bytes per relay pipe (capped by `/proc/sys/fs/pipe-max-size`); when the kernel "
            "refuses the size (the user is over `/proc/sys/fs/pipe-user-pages-soft`), pipes "
            "stay at 64 KiB and the size is asked for again a second later, or as soon as "
            "the proxy closes a pipe, so it recovers with the budget (`pipe_resize_denied` "
            "counts refusals)"),
    Var("COPY_MODE", choice(splice="COPY_SPLICE", readwrite="COPY_READWRITE"), "COPY_SPLICE",
        "OPT_COPY_MODE", shown="splice",
        help="readwrite copies through user space instead (slower, for comparisons)",
        doc="`readwrite` copies through user space instead: a deliberately slower mode for "
            "comparisons and for proving the benchmark gate"),
    Var("COPY_BUF", integer(1, 64 << 20), 65536, "OPT_COPY_BUF", shown="65536",
        help="buffer bytes per direction in readwrite mode",
        doc="buffer bytes per direction in `readwrite` mode"),
    # Off by default: measured in the benchmark (spliceproxy-spin path), see
    # docs/benchmarking.md, "Busy-poll".
    Var("SPIN", duration_us(0, 10_000), 0, "OPT_SPIN_US", shown="0 (off)",
        help="after a wake-up that relayed bytes, keep polling without sleeping for this "
             "long (Go duration, e.g. 50us; at most 10ms): lower request/response latency "
             "for more CPU; 0 = off",
        doc="after a wake-up that relayed bytes, keep polling (`epoll_wait` with a zero "
            "timeout) for this long before sleeping, a Go duration such as `50us` (at most "
            "`10ms`); clock-bounded, so an idle proxy sleeps again that long after its last "
            "byte. Measured on this project's machines it does not pay, see "
            "[Busy-poll](benchmarking.md#busy-poll-spliceproxy_spin-measured-off-by-default); "
            "`spin_polls` and `spin_hits` in the counters file count its polls and those "
            "that found work",
        doc_default="`0` (off)"),
    Var("USER", user, None, shown="a uid of its own",
        help="user (name or uid) a proxy started as root becomes once its sockets are set up",
        doc="user (name or uid) a proxy started as root becomes once its sockets are set up; "
            "see [Least privilege](behaviour.md#least-privilege)",
        doc_default="a uid of its own"),
    Var("KEEP_PRIVILEGES", boolean, False, shown="false",
        help="true keeps root: no privilege drop",
        doc="`true` keeps root: no privilege drop"),
    Var("FASTPATH", boolean, False, shown="false",
        help="true lets host-local clients skip the relay through the kernel; in engine "
        "mode only (the host engine loads the programs), a standalone proxy logs that it "
        "is not active",
        doc="`true` lets host-local clients skip the relay through the kernel, in "
            "[engine mode](engine-mode.md) (the host engine loads the programs; a standalone "
            "proxy logs that it is not active); see [Kernel fast path](fast-path.md)"),
    Var("TRANSPARENT", boolean, False, shown="false", modes=("engine",),
        instead="the policy route that brings replies back belongs to the host engine; "
                "unset SPLICEPROXY_ENGINE (engine mode is the default) or "
                "SPLICEPROXY_TRANSPARENT",
        help="true relays TCP and UDP to containers from the client's own address and port "
             "(IP_TRANSPARENT and a policy route in the engine's namespace; engine mode only, "
             "a standalone proxy refuses to start); clients whose address cannot be kept are "
             "relayed as without it (docs/transparent.md)",
        doc="`true` relays TCP and UDP to containers from the client's own address and port "
            "(IP_TRANSPARENT and a policy route in the engine's namespace), in engine mode "
            "only (a standalone proxy refuses to start); clients whose address cannot be kept "
            "are relayed as without it; see [Transparent relay](transparent.md)"),
    # For tests and special setups: the programs affect every process below
    # the cgroup they are attached to, the whole host by default.
    Var("FASTPATH_CGROUP", cgroup2_dir, None, shown="the cgroup v2 root",
        help="cgroup v2 directory the host engine attaches the fast path to (only processes "
             "in it and below are rewritten); for tests and special setups",
        doc="the cgroup v2 directory the host engine attaches the fast path to: only "
            "processes in it and below it are rewritten. For tests and special setups; an "
            "absolute path to a cgroup v2 directory (one with `cgroup.controllers`), anything "
            "else is a startup error",
        doc_default="the cgroup v2 root (`/sys/fs/cgroup/unified` where cgroup v2 is mounted "
                    "there, else `/sys/fs/cgroup`)"),
    # Engine-wide: the engine's own environment (its first stub's) decides.
    Var("METRICS_ADDR", metrics_address, None, shown="off", modes=("engine",),
        instead="a standalone proxy serves one port per process and has no endpoint; leave "
                "SPLICEPROXY_ENGINE unset (engine mode is the default) for the host engine to "
                "serve /metrics, or read each proxy's counters with SPLICEPROXY_STATS_FILE",
        help="the host engine serves GET /metrics (Prometheus text format) on this address: "
             "127.0.0.1:9465, [::1]:9465 or unix:/path (docs/metrics.md); unauthenticated; "
             "in engine mode only",
        doc="the host engine serves `GET /metrics` (Prometheus text format) on "
            "`127.0.0.1:PORT`, `[::1]:PORT` or `unix:/path`, unauthenticated; engine mode "
            "only (the engine's own environment decides, standalone refuses it); see "
            "[Metrics](metrics.md)",
        doc_default="off"),
)


class Settings:
    """The parsed settings, one attribute per variable (``settings.udp_timeout``)."""

    __slots__ = tuple(v.attr for v in VARIABLES)

    def __init__(self, **values) -> None:
        for v in VARIABLES:
            object.__setattr__(self, v.attr, values.get(v.attr, v.default))

    def __setattr__(self, name, value):
        raise AttributeError("Settings are immutable")

    def __delattr__(self, name):
        raise AttributeError("Settings are immutable")

    def engine_options(self) -> list[tuple[str, object]]:
        """(option name, value) for every variable the engine takes; a str
        value names an _engine constant (e.g. "COPY_SPLICE").  A default of
        None leaves the engine's own default."""
        return [(v.option, getattr(self, v.attr)) for v in VARIABLES
                if v.option and getattr(self, v.attr) is not None]

    def __repr__(self) -> str:
        return "Settings(%s)" % ", ".join("%s=%r" % (v.attr, getattr(self, v.attr))
                                          for v in VARIABLES)


def _show(raw: bytes) -> str:
    """A value for a message: as given if UTF-8, else escaped bytes."""
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)[1:]


def load(environ: dict[bytes, bytes] | None = None, mode: str | None = None) -> Settings:
    """Parse every SPLICEPROXY_* variable (from os.environb by default).

    With a mode (one of MODES), a variable set that does not work in it is a
    SettingError saying what to use instead: nothing set is silently ignored.
    """
    env = os.environb if environ is None else environ
    values = {}
    for v in VARIABLES:
        key = (ENV_PREFIX + v.name).encode()
        raw = env.get(key)
        if raw is None or raw == b"":
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SettingError("invalid %s%s=%s: not valid UTF-8"
                               % (ENV_PREFIX, v.name, _show(raw))) from None
        try:
            values[v.attr] = v.parse(text)
        except ValueError as e:
            raise SettingError("invalid %s%s=%s: %s"
                               % (ENV_PREFIX, v.name, _show(raw), e)) from None
        if mode is not None and mode not in v.modes:
            raise SettingError("%s%s works in %s mode only: %s"
                               % (ENV_PREFIX, v.name, " and ".join(v.modes), v.instead),
                               mode_refused=True)
    return Settings(**values)
