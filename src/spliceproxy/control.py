"""The host engine's control socket: where it is, who may use it, what is said on it.

One engine serves every published port of a user in one network namespace:
its socket's name is derived from the namespace's identity (device and inode
of /proc/self/ns/net), in root's /run/spliceproxy, a user's
$XDG_RUNTIME_DIR/spliceproxy or SPLICEPROXY_ENGINE_DIR, so a stub finds the
engine of its own namespace without configuration (SPLICEPROXY_ENGINE_SOCKET
names one socket outright).  Every mapping passes its stub's namespace, and
the engine refuses one of another namespace: a mapping is bound and
connected only where its dockerd is.  The
socket is AF_UNIX SOCK_SEQPACKET: one request or reply is one message, so
there is no framing to get wrong, and a peer that dies is a hang-up the
engine sees at once.

A message is a sequence of NUL-terminated fields.  The first is the command;
the others start with a tag character:

    a<argument>    one argv word, in order (argv[0] first)
    e<NAME=VALUE>  one SPLICEPROXY_* environment variable of the sender
    d<role>        one descriptor passed with SCM_RIGHTS, in the order of the
                   array: "1", "2", "4" (the stub's fds of those numbers),
                   "log" (its SPLICEPROXY_LOG_FILE, opened with its
                   privileges), "listen" (its duplicate of the listener),
                   "netns" (its /proc/self/ns/net);
                   "3", a status pipe the engine answers itself, for other
                   clients (the stub keeps dockerd's: a hung engine would
                   hold it open in an unread message)

Requests (stub or status client to engine) and their replies:

    map      a new mapping: argv, environment, fds 1, 2, 4, log and netns  ->  "ok"
             with a duplicate of the listening socket (the stub writes
             "0\\n" on fd 3), or "exit" <code> [<text>]: the stub exits with
             code, after writing "1\\n<text>" on fd 3 for a startup failure
             (usage and flag errors went to its fd 2)
    adopt    the same mapping again, after the engine it was registered
             with died: argv, environment, listen and log  ->  "ok" or "exit"
    remove   end the sender's mapping  ->  "removed" once the listener is
             closed
    status   ->  "status" <JSON chunk>... then "end"
    log      the sender's log file opened again (SIGHUP, logrotate): the
             descriptor "log"; no reply, the mapping logs to it from now on

Anything malformed gets "error" <text>, and the connection and every other
mapping carry on.  The C side of this is csrc/stub/stub.c.
"""

from __future__ import annotations

import array
import os
import socket
import stat
import sys

from spliceproxy import userns
from spliceproxy.settings import GO_TRUE

__all__ = [
    "MSG_MAX",
    "ProtocolError",
    "Request",
    "check_dir",
    "netns_id",
    "decode",
    "encode",
    "engine_enabled",
    "parse_args",
    "resolve_socket",
]

MSG_MAX = 65536
MAX_FDS = 8
DEFAULT_ROOT_DIR = "/run/spliceproxy"
FD_ROLES = ("1", "2", "3", "4", "log", "listen", "netns")
NETNS_PATH = "/proc/self/ns/net"
SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path): a path must fit with its NUL


class ProtocolError(ValueError):
    """A message that does not follow the format above."""


def engine_enabled(env=None) -> bool:
    """Does a proxy command line go to the engine, as the stub decides?

    Yes unless SPLICEPROXY_ENGINE is set: engine mode is the default.  A Go
    true keeps it; a Go false is standalone, and so is any other value, for
    the standalone front end to refuse as the bad setting it is (settings).
    """
    env = os.environ if env is None else env
    value = env.get("SPLICEPROXY_ENGINE", "")
    return value == "" or value in GO_TRUE


def netns_id(fd_or_path: int | str = NETNS_PATH) -> tuple[int, int]:
    """A network namespace's identity: (device, inode) of its nsfs file."""
    st = os.stat(fd_or_path)
    return st.st_dev, st.st_ino


def netns_name(ident: tuple[int, int]) -> str:
    """As the kernel shows it (ip netns identify, /proc/PID/ns/net): net:[inode]."""
    return "net:[%d]" % ident[1]


def socket_name(ident: tuple[int, int]) -> str:
    """The control socket's file name for the namespace ident (stub.c: SOCKET_NAME_FMT)."""
    return "engine-netns-%d-%d.sock" % ident


def resolve_socket(env=None, euid: int | None = None,
                   netns: tuple[int, int] | None = None,
                   initial_userns: bool | None = None) -> str | None:
    """The control socket path of this namespace's engine, as the stub resolves
    it; None when there is none (no directory applies, or the path does not
    fit a socket address).  Root of a user namespace other than the host's
    (initial_userns false; by default /proc/self/uid_map says) with
    XDG_RUNTIME_DIR set is the user it is on the host (userns)."""
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    path = env.get("SPLICEPROXY_ENGINE_SOCKET", "")
    if path:
        return path if len(os.fsencode(path)) < SUN_PATH_MAX else None
    directory = env.get("SPLICEPROXY_ENGINE_DIR", "")
    if not directory:
        runtime = env.get("XDG_RUNTIME_DIR", "")
        if euid == 0 and not runtime.startswith("/"):
            directory = DEFAULT_ROOT_DIR
        elif euid == 0 and (userns.in_initial() if initial_userns is None else initial_userns):
            directory = DEFAULT_ROOT_DIR
        elif runtime.startswith("/"):
            directory = os.path.join(runtime, "spliceproxy")
        else:
            return None
    path = os.path.join(directory, socket_name(netns_id() if netns is None else netns))
    return path if len(os.fsencode(path)) < SUN_PATH_MAX else None


