"""docker-proxy's command line: Go ``flag`` semantics, messages, usage and exit codes."""

from __future__ import annotations

import io
import ipaddress
import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spliceproxy import goflags
from spliceproxy._version import __version__

# Fast by default; HYPOTHESIS_PROFILE=long for a thorough run.
_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
_EXAMPLES = 5000 if _LONG else 200
fuzz = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

PROG = "/usr/bin/docker-proxy"

# Go's PrintDefaults output for docker-proxy 28+'s flag set, written out by hand.
USAGE = (
    "Usage of /usr/bin/docker-proxy:\n"
    "  -container-ip value\n"
    "    \tcontainer ip (default 0.0.0.0)\n"
    "  -container-port int\n"
    "    \tcontainer port (default -1)\n"
    "  -host-ip value\n"
    "    \thost ip (default 0.0.0.0)\n"
    "  -host-port int\n"
    "    \thost port (default -1)\n"
    "  -proto string\n"
    '    \tproxy protocol (default "tcp")\n'
    "  -use-listen-fd\n"
    "    \tuse a supplied listen fd\n"
    "  -v\tprint version information and quit\n"
    "  -version\n"
    "    \tprint version information and quit\n"
)

VERSION_LINE = f"spliceproxy (docker-proxy compatible) version {__version__}\n"


def parse(*args: str) -> goflags.ProxyConfig:
    return goflags.parse([PROG, *args])


