"""Kernel resource errors (ENOBUFS, ENOMEM) inside a running proxy.

The kernel returns these under memory pressure, which a test cannot bring
about on demand, so the proxy runs with faultshim.c preloaded: a small
library that makes a deterministic share of the engine's splice, pipe2,
accept4, socket, connect, epoll_ctl, send, recvmmsg, sendmmsg and sendmsg
calls fail with a chosen errno.  It arms itself only once the proxy has reported ready on fd 3,
so start-up is never affected, and the test can switch it off through a
shared state file to watch the proxy recover.

What must hold while the faults fire: the process stays up; each failure
costs at most the connection (or datagram) it happened on; no byte is ever
corrupted, reordered, truncated behind a clean FIN or handed to the wrong
client; nothing hangs; every error is counted.  Once the faults stop, every
new connection and datagram gets through and nothing has leaked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import cc as cc_flags
from support import servers as srv
from support.servers import proxy_argv, spawn

# The fault library is preloaded into the standalone proxy process (the stub
# is static, and the session's engine was started without it).
pytestmark = pytest.mark.standalone_only(
    reason="faults are injected into the standalone process by LD_PRELOAD; engine mode: "
           "test_engine_mode.py::test_a_fault_in_the_engine_costs_only_its_connection "
           "(an engine started with the library preloaded)")

KIB = 1 << 10
MIB = 1 << 20

# Same order as enum point in faultshim.c.
POINTS = ("splice", "splice_in", "splice_out", "accept4", "socket", "connect",
          "recvmmsg", "sendmmsg", "sendmsg", "send", "pipe2", "epoll_add", "epoll_mod",
          "setpipe")
STATE_SIZE = 4096
STATE = struct.Struct("<QQ%dQ%dQ" % (len(POINTS), len(POINTS)))


# --------------------------------------------------------------------------
# The fault library.


@pytest.fixture(scope="module")
def faultshim(tmp_path_factory) -> str:
    """faultshim.c built into a temporary directory; the path of the .so."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        # .ci/sanitizers runs the other integration tests with ASan preloaded;
        # LeakSanitizer aborts a process that also preloads this interposer.
        pytest.skip("fault injection cannot share a process with a preloaded sanitizer "
                    "runtime; these tests run in the normal test run")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("gcc is not installed: the fault injection library cannot be built")
    out = tmp_path_factory.mktemp("faultshim") / "faultshim.so"
    src = Path(__file__).with_name("faultshim.c")
    res = subprocess.run([cc, *cc_flags.cflags(), "-O2", "-shared", "-fPIC", "-o", str(out),
                          str(src), "-ldl"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, "building faultshim.c failed:\n" + res.stderr
    return str(out)


class Faults:
    """The shared state of a preloaded faultshim: counters, and the off switch."""

    def __init__(self, shim: str, path: Path, spec: str):
        self.shim = shim
        self.path = path
        self.spec = spec
        path.write_bytes(bytes(STATE_SIZE))

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": self.shim, "FAULTSHIM": self.spec,
                "FAULTSHIM_STATE": str(self.path)}

    def read(self) -> dict:
        fields = STATE.unpack_from(self.path.read_bytes())
        n = len(POINTS)
        return {"stop": fields[0], "armed": fields[1],
                "calls": dict(zip(POINTS, fields[2:2 + n])),
                "faults": dict(zip(POINTS, fields[2 + n:2 + 2 * n]))}

    def stop(self) -> None:
        """Turn every fault off; the very next call goes through."""
        with open(self.path, "r+b") as f:
            f.write(struct.pack("<Q", 1))


def _proc_fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def test_faultshim_fails_the_chosen_calls_only_once_armed(faultshim, tmp_path):
    """The injector itself: period, budget, arming and the off switch."""
    faults = Faults(faultshim, tmp_path / "state", "socket:ENOBUFS:2:max=2,pipe2:ENOMEM:1:after=1")
    code = r"""
import os, socket, sys
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return str(e.errno)
before = [attempt(lambda: socket.socket().close()) for _ in range(3)]
os.dup2(os.open(os.devnull, os.O_WRONLY), 3)
os.write(3, b"0\n")
after = [attempt(lambda: socket.socket().close()) for _ in range(8)]
pipes = [attempt(lambda: [os.close(fd) for fd in os.pipe()]) for _ in range(3)]
with open(sys.argv[1], "r+b") as f:
    f.write(b"\1")
stopped = [attempt(os.pipe) for _ in range(2)]
print(" ".join(before), "|", " ".join(after), "|", " ".join(pipes), "|", " ".join(stopped))
"""
    env = dict(os.environ, **faults.env())
    res = subprocess.run([sys.executable, "-c", code, str(faults.path)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    nobufs, nomem = str(errno.ENOBUFS), str(errno.ENOMEM)
    assert res.stdout.split() == (
        ["ok"] * 3 + ["|"] + ["ok", nobufs, "ok", nobufs, "ok", "ok", "ok", "ok"] + ["|"]
        + ["ok", nomem, nomem] + ["|"] + ["ok", "ok"]), res.stdout
    state = faults.read()
    assert state["armed"] == 1 and state["stop"] == 1
    assert state["faults"]["socket"] == 2 and state["faults"]["pipe2"] == 2
    assert state["calls"]["socket"] == 8

    bad = subprocess.run(["/bin/true"], env=dict(os.environ, LD_PRELOAD=faultshim,
                                                 FAULTSHIM="splice:ENOWHAT:3"),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 97 and "unknown errno" in bad.stderr


# --------------------------------------------------------------------------
# TCP.


class Transfer:
    """One client connection: sends its payload, half-closes, checks the echo."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.view = memoryview(payload)
        self.sent = 0
        self.got = 0
        self.hash = hashlib.sha256()
        self.outcome: str | None = None   # ok, refused, reset, truncated, corrupt, hung
        self.detail = ""
        self.sock: socket.socket | None = None

    def finish(self, outcome: str, detail: str = "") -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.detail = detail


def run_transfers(host: str, port: int, payloads: list[bytes], timeout: float) -> list[Transfer]:
    """Run one echo transfer per payload, all at once, from one selector loop.

    Every connection ends as exactly one of: ok (whole echo back, sha256
    equal), refused (closed or reset before a single byte came back), reset
    (reset part way), truncated (a clean EOF part way: silent loss), corrupt
    (a byte that differs from what was sent) or hung (no end by the deadline).
    """
    sel = selectors.DefaultSelector()
    transfers = [Transfer(p) for p in payloads]
    live = 0
    for t in transfers:
        s = socket.socket(srv.family(host), socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            t.finish("refused", os.strerror(rc))
            continue
        t.sock = s
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, t)
        live += 1

    def close(t: Transfer) -> None:
        nonlocal live
        sel.unregister(t.sock)
        t.sock.close()
        live -= 1

    def broken(t: Transfer, e: OSError) -> None:
        t.finish("reset" if t.got else "refused", "%s after %d bytes back" % (e, t.got))
        close(t)

    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for key, mask in sel.select(0.2):
            t = key.data
            if mask & selectors.EVENT_WRITE:
                try:
                    if t.sent < len(t.payload):
                        t.sent += t.sock.send(t.view[t.sent:t.sent + 256 * KIB])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    broken(t, e)
                    continue
                if t.sent == len(t.payload):
                    try:
                        t.sock.shutdown(socket.SHUT_WR)
                    except OSError as e:
                        broken(t, e)
                        continue
                    sel.modify(t.sock, selectors.EVENT_READ, t)
            if mask & selectors.EVENT_READ:
                try:
                    data = t.sock.recv(512 * KIB)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    broken(t, e)
                    continue
                if not data:
                    if t.got == len(t.payload):
                        ok = t.hash.hexdigest() == hashlib.sha256(t.payload).hexdigest()
                        t.finish("ok" if ok else "corrupt", "" if ok else "sha256 differs")
                    elif t.got == 0:
                        t.finish("refused", "EOF before any byte came back")
                    else:
                        t.finish("truncated", "clean EOF after %d of %d bytes"
                                 % (t.got, len(t.payload)))
                    close(t)
                    continue
                end = t.got + len(data)
                if end > len(t.payload) or t.view[t.got:end] != data:
                    t.finish("corrupt", "bytes %d..%d differ from what was sent" % (t.got, end))
                    close(t)
                    continue
                t.hash.update(data)
                t.got = end
    for t in transfers:
        if t.outcome is None:
            t.finish("hung", "sent %d, got %d of %d" % (t.sent, t.got, len(t.payload)))
            close(t)
    sel.close()
    return transfers


def _outcomes(transfers: list[Transfer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in transfers:
        counts[t.outcome] = counts.get(t.outcome, 0) + 1
    return counts


def _payloads(n: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


# Per copy mode: the faults injected, the one whose failure resets a
# connection part way, and those that make the proxy give up on a client.
TCP_MODES = {
    "splice": {
        "env": {},
        "faults": [
            "splice_in:ENOMEM:6",          # no memory to read into a pipe: retried later
            "splice_out:ENOMEM:40:max=3",  # no memory to write out: that connection is reset
            "pipe2:ENOMEM:1:max=4",        # no pipe to be had: that direction waits
            "socket:ENOBUFS:9",            # no backend socket: that client is closed
            "connect:ENOBUFS:11:max=2",    # backend connect fails at once: client closed
            "epoll_add:ENOMEM:29:max=2",   # cannot watch the sockets: client reset
            "accept4:ENOBUFS:5",           # accepting pauses briefly; the client waits
        ],
        "reset": "splice_out",
    },
    "readwrite": {
        "env": {"SPLICEPROXY_COPY_MODE": "readwrite"},
        "faults": [
            "send:ENOBUFS:60:max=3",       # no buffer to write out: that connection is reset
            "socket:ENOBUFS:9",
            "connect:ENOBUFS:11:max=2",
            "epoll_add:ENOMEM:29:max=2",
            "accept4:ENOBUFS:5",
        ],
        "reset": "send",
    },
}
GIVE_UP = ("socket", "connect", "epoll_add")


@pytest.mark.parametrize("mode", sorted(TCP_MODES))
def test_tcp_enobufs_enomem_cost_only_their_connections(faultshim, proxy_path, tmp_path, mode):
    cfg = TCP_MODES[mode]
    points = [f.split(":")[0] for f in cfg["faults"]]
    faults = Faults(faultshim, tmp_path / "faults", ",".join(cfg["faults"]))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    with srv.EchoServer() as echo, contextlib.ExitStack() as stack:
        proxy = stack.enter_context(srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1",
                                              echo.port, host_port=ls.getsockname()[1],
                                              listen_sock=ls, env={**faults.env(), **cfg["env"]}))
        ls.close()
        port = proxy.port
        assert faults.read()["armed"] == 1, "the fault library did not arm itself"
        st0 = proxy.stats()

        def residue(st: dict) -> tuple[int, int]:
            # Descriptors other than the idle pipe pool's.
            pipes = 2 * st["pipes_open"]
            return _proc_fds(proxy.pid) - pipes, st["fds_open"] - pipes

        base = srv.settled(lambda: residue(proxy.stats()))

        # 50 concurrent 1 MiB echo transfers while every fault fires.
        transfers = run_transfers("127.0.0.1", port, _payloads(50, MIB, 7), timeout=40.0)
        counts = _outcomes(transfers)
        bad = ["%s: %s" % (t.outcome, t.detail) for t in transfers
               if t.outcome not in ("ok", "refused", "reset")]
        assert proxy.alive(), "proxy died under injected faults:\n" + proxy.log()
        assert not bad, "%r\n%s\n%s" % (counts, "\n".join(bad), proxy.log())
        state = faults.read()
        injected = state["faults"]
        print("outcomes %r, injected %r, calls %r" % (
            counts, {k: v for k, v in injected.items() if v}, state["calls"]))
        for point in points:
            assert injected[point] > 0, "no %s fault fired: %r" % (point, injected)
        assert injected[cfg["reset"]] == 3
        assert counts.get("ok", 0) >= 35, counts

        st = proxy.wait_idle(10.0)
        # Every injected failure was seen and counted, none twice.  An
        # immediate connect() failure is counted as a failed connection.
        d = {k: st[k] - st0[k] for k in st}
        enobufs = sum(injected[p] for p in points if p != "connect")
        assert enobufs <= d["err_enobufs"] <= enobufs + injected["connect"], (d, injected)
        # Each fault resets its pair, and a pair is reset once: a second fault
        # can fire on the same pair while what it still holds is flushed to
        # the peer (every fault is still counted in err_enobufs above).
        assert 1 <= d["tcp_resets"] <= injected[cfg["reset"]], (d, injected)
        assert d["tcp_failed"] == sum(injected[p] for p in GIVE_UP), (d, injected)
        assert d["accept_pauses"] >= 1
        assert d["tcp_accepted"] == 50
        lost = [t for t in transfers if t.outcome != "ok"]
        assert len(lost) <= injected[cfg["reset"]] + sum(injected[p] for p in GIVE_UP), (
            counts, injected)

        # Recovery: faults off, every new connection gets through whole.
        faults.stop()
        transfers = run_transfers("127.0.0.1", port, _payloads(20, 256 * KIB, 8), timeout=20.0)
        assert _outcomes(transfers) == {"ok": 20}, [(t.outcome, t.detail) for t in transfers]
        assert faults.read()["faults"] == injected, "a fault fired after the off switch"

        st = proxy.wait_idle(10.0)
        assert st["tcp_active"] == 0 and st["pipes_in_use"] == 0, st
        assert srv.settled(lambda: residue(proxy.stats())) == base, (
            "descriptor leak: %r -> %r" % (base, residue(proxy.stats())))
        assert proxy.alive()
        assert proxy.stop() == 0


@pytest.mark.parametrize("size", [0, 1, 200 * KIB], ids=["eof-only", "1-byte", "200KiB"])
@pytest.mark.parametrize("point", ["pipe2", "splice_in"])
def test_tcp_lone_connection_without_memory_is_retried_until_it_gets_through(
        faultshim, proxy_path, tmp_path, point, size):
    """No other traffic frees a pipe: the retry timer alone must bring it through.

    The first reads of the connection fail (for size 0, the read that would
    see the EOF); nothing else happens on the proxy, so only the engine's own
    backoff can resume the stalled direction.
    """
    budget = 6
    faults = Faults(faultshim, tmp_path / "faults", "%s:ENOMEM:1:max=%d" % (point, budget))
    env = faults.env()
    # No pipes reserved at start-up (that happens before a privilege drop):
    # the first relay needs pipe2().
    env["SPLICEPROXY_KEEP_PRIVILEGES"] = "1"
    with srv.EchoServer() as echo, srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1",
                                             "127.0.0.1", echo.port, env=env) as proxy:
        assert faults.read()["armed"] == 1
        st0 = proxy.stats()
        assert st0["pipes_open"] == 0
        t0 = time.monotonic()
        (t,) = run_transfers("127.0.0.1", proxy.port, _payloads(1, size, 3), timeout=10.0)
        took = time.monotonic() - t0
        assert t.outcome == "ok", (t.outcome, t.detail, proxy.stats(), proxy.log())
        assert faults.read()["faults"][point] == budget
        st = proxy.wait_idle(5.0)
        assert st["err_enobufs"] - st0["err_enobufs"] == budget, st
        assert st["tcp_resets"] == st0["tcp_resets"] and st["pipes_in_use"] == 0, st
        assert st["tcp_closed"] - st0["tcp_closed"] == 1
        # Retried on a timer (the accept back-off, 100 ms), not spinning, not stuck.
        assert took < 5.0, took
        assert proxy.alive()
        assert proxy.stop() == 0


def test_pipe_size_recovers_once_resizing_is_allowed_again(faultshim, proxy_path, tmp_path):
    """F_SETPIPE_SZ refused (a user over pipe-user-pages-soft) leaves pipes at
    64 KiB for a while, not for good: once the budget is back, new and pooled
    pipes are grown again (splice calls per MiB fall back)."""
    faults = Faults(faultshim, tmp_path / "faults", "setpipe:EPERM:1")
    env = faults.env()
    env["SPLICEPROXY_KEEP_PRIVILEGES"] = "1"  # no pipes made before arming
    size = 32 * MIB
    with srv.AcceptingBackend() as sink, srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1",
                                                   "127.0.0.1", sink.port, env=env) as proxy:
        st0 = proxy.stats()
        srv.upload(proxy.port, sink, size)
        st1 = proxy.wait_idle()
        assert faults.read()["faults"]["setpipe"] >= 1
        assert st1["pipe_resize_denied"] >= 1
        faults.stop()
        time.sleep(1.2)  # the retry interval after a refusal
        srv.upload(proxy.port, sink, size)
        st2 = proxy.wait_idle()
        small = (st1["sys_splice"] - st0["sys_splice"]) / (size / MIB)
        full = (st2["sys_splice"] - st1["sys_splice"]) / (size / MIB)
        print("splice calls per MiB: %.1f with 64 KiB pipes, %.1f after recovery"
              % (small, full))
        assert small >= 30, small  # 64 KiB pipes: at least 16 in and 16 out per MiB
        assert full < small / 2, (small, full)
        assert st2["pipe_resize_denied"] == st1["pipe_resize_denied"]
        assert proxy.stop() == 0


def _lone_transfer(faultshim, proxy_path, tmp_path, spec: str):
    """One small echo transfer through a fresh proxy with `spec` injected.

    Returns the transfer, the shim's fault counts and the proxy's counter
    deltas once the proxy is idle again.
    """
    faults = Faults(faultshim, tmp_path / "faults", spec)
    with srv.EchoServer() as echo, srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1",
                                             "127.0.0.1", echo.port, env=faults.env()) as proxy:
        assert faults.read()["armed"] == 1
        st0 = proxy.stats()
        (t,) = run_transfers("127.0.0.1", proxy.port, _payloads(1, 4 * KIB, 5), timeout=3.0)
        injected = faults.read()["faults"]
        st = proxy.wait_idle(5.0)
        assert proxy.alive()
        assert proxy.stop() == 0
    return t, injected, {k: st[k] - st0[k] for k in st}


def test_tcp_accepting_resumes_after_a_failed_resume(faultshim, proxy_path, tmp_path):
    """A listener paused after accept4() ENOBUFS must not stay paused for good
    when re-enabling it (epoll_ctl MOD) fails once: the next try is due later."""
    t, injected, d = _lone_transfer(faultshim, proxy_path, tmp_path,
                                    "accept4:ENOBUFS:1:max=1,epoll_mod:ENOMEM:1:after=1:max=1")
    assert injected["accept4"] == 1 and injected["epoll_mod"] == 1, injected
    assert t.outcome == "ok", "%s: %s (the listener never resumed)" % (t.outcome, t.detail)
    assert d["tcp_accepted"] == 1


def test_tcp_immediate_connect_enobufs_is_counted(faultshim, proxy_path, tmp_path):
    """connect() failing at once with ENOBUFS is an ENOBUFS seen, like any other."""
    t, injected, d = _lone_transfer(faultshim, proxy_path, tmp_path, "connect:ENOBUFS:1:max=1")
    assert injected["connect"] == 1
    assert t.outcome == "refused", (t.outcome, t.detail)
    assert d["tcp_failed"] == 1, d
    assert d["err_enobufs"] == 1, "connect() ENOBUFS not counted in err_enobufs: %r" % d


def test_tcp_backend_socket_emfile_makes_room_from_a_half_closed_pair(
        faultshim, proxy_path, tmp_path):
    """socket() for a new client's backend fails with EMFILE (descriptors the
    engine does not count ran out) while an abandoned half-closed pair is
    held: that pair is reset to make room and the new client is served, not
    closed (issue 23)."""
    faults = Faults(faultshim, tmp_path / "faults", "socket:EMFILE:1:after=1:max=1")
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port,
                      env=faults.env()) as proxy:
        assert faults.read()["armed"] == 1
        st0 = proxy.stats()
        with srv.connect("127.0.0.1", proxy.port) as abandoned:
            abandoned.sendall(b"a")
            abandoned.shutdown(socket.SHUT_WR)
            held = backend.accept()
            try:
                assert srv.recv_to_eof(held)[0] == 1  # the pair is half-closed now
                with srv.connect("127.0.0.1", proxy.port) as c:
                    c.sendall(b"ping")
                    conn = backend.accept()
                    with conn:
                        assert srv.recv_exact(conn, 4) == b"ping"
                        conn.sendall(b"pong")
                        assert srv.recv_exact(c, 4) == b"pong"
                assert faults.read()["faults"]["socket"] == 1
                # The abandoned pair was reset (after its FIN, the kernel
                # reports that reset as EPIPE).
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    held.sendall(b"x")
            finally:
                held.close()
        st = proxy.stats()
        d = {k: st[k] - st0[k] for k in st}
        assert d["headroom_reclaimed"] == 1 and d["err_emfile"] == 1, d
        assert d["tcp_failed"] == 0 and d["tcp_accepted"] == 2, d
        assert proxy.alive()


# --------------------------------------------------------------------------
# UDP.


class UdpClients:
    """Clients of one proxy, each on its own socket; every reply is checked."""

    def __init__(self, port: int, n: int, seed: int):
        self.port = port
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.expected: list[dict[int, bytes]] = []
        self.seq = 0
        self.sent = 0
        self.received = 0
        self.errors: list[str] = []
        for _ in range(n):
            self.add()

    def add(self) -> int:
        cid = len(self.socks)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.connect(("127.0.0.1", self.port))
        s.setblocking(False)
        self.socks.append(s)
        self.expected.append({})
        self.sel.register(s, selectors.EVENT_READ, cid)
        return cid

    def send(self, cid: int) -> None:
        self.seq += 1
        payload = b"%04d:%08d:" % (cid, self.seq) + self.rng.randbytes(self.rng.randrange(1, 700))
        self.expected[cid][self.seq] = payload
        self.socks[cid].send(payload)
        self.sent += 1

    def outstanding(self) -> int:
        return sum(len(e) for e in self.expected)

    def collect(self, quiet: float, until: int = 0) -> None:
        """Take replies until `until` are outstanding or none came for `quiet` s."""
        while self.outstanding() > until:
            ready = self.sel.select(quiet)
            if not ready:
                return
            for key, _ in ready:
                cid = key.data
                while True:
                    try:
                        data = self.socks[cid].recv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionRefusedError:
                        continue
                    self.check(cid, data)

    def check(self, cid: int, data: bytes) -> None:
        try:
            owner, seq = int(data[:4]), int(data[5:13])
        except ValueError:
            self.errors.append("client %d: unparseable reply %r" % (cid, data[:32]))
            return
        if owner != cid:
            self.errors.append("client %d got client %d's datagram %d" % (cid, owner, seq))
            return
        want = self.expected[cid].pop(seq, None)
        if want is None:
            self.errors.append("client %d: datagram %d again, or never sent" % (cid, seq))
        elif want != data:
            self.errors.append("client %d: datagram %d corrupted" % (cid, seq))
        else:
            self.received += 1

    def close(self) -> None:
        self.sel.close()
        for s in self.socks:
            s.close()


UDP_FAULTS = ",".join([
    "recvmmsg:ENOBUFS:4",        # nothing read this time: the datagrams wait in the socket
    "sendmmsg:ENOBUFS:5",        # the rest of the batch is dropped and counted
    "sendmsg:ENOMEM:5",          # that datagram is dropped and counted
    "socket:ENOBUFS:3",          # no entry for a new client: its datagram is dropped
    "connect:ENOBUFS:4:max=3",   # likewise, and the half-made socket is closed
    "epoll_add:ENOMEM:2:max=2",  # likewise: the socket cannot be watched
])


def test_udp_enobufs_enomem_drop_and_count_datagrams_only(faultshim, proxy_path, tmp_path):
    faults = Faults(faultshim, tmp_path / "faults", UDP_FAULTS)
    stats_path = str(tmp_path / "udp.stats")
    env = dict(os.environ, SPLICEPROXY_LOG_FILE=str(tmp_path / "udp.log"),
               SPLICEPROXY_STATS_FILE=stats_path, **faults.env())
    ls = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    echo = srv.UdpEcho()
    with contextlib.ExitStack() as stack:
        stack.callback(echo.close)
        launched = spawn(proxy_argv(proxy_path, "udp", "127.0.0.1", port, "127.0.0.1",
                                    echo.port, use_listen_fd=True),
                         listen_sock=ls, env=env, timeout=20.0)
        ls.close()
        stack.enter_context(launched)

        def log() -> str:
            with contextlib.suppress(OSError):
                return (tmp_path / "udp.log").read_text(errors="replace")
            return ""

        assert faults.read()["armed"] == 1, "the fault library did not arm itself"
        st0 = srv.settled_stats(stats_path)
        base_fds = srv.settled(lambda: _proc_fds(launched.pid))
        clients = UdpClients(port, 16, seed=11)
        stack.callback(clients.close)

        # Rounds of small bursts (small enough that no socket buffer overflows,
        # so every loss is the proxy's own drop).
        for _ in range(25):
            for cid in range(len(clients.socks)):
                for _ in range(4):
                    clients.send(cid)
            clients.collect(quiet=0.1)
        # Everything sent is now either echoed or counted as dropped.
        deadline = time.monotonic() + 5.0
        while True:
            clients.collect(quiet=0.1)
            st = srv.settled_stats(stats_path)
            drops = st["udp_drops"] - st0["udp_drops"]
            if clients.received + drops >= clients.sent or time.monotonic() > deadline:
                break
        assert launched.proc.poll() is None, "proxy died under injected faults:\n" + log()
        assert not clients.errors, clients.errors[:20]
        injected = faults.read()["faults"]
        print("sent %d, echoed %d, dropped %d, injected %r" % (
            clients.sent, clients.received, drops, {k: v for k, v in injected.items() if v}))
        points = ("recvmmsg", "sendmmsg", "sendmsg", "socket", "connect", "epoll_add")
        for point in points:
            assert injected[point] > 0, "no %s fault fired: %r" % (point, injected)
        assert drops > 0
        assert clients.received + drops == clients.sent, (
            "sent %d, echoed %d, counted as dropped %d" % (clients.sent, clients.received, drops))
        d = {k: st[k] - st0[k] for k in st}
        assert d["udp_dgrams_c2b"] == echo.count, (d, echo.count)
        assert d["udp_dgrams_b2c"] == clients.received, d
        assert d["err_enobufs"] == sum(injected[p] for p in points), (d, injected)
        assert clients.received >= clients.sent // 3, (clients.sent, clients.received)

        # Recovery: faults off; old and new clients, one datagram at a time,
        # every one comes back.
        faults.stop()
        drops_before = srv.settled_stats(stats_path)["udp_drops"]
        first_seq = clients.seq + 1
        for _ in range(4):
            clients.add()
        for _ in range(5):
            for cid in range(len(clients.socks)):
                clients.send(cid)
                clients.collect(quiet=2.0, until=clients.outstanding() - 1)
        assert not clients.errors, clients.errors[:20]
        missing = sorted(seq for e in clients.expected for seq in e if seq >= first_seq)
        assert not missing, "lost after the faults stopped: %r" % missing
        assert srv.settled_stats(stats_path)["udp_drops"] == drops_before
        assert faults.read()["faults"] == injected, "a fault fired after the off switch"

        # No descriptor leaked in any failure path: one socket per live entry.
        st = srv.settled(lambda: srv.settled_stats(stats_path))
        assert srv.settled(lambda: _proc_fds(launched.pid)) == base_fds + st["udp_flows_active"], st
        assert st["fds_open"] - st0["fds_open"] == st["udp_flows_active"], st
        assert launched.proc.poll() is None
        assert launched.stop(signal.SIGINT) == 0