def check_dir(path: str, create: bool = True) -> None:
    """The socket's directory must be ours alone; OSError (with the reason) if not.

    It is the socket's real protection: a directory owned by this uid, mode
    0700, not a symbolic link.  Created so when missing.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(path)
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != euid or st.st_mode & 0o077:
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory")
        raise PermissionError(
            "refusing the engine socket directory %s: it must be a directory owned by uid %d "
            "with mode 0700 (it is %s, uid %d, mode %04o)"
            % (path, euid, kind, st.st_uid, stat.S_IMODE(st.st_mode)))


class Request:
    """A decoded message: the command, argv, environment and descriptors by role."""

    __slots__ = ("command", "argv", "env", "fds")

    def __init__(self, command: str, argv: list[str], env: dict[str, str],
                 fds: dict[str, int]):
        self.command = command
        self.argv = argv
        self.env = env
        self.fds = fds

    def take(self, role: str) -> int | None:
        """Remove and return the descriptor of ``role`` (the caller owns it now)."""
        return self.fds.pop(role, None)

    def close_fds(self) -> None:
        """Close every descriptor not taken."""
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def encode(command: str, *fields: tuple[str, str]) -> bytes:
    """A message: the command, then (tag, text) fields."""
    out = [command.encode() + b"\0"]
    for tag, text in fields:
        out.append(tag.encode() + os.fsencode(text) + b"\0")
    return b"".join(out)


def decode(data: bytes, fds: list[int]) -> Request:
    """Decode a message and attach its descriptors; ProtocolError if malformed.

    On error the descriptors are closed, so a bad request leaks nothing.
    """
    try:
        return _decode(data, fds)
    except ProtocolError:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def _decode(data: bytes, fds: list[int]) -> Request:
    if not data:
        raise ProtocolError("empty message")
    if not data.endswith(b"\0"):
        raise ProtocolError("message does not end with a NUL")
    parts = data[:-1].split(b"\0")
    try:
        command = parts[0].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("command is not ASCII") from None
    if not command.isidentifier():
        raise ProtocolError("bad command %r" % command[:40])
    argv: list[str] = []
    env: dict[str, str] = {}
    roles: list[str] = []
    for part in parts[1:]:
        if not part:
            raise ProtocolError("empty field")
        tag, text = part[:1], os.fsdecode(part[1:])
        if tag == b"a":
            argv.append(text)
        elif tag == b"e":
            name, eq, value = text.partition("=")
            if not eq or not name.startswith("SPLICEPROXY_"):
                raise ProtocolError("bad environment field %r" % text[:60])
            env[name] = value
        elif tag == b"d":
            if text not in FD_ROLES or text in roles:
                raise ProtocolError("bad descriptor role %r" % text[:20])
            roles.append(text)
        else:
            raise ProtocolError("unknown field tag %r" % tag)
    if len(roles) != len(fds):
        raise ProtocolError("%d descriptor roles for %d descriptors" % (len(roles), len(fds)))
    return Request(command, argv, env, dict(zip(roles, fds)))


def recv(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One message: (data, descriptors, truncated).  Descriptors are close-on-exec."""
    data, fds, flags, _addr = socket.recv_fds(sock, MSG_MAX, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    return data, list(fds), truncated


def send(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """One message, with descriptors; never raises SIGPIPE."""
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array("i", fds).tobytes())], socket.MSG_NOSIGNAL)
    else:
        sock.send(data, socket.MSG_NOSIGNAL)


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    """A client connection to the engine (status, tests)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


HELP_ARGS = ("-h", "-help", "--help")


def _path(text: str) -> str:
    if not text:
        raise ValueError("needs a path")
    return text


def parse_args(argv: list[str], prog: str, usage: str, flags: tuple[str, ...] = (),
               values: dict | None = None) -> dict | int:
    """The command line of `spliceproxy engine` and `spliceproxy status`.

    ``--socket PATH`` (or ``--socket=PATH``) and ``-h`` for both; ``flags``
    are switches of the command's own, ``values`` maps its options that
    take a value to a parser (text -> value, ValueError(reason)).  Returns
    {name without dashes: value} ("socket" always there, None when not
    given; a flag given is True), or the exit code once usage was printed
    (0, for -h) or the error with the usage (2).
    """
    parsers = {"--socket": _path}
    parsers.update(values or {})
    out: dict = {"socket": None}
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in HELP_ARGS:
            sys.stdout.write(usage)
            return 0
        if a in flags:
            out[a.lstrip("-").replace("-", "_")] = True
            continue
        name, eq, text = a.partition("=")
        if name not in parsers:
            return _usage_error(prog, usage, "unknown argument %r" % a)
        if not eq:
            if not args:
                return _usage_error(prog, usage, "%s needs a value" % name)
            text = args.pop(0)
        try:
            out[name.lstrip("-").replace("-", "_")] = parsers[name](text)
        except ValueError as e:
            return _usage_error(prog, usage, "%s %r: %s" % (name, text, e))
    return out


def _usage_error(prog: str, usage: str, msg: str) -> int:
    sys.stderr.write("%s: %s\n%s" % (prog, msg, usage))
    return 2