def exits(capsys, *args: str) -> tuple[int, str, str]:
    """Run parse expecting an exit; return (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        parse(*args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_flag_error(capsys, args, message):
    code, out, err = exits(capsys, *args)
    assert code == 2
    assert out == ""
    assert err == message + "\n" + USAGE


# --------------------------------------------------------------------------- basics


def test_defaults():
    c = parse()
    assert c.proto == "tcp"
    assert (c.host_ip, c.host_family, c.host_addr, c.host_port) == ("0.0.0.0", 2, bytes(4), -1)
    assert (c.container_ip, c.container_family, c.container_addr) == ("0.0.0.0", 2, bytes(4))
    assert c.container_port == -1
    assert c.use_listen_fd is False


def test_dockerd_argv_ipv4():
    c = parse(
        "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "8080",
        "-container-ip", "172.17.0.2", "-container-port", "80", "-use-listen-fd",
    )  # fmt: skip
    assert c.proto == "tcp"
    assert (c.host_ip, c.host_family, c.host_addr, c.host_port) == ("0.0.0.0", 2, bytes(4), 8080)
    assert (c.container_ip, c.container_family) == ("172.17.0.2", 2)
    assert c.container_addr == bytes([172, 17, 0, 2])
    assert c.container_port == 80
    assert c.use_listen_fd is True


def test_dockerd_argv_ipv6():
    c = parse(
        "-proto", "udp", "-host-ip", "::", "-host-port", "53",
        "-container-ip", "fd00::2", "-container-port", "5353",
    )  # fmt: skip
    assert c.proto == "udp"
    assert (c.host_ip, c.host_family, c.host_addr) == ("::", 10, bytes(16))
    assert (c.container_ip, c.container_family) == ("fd00::2", 10)
    assert c.container_addr == bytes([0xFD] + [0] * 14 + [2])
    assert (c.host_port, c.container_port) == (53, 5353)
    assert c.use_listen_fd is False


def test_supported_protos():
    assert goflags.SUPPORTED_PROTOS == ("tcp", "udp", "sctp")


def test_proto_not_checked_at_parse_time():
    # docker-proxy rejects it later ("unsupported protocol"), not as a flag error.
    assert parse("-proto", "icmp").proto == "icmp"
    assert parse("-proto=").proto == ""


def test_ports_not_range_checked_at_parse_time():
    c = parse("-host-port", "70000", "-container-port", "-5")
    assert (c.host_port, c.container_port) == (70000, -5)


@pytest.mark.parametrize(
    "args",
    [
        ["-host-port", "9"],
        ["-host-port=9"],
        ["--host-port", "9"],
        ["--host-port=9"],
    ],
)
def test_value_forms(args):
    assert parse(*args).host_port == 9


@pytest.mark.parametrize("dash", ["-", "--"])
def test_string_and_ip_forms(dash):
    c = parse(dash + "proto=sctp", dash + "container-ip", "::1", dash + "host-ip=127.0.0.2")
    assert (c.proto, c.container_ip, c.host_ip) == ("sctp", "::1", "127.0.0.2")


def test_value_may_look_like_a_flag():
    # A non-bool flag takes the next argument whatever it is.
    assert parse("-proto", "-host-port").proto == "-host-port"
    assert parse("-proto", "--").proto == "--"
    c = parse("-proto", "-use-listen-fd", "-host-port", "1")
    assert (c.proto, c.use_listen_fd, c.host_port) == ("-use-listen-fd", False, 1)


def test_equals_splits_at_first_equals():
    assert parse("-proto=a=b").proto == "a=b"
    assert parse("--proto==").proto == "="


def test_repeated_flags_last_wins():
    c = parse("-host-port", "1", "-host-port=2", "--host-port", "3", "-host-ip", "::1",
              "-host-ip", "10.0.0.1", "-use-listen-fd", "-use-listen-fd=false")  # fmt: skip
    assert (c.host_port, c.host_ip, c.host_family, c.use_listen_fd) == (3, "10.0.0.1", 2, False)


# --------------------------------------------------------------------------- bool flags


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_bool_true_values(value):
    assert parse("-use-listen-fd=" + value).use_listen_fd is True
    assert parse("--use-listen-fd=" + value).use_listen_fd is True


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_bool_false_values(value):
    assert parse("-use-listen-fd", "-use-listen-fd=" + value).use_listen_fd is False


@pytest.mark.parametrize("args", [["-use-listen-fd"], ["--use-listen-fd"]])
def test_bool_bare(args):
    assert parse(*args).use_listen_fd is True


def test_bool_does_not_take_next_argument():
    # "true" is a non-flag argument: parsing stops there.
    c = parse("-use-listen-fd", "false", "-host-port", "5")
    assert c.use_listen_fd is True
    assert c.host_port == -1


@pytest.mark.parametrize("value", ["", "yes", "no", "tRUE", "2", " true", "on"])
def test_bool_invalid(capsys, value):
    assert_flag_error(
        capsys,
        ["-use-listen-fd=" + value],
        f'invalid boolean value "{value}" for -use-listen-fd: parse error',
    )


def test_bool_invalid_for_version_flag(capsys):
    assert_flag_error(capsys, ["--v=x"], 'invalid boolean value "x" for -v: parse error')


# --------------------------------------------------------------------------- where parsing stops


@pytest.mark.parametrize("stop", ["-", "", "foo", "0", "tcp", "--"])
def test_stops_at_non_flag_or_terminator(stop):
    c = parse("-host-port", "7", stop, "-host-port", "8", "-bogus", "---x")
    assert c.host_port == 7


def test_everything_after_terminator_ignored():
    c = parse("--", "-use-listen-fd", "-v")
    assert c.use_listen_fd is False


@pytest.mark.parametrize("arg", ["---x", "-=x", "--=x", "-=", "--=", "---", "---host-port=1"])
def test_bad_flag_syntax(capsys, arg):
    assert_flag_error(capsys, ["-host-port", "1", arg], f"bad flag syntax: {arg}")


@pytest.mark.parametrize(
    "args, name",
    [
        (["-x"], "x"),
        (["--bogus=1"], "bogus"),
        (["-host_port", "1"], "host_port"),
        (["-Proto", "tcp"], "Proto"),
        (["-hostport=="], "hostport"),
        (["-H"], "H"),
        (["-proto", "udp", "-listen-fd"], "listen-fd"),
    ],
)
def test_unknown_flag(capsys, args, name):
    assert_flag_error(capsys, args, f"flag provided but not defined: -{name}")


@pytest.mark.parametrize(
    "name", ["proto", "host-ip", "host-port", "container-ip", "container-port"]
)
@pytest.mark.parametrize("dash", ["-", "--"])
def test_missing_argument(capsys, name, dash):
    assert_flag_error(capsys, ["-use-listen-fd", dash + name], f"flag needs an argument: -{name}")


def test_error_stops_at_first_problem(capsys):
    assert_flag_error(
        capsys, ["-bogus", "-host-port", "x"], "flag provided but not defined: -bogus"
    )


# --------------------------------------------------------------------------- help and version


@pytest.mark.parametrize("arg", ["-h", "-help", "--help", "--h", "-h=1", "-help=no"])
def test_help(capsys, arg):
    code, out, err = exits(capsys, "-proto", "udp", arg, "-bogus")
    assert code == 0
    assert out == ""
    assert err == USAGE


def test_usage_names_argv0(capsys):
    with pytest.raises(SystemExit):
        goflags.parse(["./bin/proxy", "-h"])
    assert capsys.readouterr().err.startswith("Usage of ./bin/proxy:\n  -container-ip value\n")


def test_usage_text_function():
    assert goflags.usage_text(PROG) == USAGE


@pytest.mark.parametrize("args", [["-v"], ["-version"], ["--version=true"], ["--v", "extra"]])
def test_version(capsys, args):
    code, out, err = exits(capsys, *args)
    assert (code, out, err) == (0, VERSION_LINE, "")


def test_version_printed_only_after_parsing_completes(capsys):
    # docker-proxy checks the flag after flag.Parse(): a later error wins.
    assert_flag_error(capsys, ["-v", "-nope"], "flag provided but not defined: -nope")
    assert_flag_error(capsys, ["-version", "-host-ip", "x"],
                      'invalid value "x" for flag -host-ip: invalid IP address: x')  # fmt: skip


def test_v_and_version_share_one_variable():
    # Both flags write the same bool, so the last one wins.
    assert parse("-v", "-version=false").print_version is False
    assert parse("-version", "-v=0").print_version is False


def test_version_then_help_is_help(capsys):
    code, out, err = exits(capsys, "-v", "-h")
    assert (code, out, err) == (0, "", USAGE)


# --------------------------------------------------------------------------- integers

INT_CASES = [
    ("0", 0),
    ("-0", 0),
    ("+7", 7),
    ("8080", 8080),
    ("-1", -1),
    ("0x1F90", 8080),
    ("0X1f90", 8080),
    ("-0x10", -16),
    ("017", 15),
    ("0o17", 15),
    ("0O17", 15),
    ("0b101", 5),
    ("0B1", 1),
    ("1_000", 1000),
    ("0x_1_0", 16),
    ("0_7", 7),
    ("0b_1", 1),
    ("00", 0),
    ("9223372036854775807", 2**63 - 1),
    ("-9223372036854775808", -(2**63)),
    ("0x7fffffffffffffff", 2**63 - 1),
    ("-0x8000000000000000", -(2**63)),
]


@pytest.mark.parametrize("text, value", INT_CASES)
def test_int_values(text, value):
    assert parse("-container-port", text).container_port == value
    assert parse("--host-port=" + text).host_port == value


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "parse error"),
        ("-", "parse error"),
        ("+", "parse error"),
        ("+-1", "parse error"),
        ("--1", "parse error"),
        ("08", "parse error"),
        ("09", "parse error"),
        ("0x", "parse error"),
        ("0b", "parse error"),
        ("0o", "parse error"),
        ("0x_", "parse error"),
        ("0_", "parse error"),
        ("1_", "parse error"),
        ("_1", "parse error"),
        ("1__0", "parse error"),
        ("0xg", "parse error"),
        ("0b2", "parse error"),
        ("1.0", "parse error"),
        (" 1", "parse error"),
        ("1 ", "parse error"),
        ("1e3", "parse error"),
        ("８０", "parse error"),
        ("9223372036854775808", "value out of range"),
        ("-9223372036854775809", "value out of range"),
        ("0x8000000000000000", "value out of range"),
        ("18446744073709551615", "value out of range"),
        ("18446744073709551616", "value out of range"),
        # Go gives up at the first digit that overflows uint64, even if the
        # string is malformed further on.
        ("99999999999999999999x", "value out of range"),
        ("99999999999999999999_", "value out of range"),
        ("9999999999999999999x", "parse error"),
        ("1__99999999999999999999", "value out of range"),
    ],
)
def test_int_errors(capsys, text, reason):
    assert_flag_error(
        capsys,
        ["-host-port", text],
        f"invalid value {goflags.go_quote(text)} for flag -host-port: {reason}",
    )


def test_int_error_names_the_flag(capsys):
    assert_flag_error(
        capsys, ["--container-port=x"], 'invalid value "x" for flag -container-port: parse error'
    )


# --------------------------------------------------------------------------- IP addresses


@pytest.mark.parametrize(
    "text, family, canonical, packed",
    [
        ("127.0.0.1", 2, "127.0.0.1", "7f000001"),
        ("0.0.0.0", 2, "0.0.0.0", "00000000"),
        ("255.255.255.255", 2, "255.255.255.255", "ffffffff"),
        ("::", 10, "::", "00" * 16),
        ("::1", 10, "::1", "00" * 15 + "01"),
        ("::ffff:1.2.3.4", 2, "1.2.3.4", "01020304"),
        ("::FFFF:0102:0304", 2, "1.2.3.4", "01020304"),
        ("0:0:0:0:0:ffff:7f00:1", 2, "127.0.0.1", "7f000001"),
        ("::1.2.3.4", 10, "::102:304", "00" * 12 + "01020304"),
        ("FD00:0:0:0:0:0:0:2", 10, "fd00::2", "fd00" + "00" * 13 + "02"),
        ("1:0:0:1:0:0:0:1", 10, "1:0:0:1::1", "00010000000000010000000000000001"),
        ("1:0:1:0:1:0:1:0", 10, "1:0:1:0:1:0:1:0", "00010000000100000001000000010000"),
        ("1:0:0:2:0:0:3:4", 10, "1::2:0:0:3:4", "00010000000000020000000000030004"),
        ("1:2:3:4:5:6:7::", 10, "1:2:3:4:5:6:7:0", "0001000200030004000500060007" + "0000"),
        ("2001:db8::1.2.3.4", 10, "2001:db8::102:304", "20010db8" + "00" * 8 + "01020304"),
        ("0000:00:0::0001", 10, "::1", "00" * 15 + "01"),
    ],
)
def test_ip_values(text, family, canonical, packed):
    c = parse("-host-ip", text, "--container-ip=" + text)
    assert (c.host_ip, c.host_family, c.host_addr.hex()) == (canonical, family, packed)
    assert (c.container_ip, c.container_family, c.container_addr.hex()) == (
        canonical,
        family,
        packed,
    )


@pytest.mark.parametrize(
    "text",
    [
        "01.2.3.4",
        "1.2.3.04",
        "1.2.3",
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.4 ",
        "1..2.3",
        "localhost",
        "[::1]",
        "::1%eth0",
        "fe80::1%1",
        "1.2.3.4%eth0",
        "%eth0",
        "::1%",
        "1::2::3",
        ":::",
        ":1::",
        "1::2:",
        "12345::",
        "00000::1",
        "1:2:3:4:5:6:7:8:9",
        "1:2:3:4:5:6:7",
        "1::2:3:4:5:6:7:8",
        "1:2:3:4:5:1.2.3.4",
        "::ffff:01.2.3.4",
        "1.2.3.4::",
        "::1.2.3.4:5",
        "g::1",
        "0x7f.0.0.1",
        "１.2.3.4",
        "1.2.3.4/24",
        "1",
        "-1",
    ],
)
def test_ip_invalid(capsys, text):
    for flag in ("host-ip", "container-ip"):
        assert_flag_error(
            capsys,
            ["-" + flag, text],
            f"invalid value {goflags.go_quote(text)} for flag -{flag}: invalid IP address: {text}",
        )


def test_empty_ip_is_a_nil_ip():
    # net.IP.UnmarshalText accepts "" as a nil IP. docker-proxy then listens
    # on [::] IPv6-only (To4() of nil is nil) and dials the container on IPv4.
    c = parse("-host-ip", "", "-container-ip=")
    assert (c.host_ip, c.host_family, c.host_addr) == ("", 10, bytes(16))
    assert (c.container_ip, c.container_family, c.container_addr) == ("", 2, bytes(4))


# --------------------------------------------------------------------------- quoting and bytes


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("abc", '"abc"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("\n\t\r\a\b\f\v", '"\\n\\t\\r\\a\\b\\f\\v"'),
        ("\x00\x1b\x7f", '"\\x00\\x1b\\x7f"'),
        ("é ü 日本", '"é ü 日本"'),
        ("\u00ad", '"\\u00ad"'),
        ("\u2028", '"\\u2028"'),
        ("\U000e0001", '"\\U000e0001"'),
        ("\udcff\udc80", '"\\xff\\x80"'),
        ("\ud800", '"\\ufffd"'),
    ],
)
def test_go_quote(text, quoted):
    assert goflags.go_quote(text) == quoted


class _Streams:
    """sys.stdout/sys.stderr stand-ins that keep the bytes written."""

    def __init__(self):
        self.out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
        self.err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")

    def __enter__(self):
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.out, self.err
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._saved
        return False

    @staticmethod
    def _bytes(stream):
        stream.flush()
        return stream.buffer.getvalue()

    @property
    def out_bytes(self):
        return self._bytes(self.out)

    @property
    def err_bytes(self):
        return self._bytes(self.err)


def run_bytes(argv):
    """parse(argv) -> (exit code or None, config or None, stdout bytes, stderr bytes)."""
    with _Streams() as s:
        try:
            config = goflags.parse(argv)
        except SystemExit as e:
            return e.code, None, s.out_bytes, s.err_bytes
    return None, config, s.out_bytes, s.err_bytes


def test_undecodable_argv_bytes_are_written_back_raw():
    raw = b"1.2.3.\xff"
    text = os.fsdecode(raw)
    code, _, out, err = run_bytes([PROG, "-host-ip", text])
    assert code == 2 and out == b""
    first = err.split(b"\n", 1)[0]
    assert first == b'invalid value "1.2.3.\\xff" for flag -host-ip: invalid IP address: 1.2.3.\xff'
    assert err.endswith(USAGE.encode())


def test_undecodable_flag_name_and_prog():
    prog = os.fsdecode(b"/opt/pr\xe9xy")
    code, _, _, err = run_bytes([prog, os.fsdecode(b"-\xfe")])
    assert code == 2
    assert err.startswith(b"flag provided but not defined: -\xfe\nUsage of /opt/pr\xe9xy:\n")


def test_closed_stderr_still_exits(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)
    with pytest.raises(SystemExit) as info:
        parse("-bogus")
    assert info.value.code == 2


# --------------------------------------------------------------------------- import cost


FORBIDDEN_AT_STARTUP = {"argparse", "re", "dataclasses", "enum", "ipaddress", "socket",
                        "_socket", "typing", "logging", "spliceproxy._engine"}  # fmt: skip


def test_imports_nothing_heavy():
    src = os.path.dirname(os.path.dirname(os.path.abspath(goflags.__file__)))
    code = (
        "import sys; before = set(sys.modules); "
        "import spliceproxy.goflags, spliceproxy.log; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    env = dict(os.environ, PYTHONPATH=src)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    added = set(res.stdout.split())
    assert {"spliceproxy.goflags", "spliceproxy.log"} <= added
    assert not added & FORBIDDEN_AT_STARTUP
    assert {m for m in added if not m.startswith("spliceproxy")} <= {"__future__"}


# =========================================================================== property tests
#
# Reference models written from the Go documentation and source behaviour,
# independently of the implementation's structure.


def ref_int(s: str):
    """strconv.ParseInt(s, 0, 64) -> (value, None) or (None, reason)."""
    body = s[1:] if s[:1] in ("+", "-") else s
    sign = -1 if s[:1] == "-" else 1
    if not body:
        return None, "parse error"
    m = re.fullmatch(r"0([xXoObB])(.*)", body, re.S) if len(body) >= 3 else None
    if m:
        base = {"x": 16, "o": 8, "b": 2}[m.group(1).lower()]
        digits, prefixed = m.group(2), True
    elif body[0] == "0":
        base, digits, prefixed = 8, body[1:], False
    else:
        base, digits, prefixed = 10, body, False
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"[:base]
    # Value of the leading run of digits/underscores: Go reports overflow as
    # soon as it happens, before seeing any bad character after it.
    digit_class = re.escape(alphabet + alphabet.upper())
    run = re.match(rf"[{digit_class}_]*", digits).group(0)
    lead = run.replace("_", "")
    if lead and int(lead, base) >= 2**64:
        return None, "value out of range"
    if run != digits:
        return None, "parse error"
    if "_" in digits:
        # Underscores only between digits (or right after a base prefix).
        group = rf"_?[{digit_class}]"
        pattern = rf"(?:{group})+" if prefixed else rf"[0-9](?:{group})*"
        if not re.fullmatch(pattern, digits if prefixed else body):
            return None, "parse error"
    value = sign * int(lead or "0", base)
    if not -(2**63) <= value < 2**63:
        return None, "value out of range"
    return value, None


def ref_ip(s: str):
    """net.ParseIP(s) as 16 bytes, or None."""
    if "%" in s:
        return None  # zones are refused by net.ParseIP
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return None
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def ref_ip_text(ip16: bytes) -> str:
    if ip16[:12] == b"\0" * 10 + b"\xff\xff":
        return str(ipaddress.IPv4Address(ip16[12:]))
    return ipaddress.IPv6Address(ip16).compressed


BOOLS = {**dict.fromkeys(["1", "t", "T", "TRUE", "true", "True"], True),
         **dict.fromkeys(["0", "f", "F", "FALSE", "false", "False"], False)}  # fmt: skip
KINDS = {"proto": "str", "host-ip": "ip", "container-ip": "ip", "host-port": "int",
         "container-port": "int", "use-listen-fd": "bool", "v": "bool",
         "version": "bool"}  # fmt: skip
FIELD = {"proto": "proto", "host-ip": "host", "container-ip": "container",
         "host-port": "host_port", "container-port": "container_port",
         "use-listen-fd": "use_listen_fd", "v": "version", "version": "version"}  # fmt: skip


def go_model(args: list[str]):
    """Go flag.Parse(ExitOnError) + docker-proxy's -version handling.

    Returns ("ok", state) or ("exit", code, stdout, first stderr line or None).
    """
    state = {"proto": "tcp", "host": "0.0.0.0", "container": "0.0.0.0", "host_port": -1,
             "container_port": -1, "use_listen_fd": False, "version": False}  # fmt: skip
    rest = list(args)
    while rest:
        tok = rest.pop(0)
        m = re.fullmatch(r"(--?)(.*)", tok, re.S)
        if not m or tok == "-":
            break
        if tok == "--":
            break
        spelled = m.group(2)
        if spelled[:1] in ("-", "="):
            return ("exit", 2, "", f"bad flag syntax: {tok}")
        name, eq, value = spelled.partition("=")
        if name not in KINDS:
            if name in ("h", "help"):
                return ("exit", 0, "", None)
            return ("exit", 2, "", f"flag provided but not defined: -{name}")
        kind = KINDS[name]
        if kind == "bool":
            if not eq:
                value = "true"
            if value not in BOOLS:
                return (
                    "exit",
                    2,
                    "",
                    f"invalid boolean value {go_q(value)} for -{name}: parse error",
                )
            state[FIELD[name]] = BOOLS[value]
            continue
        if not eq:
            if not rest:
                return ("exit", 2, "", f"flag needs an argument: -{name}")
            value = rest.pop(0)
        if kind == "str":
            state[FIELD[name]] = value
        elif kind == "int":
            number, why = ref_int(value)
            if why:
                return ("exit", 2, "", f"invalid value {go_q(value)} for flag -{name}: {why}")
            state[FIELD[name]] = number
        else:
            if value == "":
                state[FIELD[name]] = ""
                continue
            ip16 = ref_ip(value)
            if ip16 is None:
                return (
                    "exit", 2, "",
                    f"invalid value {go_q(value)} for flag -{name}: invalid IP address: {value}",
                )  # fmt: skip
            state[FIELD[name]] = ref_ip_text(ip16)
    if state["version"]:
        return ("exit", 0, VERSION_LINE, None)
    return ("ok", state)


def go_q(s: str) -> str:
    """strconv.Quote for the printable-ASCII test alphabet used below."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_text = st.text(alphabet='abcxyz019_-=.:+ "\\', max_size=6)


