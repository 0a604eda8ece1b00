"""docker-proxy's command line, parsed the way Go's ``flag`` package does it.

dockerd runs the proxy as::

    <path> -proto tcp -host-ip 0.0.0.0 -host-port 8080 \\
           -container-ip 172.17.0.2 -container-port 80 [-use-listen-fd]

The flag set is the one of docker-proxy 28+ (``cmd/docker-proxy/main_linux.go``
in moby), and parsing follows ``flag.FlagSet.Parse`` with ``ExitOnError``:
the same accepted forms, the same error texts, the same usage text, and the
same exit codes (2 for a bad command line, 0 for ``-h``/``-help`` and for
``-v``/``-version``).

Only what Go checks while parsing flags is checked here. The protocol name and
port ranges are checked later by the caller, as docker-proxy does once the
flags are parsed.

This module is on the proxy's startup path, so it imports nothing but
``sys`` (the version string is imported only for ``-version``).
"""

from __future__ import annotations

import sys

from spliceproxy.settings import GO_FALSE, GO_TRUE

__all__ = [
    "AF_INET",
    "AF_INET6",
    "SUPPORTED_PROTOS",
    "ProxyConfig",
    "format_ip",
    "go_quote",
    "parse",
    "parse_go_int",
    "parse_ip",
    "usage_text",
    "version_text",
]

# Address family numbers on Linux; the socket module is not imported for them.
AF_INET = 2
AF_INET6 = 10

SUPPORTED_PROTOS = ("tcp", "udp", "sctp")

_V4_ZERO = b"\0\0\0\0"
_V4_IN_V6_PREFIX = b"\0" * 10 + b"\xff\xff"

# Flag kinds.
_STRING, _INT, _BOOL, _IP = range(4)

# name -> (kind, attribute, help). Help strings and defaults are docker-proxy's.
_FLAGS = {
    "container-ip": (_IP, "container", "container ip"),
    "container-port": (_INT, "container_port", "container port"),
    "host-ip": (_IP, "host", "host ip"),
    "host-port": (_INT, "host_port", "host port"),
    "proto": (_STRING, "proto", "proxy protocol"),
    "use-listen-fd": (_BOOL, "use_listen_fd", "use a supplied listen fd"),
    "v": (_BOOL, "print_version", "print version information and quit"),
    "version": (_BOOL, "print_version", "print version information and quit"),
}

# What Go's PrintDefaults shows after the help text: zero values are left out,
# strings are quoted, a TextVar shows its MarshalText form.
_DEFAULT_SHOWN = {
    "container-ip": " (default 0.0.0.0)",
    "container-port": " (default -1)",
    "host-ip": " (default 0.0.0.0)",
    "host-port": " (default -1)",
    "proto": ' (default "tcp")',
}

_TYPE_SHOWN = {_STRING: "string", _INT: "int", _BOOL: "", _IP: "value"}

_TRUE = frozenset(GO_TRUE)
_FALSE = frozenset(GO_FALSE)


