"""The control protocol's messages: what decodes, and that nothing else does.

A malformed request must be an error the engine can answer (ProtocolError)
and must leak none of the descriptors that came with it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spliceproxy import control


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_roundtrip():
    msg = control.encode("map", ("a", "/x/spliceproxy"), ("a", "-proto"), ("a", "udp"),
                         ("e", "SPLICEPROXY_UDP_TIMEOUT=5s"), ("d", "3"), ("d", "log"))
    r, w = os.pipe()
    try:
        req = control.decode(msg, [r, w])
        assert req.command == "map"
        assert req.argv == ["/x/spliceproxy", "-proto", "udp"]
        assert req.env == {"SPLICEPROXY_UDP_TIMEOUT": "5s"}
        assert req.fds == {"3": r, "log": w}
        assert req.take("3") == r and "3" not in req.fds
    finally:
        os.close(r)
        os.close(w)


def test_non_utf8_arguments_survive():
    req = control.decode(control.encode("map", ("a", "x\udcff")), [])
    assert req.argv == ["x\udcff"]


@pytest.mark.parametrize("data, fds, why", [
    (b"", 0, "empty message"),
    (b"map", 0, "does not end with a NUL"),
    (b"\xff\0", 0, "not ASCII"),
    (b"ma p\0", 0, "bad command"),
    (b"map\0\0", 0, "empty field"),
    (b"map\0zoops\0", 0, "unknown field tag"),
    (b"map\0ePATH=/bin\0", 0, "bad environment field"),
    (b"map\0eSPLICEPROXY_X\0", 0, "bad environment field"),
    (b"map\0d7\0", 1, "bad descriptor role"),
    (b"map\0d3\0d3\0", 2, "bad descriptor role"),
    (b"map\0d3\0", 0, "1 descriptor roles for 0 descriptors"),
    (b"map\0", 1, "0 descriptor roles for 1 descriptors"),
])
def test_malformed_messages_are_refused_and_leak_nothing(data, fds, why):
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(fds)]
    with pytest.raises(control.ProtocolError, match=why):
        control.decode(data, opened)
    assert not any(_fd_open(fd) for fd in opened)


@given(st.binary(max_size=300), st.integers(0, 3))
def test_any_bytes_decode_or_are_a_protocol_error(data, nfds):
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    try:
        req = control.decode(data, opened)
    except control.ProtocolError:
        assert not any(_fd_open(fd) for fd in opened)
    else:
        assert sorted(req.fds.values()) == sorted(opened)
        req.close_fds()
        assert not any(_fd_open(fd) for fd in opened)


def test_resolve_socket():
    ns = (4, 4026531840)
    name = "engine-netns-4-4026531840.sock"
    assert control.resolve_socket({"SPLICEPROXY_ENGINE_SOCKET": "/a/b.sock"}, 1000, ns) == \
        "/a/b.sock"
    assert control.resolve_socket({}, 0, ns) == "/run/spliceproxy/" + name
    assert control.resolve_socket({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, ns) == \
        "/run/user/1000/spliceproxy/" + name
    assert control.resolve_socket({"SPLICEPROXY_ENGINE_DIR": "/x/y"}, 0, ns) == "/x/y/" + name
    assert control.resolve_socket({"XDG_RUNTIME_DIR": "relative"}, 1000, ns) is None
    assert control.resolve_socket({}, 1000, ns) is None
    # Root of a user namespace (RootlessKit's) with a runtime directory is
    # its user; the host's root, or one without a runtime directory, is root.
    run = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert control.resolve_socket(run, 0, ns, initial_userns=False) == \
        "/run/user/1000/spliceproxy/" + name
    assert control.resolve_socket(run, 0, ns, initial_userns=True) == \
        "/run/spliceproxy/" + name
    assert control.resolve_socket({}, 0, ns, initial_userns=False) == \
        "/run/spliceproxy/" + name
    assert control.resolve_socket({"XDG_RUNTIME_DIR": "rel"}, 0, ns, initial_userns=False) == \
        "/run/spliceproxy/" + name
    assert control.resolve_socket(dict(run, SPLICEPROXY_ENGINE_DIR="/x"), 0, ns,
                                  initial_userns=False) == "/x/" + name


def test_resolve_socket_is_this_namespace():
    st = os.stat("/proc/self/ns/net")
    assert control.resolve_socket({"SPLICEPROXY_ENGINE_DIR": "/x"}, 0) == \
        "/x/engine-netns-%d-%d.sock" % (st.st_dev, st.st_ino)
    assert control.netns_name(control.netns_id()) == os.readlink("/proc/self/ns/net")


@pytest.mark.parametrize("value, on", [
    ("", True), ("1", True), ("t", True), ("TRUE", True), ("true", True), ("True", True),
    ("0", False), ("f", False), ("F", False), ("FALSE", False), ("false", False),
    ("False", False),
    # Not Go booleans: the standalone front end refuses them (settings).
    ("yes", False), ("on", False), ("tRUE", False), (" 1", False), ("2", False)])
def test_engine_enabled(value, on):
    assert control.engine_enabled({"SPLICEPROXY_ENGINE": value}) is on
    assert control.engine_enabled({}) is True


def test_parse_args_reads_the_shared_and_the_commands_own_arguments(capsys):
    def number(text):
        if not text.isdigit():
            raise ValueError("not a number")
        return int(text)

    got = control.parse_args(["--json", "--socket", "/s", "--n=3"], "prog", "usage\n",
                             flags=("--json",), values={"--n": number})
    assert got == {"socket": "/s", "json": True, "n": 3}
    assert control.parse_args([], "prog", "usage\n") == {"socket": None}
    assert control.parse_args(["--socket=/a=b"], "prog", "u\n") == {"socket": "/a=b"}
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("argv, why", [
    (["--n", "x"], "--n 'x': not a number"),
    (["--n"], "--n needs a value"),
    (["--json=yes"], "unknown argument '--json=yes'"),
    (["-socket", "/s"], "unknown argument '-socket'"),
])
def test_parse_args_errors_exit_2_with_the_usage(capsys, argv, why):
    def number(text):
        if not text.isdigit():
            raise ValueError("not a number")
        return int(text)

    assert control.parse_args(argv, "prog", "usage: prog\n", flags=("--json",),
                              values={"--n": number}) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "prog: %s\nusage: prog\n" % why


def test_parse_args_help_wins_and_exits_0(capsys):
    assert control.parse_args(["--socket", "/s", "-h", "--bogus"], "prog", "usage\n") == 0
    assert capsys.readouterr() == ("usage\n", "")