def _int_text():
    digits = st.text(alphabet="0123456789abcdefxXoObB_g", min_size=0, max_size=8)
    big = st.integers(min_value=-(2**66), max_value=2**66).map(lambda n: st_fmt(n))
    return st.one_of(
        st.builds(lambda s, p, d: s + p + d, st.sampled_from(["", "-", "+"]),
                  st.sampled_from(["", "0", "0x", "0X", "0o", "0b", "0_", "1"]), digits),
        big,
        st.sampled_from(["", "-", "0x", "08", "1__0", "99999999999999999999x"]),
    )  # fmt: skip


def st_fmt(n: int) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    return sign + [f"{n}", f"0x{n:x}", f"0o{n:o}", f"0{n:o}", f"0b{n:b}", f"{n:_}"][n % 6]


def _ip_text():
    v4 = st.ip_addresses(v=4).map(str)
    v6 = st.ip_addresses(v=6).map(lambda a: a.exploded if int(a) % 3 == 0 else a.compressed)
    mapped = st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
    junk = st.text(alphabet="0123456789abcdefABCDEF:.%[]", max_size=12)
    return st.one_of(v4, v6, mapped, junk, st.sampled_from(["", "01.2.3.4", "::1%lo"]))


@st.composite
def flag_token(draw):
    dashes = draw(st.sampled_from(["-", "--"]))
    if draw(st.integers(0, 19)) == 0:
        name = draw(st.sampled_from(["h", "help"]))
    else:
        name = draw(st.sampled_from([*KINDS, "x", "Proto", "host_port"]))
    kind = KINDS.get(name, "str")
    if kind == "bool":
        form = draw(st.sampled_from(["bare", "eq"]))
        if form == "bare":
            return [dashes + name]
        value = draw(st.sampled_from(list(BOOLS)) | _text)
        return [dashes + name + "=" + value]
    value = draw({"str": _text, "int": _int_text(), "ip": _ip_text()}[kind])
    form = draw(st.sampled_from(["eq", "separate", "separate", "alone"]))
    if form == "eq":
        return [dashes + name + "=" + value]
    if form == "separate":
        return [dashes + name, value]
    return [dashes + name]  # takes whatever follows as its value, or has none