class ProxyConfig:
    """The parsed command line.

    ``*_ip`` is the address as Go's ``net.IP.String()`` prints it, ``*_addr``
    the packed address (4 bytes for IPv4, 16 for IPv6) and ``*_family``
    AF_INET or AF_INET6. As in Go, an IPv4-mapped address (``::ffff:a.b.c.d``)
    counts as IPv4.

    An empty ``-host-ip``/``-container-ip`` value is accepted by Go and leaves
    a nil ``net.IP``; ``*_ip`` is then ``""``. docker-proxy listens on such a
    host address as ``tcp6``/``udp6`` (``::``, IPv6 only), and dials such a
    container address as IPv4 ``0.0.0.0``; the family and packed address are
    set to match.

    ``print_version`` is what ``-v``/``-version`` set; ``parse`` acts on it
    itself, so a returned config always has it false.
    """

    __slots__ = (
        "proto",
        "host_ip",
        "host_family",
        "host_addr",
        "host_port",
        "container_ip",
        "container_family",
        "container_addr",
        "container_port",
        "use_listen_fd",
        "print_version",
    )

    def __init__(self) -> None:
        self.proto = "tcp"
        self.host_ip = "0.0.0.0"
        self.host_family = AF_INET
        self.host_addr = _V4_ZERO
        self.host_port = -1
        self.container_ip = "0.0.0.0"
        self.container_family = AF_INET
        self.container_addr = _V4_ZERO
        self.container_port = -1
        self.use_listen_fd = False
        self.print_version = False

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__slots__
            if not name.endswith("_addr")
        )
        return f"ProxyConfig({fields})"

    def _set_ip(self, which: str, ip16: bytes | None) -> None:
        if ip16 is None:
            text = ""
            if which == "host":
                family, addr = AF_INET6, b"\0" * 16
            else:
                family, addr = AF_INET, _V4_ZERO
        elif ip16[:12] == _V4_IN_V6_PREFIX:
            family, addr = AF_INET, ip16[12:]
            text = format_ip(ip16)
        else:
            family, addr = AF_INET6, ip16
            text = format_ip(ip16)
        setattr(self, which + "_ip", text)
        setattr(self, which + "_family", family)
        setattr(self, which + "_addr", addr)


# ---------------------------------------------------------------------------
# IP addresses, as net.ParseIP (netip.ParseAddr without a zone) and IP.String.

_DEC = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")


def _parse_ipv4(s: str) -> bytes | None:
    parts = s.split(".")
    if len(parts) != 4:
        return None
    out = bytearray(4)
    for i, part in enumerate(parts):
        # 1-3 decimal digits, no leading zero (rejected since Go 1.17), <= 255.
        if not part or len(part) > 3 or not _DEC.issuperset(part):
            return None
        if len(part) > 1 and part[0] == "0":
            return None
        value = int(part)
        if value > 255:
            return None
        out[i] = value
    return bytes(out)


def _hex_groups(text: str, last: bool) -> list[int] | None:
    """Parse colon-separated 16-bit groups; the final one may be dotted IPv4."""
    if not text:
        return []
    groups: list[int] = []
    parts = text.split(":")
    for n, part in enumerate(parts):
        if last and n == len(parts) - 1 and "." in part:
            v4 = _parse_ipv4(part)
            if v4 is None:
                return None
            groups.append(v4[0] << 8 | v4[1])
            groups.append(v4[2] << 8 | v4[3])
        elif not part or len(part) > 4 or not _HEX.issuperset(part):
            return None
        else:
            groups.append(int(part, 16))
    return groups


def _parse_ipv6(s: str) -> bytes | None:
    halves = s.split("::")
    if len(halves) > 2:
        return None
    if len(halves) == 1:
        groups = _hex_groups(s, True)
        if groups is None or len(groups) != 8:
            return None
    else:
        head = _hex_groups(halves[0], False)
        tail = _hex_groups(halves[1], True)
        if head is None or tail is None:
            return None
        n = len(head) + len(tail)
        if n > 7:  # "::" must stand for at least one zero group
            return None
        groups = head + [0] * (8 - n) + tail
    out = bytearray(16)
    for i, g in enumerate(groups):
        out[2 * i] = g >> 8
        out[2 * i + 1] = g & 0xFF
    return bytes(out)


def parse_ip(s: str) -> bytes | None:
    """Return the 16-byte form of ``s`` like Go's ``net.ParseIP``, or None.

    Accepts dotted-decimal IPv4 without leading zeros and IPv6 (optionally
    ending in dotted IPv4); rejects zones, brackets and anything else.
    """
    # Like netip.ParseAddr, the first '.' or ':' decides the syntax. A zone
    # ("%eth0") is refused by net.ParseIP; '%' is valid in neither syntax.
    for c in s:
        if c == ".":
            v4 = _parse_ipv4(s)
            return None if v4 is None else _V4_IN_V6_PREFIX + v4
        if c == ":":
            return _parse_ipv6(s)
    return None


