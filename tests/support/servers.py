"""Backends, the proxy under test, and utilities for the tests.

The "container" side of every test runs in this process: a TCP echo server
and a source/sink server driven by one selector thread each (so a thousand
connections cost no threads), an accepting backend that hands each accepted
socket to the test, which then plays the container by hand (half-close,
reset, checksums), and the one UDP echo (UdpEcho).  The proxy itself is
always the installed program, started exactly as dockerd starts it: Proxy
for a proxy with a log and a counters file, and the product's launcher
(spawn, proxy_argv, ProxyStartError, re-exported here) for the tests that
need the bare launch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time

from spliceproxy import _engine, control
from spliceproxy.bench.launch import LaunchedProxy, ProxyStartError, proxy_argv, spawn
from spliceproxy.bench.procs import raise_nofile
from spliceproxy.stats import read_stats_file

IO_TIMEOUT = 10.0  # every blocking socket call in these tests

# Re-exported: the one launcher, and the one way to raise the descriptor limit.
__all__ = ["ProxyStartError", "proxy_argv", "raise_nofile", "spawn"]


# The variables that choose the mode (tests/conftest.py sets them per test):
# a test that clears the proxy's settings keeps these.
MODE_VARIABLES = ("SPLICEPROXY_ENGINE", "SPLICEPROXY_ENGINE_SOCKET", "SPLICEPROXY_ENGINE_DIR",
                  "SPLICEPROXY_ENGINE_IDLE_EXIT")


def env_without_settings(extra: dict | None = None) -> dict:
    """os.environ with no SPLICEPROXY_* setting but the mode's, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SPLICEPROXY_") or k in MODE_VARIABLES}
    env.update(extra or {})
    return env


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as {field: value} (Uid, CapInh, ...)."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kib(pid: int) -> int:
    """Resident set size of pid in KiB (VmRSS)."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def has_uid(uid: int) -> bool:
    """Whether the user database knows uid."""
    import pwd

    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def can_bind(host: str, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether this host has the address host (a socket can bind to it)."""
    try:
        with socket.socket(family(host), kind) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def port_is_free(port: int, host: str = "127.0.0.1", kind=socket.SOCK_STREAM) -> bool:
    """Bind the port as dockerd would for the next container (SO_REUSEADDR)."""
    s = socket.socket(family(host), kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(1)
        return True
    except OSError:
        return False
    finally:
        s.close()


def have_ipv6() -> bool:
    return can_bind("::1")


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing is bound to right now (bind port 0, read it, release it)."""
    with socket.socket(family(host), kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 5.0, interval: float = 0.02):
    """Poll ``pred`` until it returns something true or ``timeout`` passes; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def settled(read, timeout: float = 5.0, interval: float = 0.05):
    """read() once two readings ``interval`` apart agree (the last one after
    ``timeout``): a count that startup or teardown still moves for a moment."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return now
        last = now
    return last


def settled_stats(path: str) -> dict[str, int]:
    """The counters file once it holds every change made before this call.

    The engine writes its counters at most every STATS_FLUSH_MS, and within
    that interval after the last change, so waiting one interval (and a
    margin for a loaded machine) makes the read at least as recent as the
    call."""
    time.sleep(_engine.STATS_FLUSH_MS * 1.5 / 1000)
    return read_stats_file(path)


def connect(host: str, port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def recv_to_eof(sock: socket.socket) -> tuple[int, str]:
    """Read until EOF; return (length, sha256 hex)."""
    h = hashlib.sha256()
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return total, h.hexdigest()
        h.update(chunk)
        total += len(chunk)


def abortive_close(sock: socket.socket) -> None:
    """close() that sends RST (SO_LINGER on, zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo_roundtrip(host: str, port: int, payload: bytes = b"ping", timeout: float = 5.0) -> None:
    """One connection through an echo path: send, read it back, close cleanly."""
    with connect(host, port, timeout) as s:
        s.sendall(payload)
        got = recv_exact(s, len(payload))
        assert got == payload, (got[:64], payload[:64])


def relays_both_ways(client: socket.socket, backend: socket.socket, n: int) -> None:
    """n bytes from client to backend, n back, each checked; then both closed."""
    client.sendall(b"q" * n)
    assert recv_exact(backend, n) == b"q" * n
    backend.sendall(b"r" * n)
    assert recv_exact(client, n) == b"r" * n
    client.close()
    backend.close()


def udp_roundtrip(port: int, payload: bytes = b"dgram", host: str = "127.0.0.1",
                  timeout: float = 5.0) -> bytes:
    """One datagram to host:port from a connected socket of its own; the reply."""
    with socket.socket(family(host), socket.SOCK_DGRAM) as c:
        c.settimeout(timeout)
        c.connect((host, port))
        c.send(payload)
        return c.recv(65536)


def listening_socket(host: str = "127.0.0.1", port: int = 0,
                     backlog: int = 64) -> socket.socket:
    """A TCP socket listening on (host, port) as dockerd makes one: SO_REUSEADDR,
    and IPv6 only for an IPv6 address."""
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family(host) == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def tcp_listener(host: str = "127.0.0.1", backlog: int = 64) -> tuple[int, int]:
    """A listening TCP socket on a free port, as dockerd hands one to the proxy:
    (port, fd); the caller owns the descriptor."""
    s = listening_socket(host, 0, backlog)
    return s.getsockname()[1], s.detach()


# --------------------------------------------------------------------------
# Backends.


class _SelectorServer:
    """A listening socket served by one selector thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 4096):
        self.host = host
        self.sock = listening_socket(host, port, backlog)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open_conns = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._conns: dict[socket.socket, dict] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # subclasses: on_accept(conn, state), on_readable(conn, state), on_writable(conn, state)

    def _run(self) -> None:
        while not self._stop:
            for key, mask in self._sel.select(0.5):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                    continue
                if key.data is None:
                    self._accept()
                    continue
                conn, state = key.fileobj, key.data
                try:
                    if mask & selectors.EVENT_READ:
                        self.on_readable(conn, state)
                    if mask & selectors.EVENT_WRITE and conn in self._conns:
                        self.on_writable(conn, state)
                except OSError:
                    self.drop(conn)
        for conn in list(self._conns):
            self.drop(conn)

    def _accept(self) -> None:
        for _ in range(256):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            state = {"out": bytearray(), "eof": False}
            self._conns[conn] = state
            self.accepted += 1
            self.open_conns += 1
            self._sel.register(conn, self.initial_events(), state)
            self.on_accept(conn, state)

    def initial_events(self) -> int:
        return selectors.EVENT_READ

    def on_accept(self, conn, state) -> None:
        pass

    def set_events(self, conn, state, events: int) -> None:
        if state.get("events") != events:
            self._sel.modify(conn, events, state)
            state["events"] = events

    def drop(self, conn) -> None:
        if conn in self._conns:
            del self._conns[conn]
            self.open_conns -= 1
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn)
            conn.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5.0)
        self._sel.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EchoServer(_SelectorServer):
    """Echoes every byte; on EOF flushes what is pending, shuts down its write side, closes."""

    def on_readable(self, conn, state) -> None:
        while len(state["out"]) < (4 << 20):
            try:
                data = conn.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                state["eof"] = True
                break
            state["out"] += data
        self._flush(conn, state)

    def on_writable(self, conn, state) -> None:
        self._flush(conn, state)

    def _flush(self, conn, state) -> None:
        out = state["out"]
        while out:
            try:
                n = conn.send(out)
            except (BlockingIOError, InterruptedError):
                break
            del out[:n]
        if state["eof"] and not out:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            self.drop(conn)
            return
        # Stop reading while a lot is pending (backpressure), wait for room to write.
        events = selectors.EVENT_WRITE if out else 0
        if len(out) < (4 << 20) and not state["eof"]:
            events |= selectors.EVENT_READ
        self.set_events(conn, state, events or selectors.EVENT_READ)


class SourceSinkServer(_SelectorServer):
    """Discards what it reads and sends an endless stream while the peer has room."""

    CHUNK = b"\xa5" * 65536

    def initial_events(self) -> int:
        return selectors.EVENT_READ | selectors.EVENT_WRITE

    def on_readable(self, conn, state) -> None:
        for _ in range(16):
            try:
                data = conn.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self.drop(conn)
                return

    def on_writable(self, conn, state) -> None:
        for _ in range(16):
            try:
                conn.send(self.CHUNK)
            except (BlockingIOError, InterruptedError):
                return


class AcceptingBackend:
    """A listener whose accepted sockets the test takes with ``accept()`` and drives by hand."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 1024):
        self.sock = listening_socket(host, port, backlog)
        self.port = self.sock.getsockname()[1]

    def accept(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(timeout)
        return conn

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AcceptingBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UdpEcho:
    """The "container" for UDP: a socket served by a thread, recording every
    (source, payload) it receives and echoing it back to its source
    (``echo=False``: records only; ``reply_if``: echoes only the payloads it
    accepts)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, echo: bool = True,
                 reply_if=None):
        self.sock = socket.socket(family(host), socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind((host, port))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.reply_if = reply_if
        self._received: list[tuple[tuple, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                if self._stop.is_set():
                    break
                continue
            with self._lock:
                self._received.append((addr, data))
            if self.echo and (self.reply_if is None or self.reply_if(data)):
                with contextlib.suppress(OSError):
                    self.sock.sendto(data, addr)

    def snapshot(self) -> list[tuple[tuple, bytes]]:
        """Every (source address, payload) received so far."""
        with self._lock:
            return list(self._received)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._received)

    def source_ports(self, match=None) -> list[int]:
        """Source ports of what was received (of the payloads match accepts)."""
        return [addr[1] for addr, data in self.snapshot() if match is None or match(data)]

    def peers(self) -> set:
        return {addr for addr, _ in self.snapshot()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()

    def __enter__(self) -> UdpEcho:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# The proxy under test.


def installed_proxy_path() -> str:
    """Absolute path of the installed `spliceproxy` script (not a shell shim):
    the one beside this interpreter, whatever PATH holds first."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "spliceproxy")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("spliceproxy")
    if not found:
        import pytest

        pytest.skip("spliceproxy is not installed (pip install .)")
    return os.path.realpath(found)


class Proxy:
    """The installed proxy started like dockerd starts it, with a log and a counters file.

    ``proto`` is "tcp" or "udp".  Without ``host_port`` or ``listen_sock`` a
    free port is picked, and picked again if another process takes it before
    the proxy binds it.  ``stderr_path`` keeps the proxy's stderr, which
    ``log()`` then includes.

    In either mode (the environment's SPLICEPROXY_ENGINE, as the stub reads
    it): standalone, the counters come from its counters file; in engine
    mode, where the process is the stub and the engine keeps no such file,
    from the engine's status (the mapping of this stub's pid).  The log file
    is the mapping's own in both (in engine mode the stub opens it and the
    engine writes the mapping's lines to it)."""

    def __init__(self, proxy_path: str, tmpdir: str, host_ip: str, container_ip: str,
                 container_port: int, host_port: int | None = None, listen_sock=None,
                 env: dict | None = None, preexec_fn=None, stderr=subprocess.DEVNULL,
                 status_pipe: bool = True, proto: str = "tcp", stderr_path: str | None = None,
                 timeout: float = 10.0):
        self.host_ip = host_ip
        self.proto = proto
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        pick = host_port is None and listen_sock is None
        if listen_sock is not None:
            host_port = listen_sock.getsockname()[1]
        self.stderr_path = stderr_path
        for attempt in range(5):
            self.port = free_port(host_ip, kind) if pick else host_port
            tag = "%s-%s-%d" % (proto, host_ip.replace(":", "_"), self.port)
            self.log_path = os.path.join(tmpdir, "proxy-%s.log" % tag)
            self.stats_path = os.path.join(tmpdir, "proxy-%s.stats" % tag)
            full_env = dict(os.environ)
            full_env["SPLICEPROXY_LOG_FILE"] = self.log_path
            mode_env = {**full_env, **(env or {})}
            self.engine_socket = (mode_env.get("SPLICEPROXY_ENGINE_SOCKET")
                                  if control.engine_enabled(mode_env) else None)
            if self.engine_socket is None:
                full_env["SPLICEPROXY_STATS_FILE"] = self.stats_path
            full_env.update(env or {})
            argv = proxy_argv(proxy_path, proto, host_ip, self.port, container_ip,
                              container_port, use_listen_fd=listen_sock is not None)
            err = open(stderr_path, "ab") if stderr_path else None  # noqa: SIM115
            try:
                self.launched: LaunchedProxy = spawn(
                    argv, listen_sock=listen_sock, env=full_env,
                    stderr=err if err is not None else stderr, preexec_fn=preexec_fn,
                    status_pipe=status_pipe, timeout=timeout)
                break
            except ProxyStartError as exc:
                if pick and "in use" in str(exc) and attempt < 4:
                    continue
                raise
            finally:
                if err is not None:
                    err.close()

    @property
    def pid(self) -> int:
        return self.launched.pid

    @property
    def proc(self) -> subprocess.Popen:
        return self.launched.proc

    def alive(self) -> bool:
        return self.launched.proc.poll() is None

    @property
    def engine_mode(self) -> bool:
        return self.engine_socket is not None

    @property
    def server_pid(self) -> int:
        """The process that holds the mapping's sockets: the proxy itself, or
        in engine mode the engine (its stub holds only a listener's copy)."""
        if self.engine_socket is None:
            return self.pid
        from spliceproxy import engine_status

        return engine_status.query(self.engine_socket, timeout=10.0)["engine"]["pid"]

    def stats(self) -> dict[str, int]:
        """The counters as of this call (see settled_stats; the engine's
        status is read as of now)."""
        if self.engine_socket is not None:
            from support.engine import mapping_counters

            return mapping_counters(self.engine_socket, self.pid)
        return settled_stats(self.stats_path)

    def log(self) -> str:
        """The log file, and the stderr kept with stderr_path."""
        parts = []
        for path in (self.log_path, self.stderr_path):
            if path:
                with contextlib.suppress(FileNotFoundError), \
                        open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
        return "\n".join(parts)

    def client(self, host: str | None = None, timeout: float = 5.0) -> socket.socket:
        """A UDP client connected to the proxy (so it takes replies from it alone)."""
        host = host or self.host_ip
        s = socket.socket(family(host), socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.connect((host, self.port))
        return s

    def fd_count(self) -> int:
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def fd_target(self, fd: int) -> str | None:
        try:
            return os.readlink("/proc/%d/fd/%d" % (self.pid, fd))
        except FileNotFoundError:
            return None

    def connect(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        host = "::1" if self.host_ip == "::" else (
            "127.0.0.1" if self.host_ip == "0.0.0.0" else self.host_ip)
        if host.startswith("::ffff:"):
            host = host[len("::ffff:"):]
        return connect(host, self.port, timeout)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, int]:
        """Wait until no connection is open in the engine; return the counters then."""
        st = wait_for(lambda: (lambda s: s if s["tcp_active"] == 0 else None)(self.stats()),
                      timeout)
        assert st, "connections still open: %r" % self.stats()
        return st

    def stop(self, sig: int = signal.SIGINT) -> int:
        return self.launched.stop(sig, timeout=5.0)

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.launched.stop(signal.SIGKILL, timeout=5.0)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A stand-in for dockerd: starts every command line given with the parent-death
# signal set in the child before exec (PR_SET_PDEATHSIG=SIGTERM, as dockerd's
# os/exec with SysProcAttr.Pdeathsig), prints their pids on one line, then waits
# for its stdin to close.
_FAKE_DOCKERD = r"""
import ctypes, json, os, signal, sys
from spliceproxy.bench.launch import spawn
libc = ctypes.CDLL(None, use_errno=True)
def pdeathsig():
    if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        os._exit(99)
lps = [spawn(argv, env=dict(os.environ), preexec_fn=pdeathsig, timeout=15.0)
       for argv in json.loads(sys.argv[1])]
sys.stdout.write(" ".join(str(lp.pid) for lp in lps) + "\n")
sys.stdout.flush()
sys.stdin.read()
"""


class FakeDockerd:
    """The proxies of argvs started by a parent process of their own (see above);
    pids is theirs, empty when the parent did not report within 20 s.  kill()
    is dockerd dying: SIGKILL, no chance to clean up."""

    def __init__(self, argvs: list[list[str]], env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", _FAKE_DOCKERD, json.dumps(argvs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        ready = select.select([self.proc.stdout], [], [], 20.0)[0]
        line = self.proc.stdout.readline() if ready else b""
        self.pids = [int(p) for p in line.split()]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def __enter__(self) -> FakeDockerd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# Looking at another process's sockets.

_SYS_PIDFD_GETFD = 438  # x86_64, arm64 and the generic table alike


def upload(port: int, sink: AcceptingBackend, size: int) -> None:
    """Send size bytes (a multiple of 1 MiB) through the proxy on port to the
    sink, and return once the sink has them all."""
    c = connect("127.0.0.1", port, timeout=30.0)
    conn = sink.accept()
    got = [0]

    def drain():
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return
            got[0] += len(chunk)

    block = b"\x3c" * (1 << 20)

    def send():
        for _ in range(size >> 20):
            c.sendall(block)
        c.shutdown(socket.SHUT_WR)

    try:
        run_threads(drain, send, timeout=60.0)
    finally:
        c.close()
        conn.close()
    assert got[0] == size


def grab_fd(pid: int, fd: int) -> int:
    """Duplicate descriptor ``fd`` of process ``pid`` into this process (pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return got
    finally:
        os.close(pidfd)


def process_tcp_sockets(pid: int) -> list[socket.socket]:
    """Every connected TCP socket of ``pid``, duplicated into this process (caller closes)."""
    out = []
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        if not target.startswith("socket:"):
            continue
        try:
            fd = grab_fd(pid, int(name))
        except OSError as e:
            if e.errno in (errno.EBADF, errno.ESRCH):
                continue
            raise
        s = socket.socket(fileno=fd)
        if s.type != socket.SOCK_STREAM:
            s.close()
            continue
        try:
            s.getpeername()
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


def run_threads(*fns, timeout: float = 60.0) -> list:
    """Run callables in threads; return their results, re-raising the first error."""
    results: list = [None] * len(fns)
    errors: list = []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: B036 - handed back to the test thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True)
               for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise AssertionError("threads did not finish within %.0f s" % timeout)
    if errors:
        raise errors[0]
    return results


# The load generator's C echo server in a child process, on a given port (0:
# any); it prints the port and stops when stdin closes.
C_ECHO = r"""
import socket, sys
from spliceproxy.bench import loadgen, procs
procs.raise_nofile()
ffi, lib = loadgen.load()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(4096)
ls.setblocking(False)
sys.stdout.write("%d\n" % ls.getsockname()[1])
sys.stdout.flush()
rc = lib.lg_serve(ffi.new("int[]", [ls.fileno()]), ffi.new("int[]", [0]), 1, 0)
sys.exit(0 if rc == 0 else 1)
"""


class CEcho:
    """The C echo backend as a child process (no GIL shared with the test)."""

    def __init__(self, port: int = 0):
        self.proc = subprocess.Popen([sys.executable, "-c", C_ECHO, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20.0)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.close()
            raise AssertionError("C echo backend did not start")
        self.port = int(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> CEcho:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