stray = st.sampled_from(["-", "--", "", "foo", "true", "---x", "-=x", "--=", "0"]).map(
    lambda s: [s]
)


@fuzz
@given(st.lists(st.one_of(flag_token(), flag_token(), flag_token(), stray), max_size=8))
def test_parse_matches_go_model(chunks):
    args = [a for chunk in chunks for a in chunk]
    expected = go_model(args)
    code, config, out, err = run_bytes([PROG, *args])
    if expected[0] == "ok":
        assert code is None, (args, err)
        state = expected[1]
        assert config.proto == state["proto"]
        assert config.host_ip == state["host"]
        assert config.container_ip == state["container"]
        assert config.host_port == state["host_port"]
        assert config.container_port == state["container_port"]
        assert config.use_listen_fd == state["use_listen_fd"]
        assert (out, err) == (b"", b"")
        return
    _, want_code, want_out, want_first = expected
    assert code == want_code, (args, err)
    assert out.decode() == want_out
    if want_first is None:
        assert err.decode() == ("" if want_out else USAGE)
    else:
        assert err.decode() == want_first + "\n" + USAGE


@fuzz
@given(_int_text())
def test_int_parsing_matches_reference(text):
    value, why = ref_int(text)
    got = goflags.parse_go_int(text)
    if why is None:
        assert got == (value, None)
    else:
        assert got == (0, why)