def format_ip(ip: bytes) -> str:
    """Text of a 4- or 16-byte address as Go's ``net.IP.String()`` gives it."""
    if len(ip) == 16 and ip[:12] == _V4_IN_V6_PREFIX:
        ip = ip[12:]
    if len(ip) == 4:
        return f"{ip[0]}.{ip[1]}.{ip[2]}.{ip[3]}"
    groups = [ip[i] << 8 | ip[i + 1] for i in range(0, 16, 2)]
    # Longest run of at least two zero groups, the first one on a tie.
    best_start, best_len = -1, 1
    i = 0
    while i < 8:
        if groups[i] == 0:
            j = i
            while j < 8 and groups[j] == 0:
                j += 1
            if j - i > best_len:
                best_start, best_len = i, j - i
            i = j
        else:
            i += 1
    if best_start < 0:
        return ":".join(f"{g:x}" for g in groups)
    left = ":".join(f"{g:x}" for g in groups[:best_start])
    right = ":".join(f"{g:x}" for g in groups[best_start + best_len :])
    return left + "::" + right


# ---------------------------------------------------------------------------
# Integers, as strconv.ParseInt(s, 0, 64).

_INT64_LIMIT = 1 << 63
_UINT64_MAX = (1 << 64) - 1


def _underscores_ok(s: str) -> bool:
    """Underscores only between digits, or between a base prefix and a digit."""
    if s[:1] in ("+", "-"):
        s = s[1:]
    last = "^"  # '^' start, '0' digit or prefix, '_' underscore, '!' other
    i = 0
    hex_digits = False
    if len(s) >= 2 and s[0] == "0" and s[1] in "bBoOxX":
        i = 2
        last = "0"
        hex_digits = s[1] in "xX"
    while i < len(s):
        c = s[i]
        i += 1
        if "0" <= c <= "9" or (hex_digits and c in "abcdefABCDEF"):
            last = "0"
        elif c == "_":
            if last != "0":
                return False
            last = "_"
        elif last == "_":
            return False
        else:
            last = "!"
    return last != "_"


def parse_go_int(s: str) -> tuple[int, str | None]:
    """Parse like ``strconv.ParseInt(s, 0, 64)``.

    Returns ``(value, None)`` or ``(0, reason)`` with the reason as the flag
    package words it: ``"parse error"`` or ``"value out of range"``.
    """
    if not s:
        return 0, "parse error"
    negative = False
    body = s
    if body[0] == "+":
        body = body[1:]
    elif body[0] == "-":
        negative = True
        body = body[1:]
    if not body:
        return 0, "parse error"
    digits = body
    base = 10
    if body[0] == "0":
        prefix = body[1:2]
        if len(body) >= 3 and prefix in ("b", "B"):
            base, digits = 2, body[2:]
        elif len(body) >= 3 and prefix in ("o", "O"):
            base, digits = 8, body[2:]
        elif len(body) >= 3 and prefix in ("x", "X"):
            base, digits = 16, body[2:]
        else:
            base, digits = 8, body[1:]
    n = 0
    seen_underscore = False
    for c in digits:
        if c == "_":
            seen_underscore = True
            continue
        o = ord(c)
        if 48 <= o <= 57:
            d = o - 48
        elif 97 <= (o | 0x20) <= 122:
            d = (o | 0x20) - 87
        else:
            return 0, "parse error"
        if d >= base:
            return 0, "parse error"
        n = n * base + d
        # Go stops at the first digit that overflows uint64, before looking
        # at anything further along the string.
        if n > _UINT64_MAX:
            return 0, "value out of range"
    if seen_underscore and not _underscores_ok(body):
        return 0, "parse error"
    if negative:
        if n > _INT64_LIMIT:
            return 0, "value out of range"
        return -n, None
    if n >= _INT64_LIMIT:
        return 0, "value out of range"
    return n, None


# ---------------------------------------------------------------------------
# Messages.


def go_quote(s: str) -> str:
    """``strconv.Quote`` of the bytes ``s`` came from.

    Undecodable argv bytes reach Python as lone surrogates (surrogateescape);
    Go prints each such byte as ``\\xNN``.
    """
    out = ['"']
    for c in s:
        o = ord(c)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


_C_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def usage_text(prog: str) -> str:
    """What Go's default ``flag.Usage`` prints for docker-proxy's flags."""
    lines = [f"Usage of {prog}:\n"]
    for name in sorted(_FLAGS):
        kind, _attr, help_text = _FLAGS[name]
        head = "  -" + name
        if _TYPE_SHOWN[kind]:
            head += " " + _TYPE_SHOWN[kind]
        # Go keeps the help on the same line only for one-letter bool flags.
        head += "\t" if len(head) <= 4 else "\n    \t"
        lines.append(head + help_text + _DEFAULT_SHOWN.get(name, "") + "\n")
    return "".join(lines)


def version_text() -> str:
    from spliceproxy._version import __version__

    return f"spliceproxy (docker-proxy compatible) version {__version__}\n"


def _write(stream, text: str) -> None:
    """Write ``text`` giving back argv's original bytes, like Go would."""
    if stream is None:
        return
    try:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                stream.flush()
                buffer.write(text.encode("utf-8", "surrogateescape"))
                buffer.flush()
                return
            text = text.encode("utf-8", "backslashreplace").decode("ascii", "replace")
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, UnicodeError):
        pass  # stderr closed or gone: the exit code still tells


def _fail(prog: str, message: str) -> SystemExit:
    _write(sys.stderr, message + "\n" + usage_text(prog))
    return SystemExit(2)


# ---------------------------------------------------------------------------


def parse(argv: list[str], footer: str = "") -> ProxyConfig:
    """Parse ``argv`` (``argv[0]`` is the program) like docker-proxy.

    Exits through ``SystemExit`` where docker-proxy exits: 2 after a flag
    error (message and usage on stderr), 0 after ``-h``/``-help`` (usage on
    stderr, then ``footer``) and 0 after ``-v``/``-version`` (version line
    on stdout).
    """
    prog = argv[0] if argv else ""
    args = argv[1:]
    config = ProxyConfig()
    i = 0
    while i < len(args):
        arg = args[i]
        if len(arg) < 2 or arg[0] != "-":
            break  # first non-flag argument ("-" is one) ends the flags
        if arg[1] == "-":
            if len(arg) == 2:
                break  # "--" ends the flags
            name = arg[2:]
        else:
            name = arg[1:]
        if name[0] in "-=":
            raise _fail(prog, f"bad flag syntax: {arg}")
        i += 1
        eq = name.find("=", 1)
        if eq > 0:
            value: str | None = name[eq + 1 :]
            name = name[:eq]
        else:
            value = None
        flag = _FLAGS.get(name)
        if flag is None:
            if name in ("h", "help"):
                _write(sys.stderr, usage_text(prog) + footer)
                raise SystemExit(0)
            raise _fail(prog, f"flag provided but not defined: -{name}")
        kind, attr, _help = flag
        if kind == _BOOL:
            if value is None or value in _TRUE:
                setattr(config, attr, True)
            elif value in _FALSE:
                setattr(config, attr, False)
            else:
                raise _fail(
                    prog, f"invalid boolean value {go_quote(value)} for -{name}: parse error"
                )
            continue
        if value is None:
            if i >= len(args):
                raise _fail(prog, f"flag needs an argument: -{name}")
            value = args[i]
            i += 1
        if kind == _STRING:
            setattr(config, attr, value)
        elif kind == _INT:
            number, err = parse_go_int(value)
            if err is not None:
                raise _fail(prog, f"invalid value {go_quote(value)} for flag -{name}: {err}")
            setattr(config, attr, number)
        else:
            if value:
                ip16 = parse_ip(value)
                if ip16 is None:
                    raise _fail(
                        prog,
                        f"invalid value {go_quote(value)} for flag -{name}: "
                        f"invalid IP address: {value}",
                    )
            else:
                ip16 = None  # net.IP.UnmarshalText: empty text is a nil IP
            config._set_ip(attr, ip16)
    if config.print_version:
        _write(sys.stdout, version_text())
        raise SystemExit(0)
    return config