@fuzz
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int_round_trip(n):
    assert goflags.parse_go_int(st_fmt(n)) == (n, None)


@fuzz
@given(_ip_text() | st.text(max_size=20))
def test_ip_parsing_matches_reference(text):
    assert goflags.parse_ip(text) == ref_ip(text)


@fuzz
@given(_ip_text())
def test_ip_parsing_matches_inet_pton(text):
    import _socket

    expected = None
    if "%" not in text and text.isascii():
        family = _socket.AF_INET6 if ":" in text else _socket.AF_INET
        try:
            packed = _socket.inet_pton(family, text)
        except OSError:
            pass
        else:
            expected = packed if len(packed) == 16 else b"\0" * 10 + b"\xff\xff" + packed
    assert goflags.parse_ip(text) == expected


@fuzz
@given(st.binary(min_size=16, max_size=16) | st.ip_addresses(v=6).map(lambda a: a.packed))
def test_ip_text_matches_reference(packed):
    assert goflags.format_ip(packed) == ref_ip_text(packed)
    assert goflags.parse_ip(goflags.format_ip(packed)) == packed


@fuzz
@given(st.ip_addresses())
def test_family_follows_to4(addr):
    text = str(addr)
    c = parse("-host-ip", text)
    mapped = addr.version == 6 and addr.ipv4_mapped is not None
    if addr.version == 4 or mapped:
        v4 = addr if addr.version == 4 else addr.ipv4_mapped
        assert (c.host_family, c.host_addr, c.host_ip) == (2, v4.packed, str(v4))
    else:
        assert (c.host_family, c.host_addr) == (10, addr.packed)
