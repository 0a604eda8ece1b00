"""Hostile clients, failing backends and shutdown under load.

Each scenario is something a published port meets in production: thousands
of idle or trickling connections next to a busy one, connections abandoned
half-closed, resets at random moments, peers that vanish while the proxy is
writing, a backend that stops reading, resets, restarts or is not there, a
proxy that runs out of descriptors, and dockerd stopping the proxy (a signal)
or dying (the parent-death signal).  The proxy is always the installed
program started as dockerd starts it; the backends are in this process or in
a child running the load generator's C echo server.

Measured figures are printed (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import resource
import select
import selectors
import signal
import socket
import statistics
import struct
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support import servers as srv
from support.servers import proxy_argv

MIB = 1 << 20
IO_TIMEOUT = 10.0
RESET_ERRORS = (ConnectionResetError, BrokenPipeError)


# --------------------------------------------------------------------------
# Helpers.



@pytest.fixture
def lg():
    loadgen = pytest.importorskip("spliceproxy.bench.loadgen")
    return loadgen.load()




def settled(proxy, timeout: float = 10.0) -> dict:
    """Wait for no open connection and no pipe in use; return the counters."""
    st_ = srv.wait_for(lambda: (lambda s: s if s["tcp_active"] == 0 and s["pipes_in_use"] == 0
                                else None)(proxy.stats()), timeout)
    assert st_, "connections or pipes still held: %r" % proxy.stats()
    return st_


def bulk_echo(port: int, total: int) -> float:
    """Push total bytes through an echo path and read them back; returns MB/s."""
    with srv.connect("127.0.0.1", port, IO_TIMEOUT) as s:
        block = memoryview(bytes(range(256)) * 4096)  # 1 MiB

        def writer():
            sent = 0
            while sent < total:
                n = min(len(block), total - sent)
                s.sendall(block[:n])
                sent += n

        def reader():
            buf = bytearray(MIB)
            got = 0
            while got < total:
                n = s.recv_into(buf)
                if not n:
                    raise EOFError("EOF after %d of %d bytes" % (got, total))
                got += n
            return got

        t0 = time.perf_counter()
        srv.run_threads(writer, reader, timeout=60.0)
        return total / (time.perf_counter() - t0) / 1e6


def echo_latencies(lg, port: int, iters: int) -> list[float]:
    ffi, lib = lg
    lat = ffi.new("double[]", iters)
    with srv.connect("127.0.0.1", port, IO_TIMEOUT) as s:
        s.settimeout(None)  # the C loop wants a blocking socket; bound each read instead
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        rc = lib.lg_rr(s.fileno(), iters, 64, lat)
        assert rc == iters, rc
    return sorted(lat[i] / 1e6 for i in range(iters))  # ms


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def expect_reset_or_eof(sock: socket.socket, timeout: float = IO_TIMEOUT) -> str:
    """Read until the connection ends; return "reset" or "eof"."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return "eof"
    except RESET_ERRORS:
        return "reset"


# --------------------------------------------------------------------------
# Hostile clients.


def test_idle_and_trickling_connections_do_not_starve_active_ones(proxy_path, tmp_path, lg):
    ffi, lib = lg
    n_idle, n_trickle = 1800, 200
    srv.raise_nofile(2 * (n_idle + n_trickle) + 512)
    with srv.CEcho() as echo, srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1",
                                    echo.port) as p:
        base_mbps = bulk_echo(p.port, 64 * MIB)
        base_lat = echo_latencies(lg, p.port, 500)

        fds = ffi.new("int[]", n_idle + n_trickle)
        opened = lib.lg_open_many(socket.AF_INET, b"127.0.0.1", p.port, n_idle + n_trickle, fds)
        stop = threading.Event()
        try:
            assert opened == n_idle + n_trickle, opened
            trickle = [socket.socket(fileno=os.dup(fds[n_idle + i])) for i in range(n_trickle)]

            def trickler():
                sent = 0
                while not stop.wait(1.0):
                    for s in trickle:  # one byte a second each; the echoes pile up unread
                        s.send(b".")
                        sent += 1
                return sent

            th = threading.Thread(target=trickler, daemon=True)
            th.start()
            time.sleep(1.2)
            mbps = bulk_echo(p.port, 64 * MIB)
            lat = echo_latencies(lg, p.port, 500)
            stop.set()
            th.join(5.0)
            assert p.stats()["tcp_active"] >= n_idle + n_trickle
            for s in trickle:
                s.close()
        finally:
            stop.set()
            lib.lg_close_many(fds, max(opened, 0))
        print("\nbulk echo %.0f MB/s alone, %.0f MB/s next to %d idle + %d trickling; "
              "echo p50/p99 %.3f/%.3f ms alone, %.3f/%.3f ms with them" % (
                  base_mbps, mbps, n_idle, n_trickle, statistics.median(base_lat),
                  p99(base_lat), statistics.median(lat), p99(lat)))
        assert mbps >= 0.3 * base_mbps, (base_mbps, mbps)
        assert statistics.median(lat) < max(5.0, 5 * statistics.median(base_lat)), lat[:10]
        assert p99(lat) < max(50.0, 5 * p99(base_lat)), p99(lat)
        settled(p)
        assert p.alive()


def _half_close(backend, p, n: int, side: str):
    """n connections, half-closed by side ("client" or "backend"), then left alone."""
    pairs = []
    for _ in range(n):
        c = p.connect()
        b = backend.accept()
        c.sendall(b"hi")
        assert srv.recv_exact(b, 2) == b"hi"
        if side == "client":
            c.shutdown(socket.SHUT_WR)
            assert b.recv(10) == b""
        else:
            b.shutdown(socket.SHUT_WR)
            assert c.recv(10) == b""
        pairs.append((c, b))
    return pairs


@pytest.mark.parametrize("side", ["client", "backend"])
def test_abandoned_half_closed_pairs_are_reclaimed_after_idle_timeout(proxy_path, tmp_path,
                                                                      side):
    n = 20
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port,
                      env={"SPLICEPROXY_IDLE_TIMEOUT": "500ms"}) as p:
        pairs = _half_close(backend, p, n, side)
        # A half-closed pair that keeps moving data the other way is not idle.
        busy_c, busy_b = _half_close(backend, p, 1, side)[0]
        t0 = time.monotonic()
        time.sleep(0.2)
        assert p.stats()["tcp_active"] == n + 1  # not before the timeout
        writer, reader = (busy_b, busy_c) if side == "client" else (busy_c, busy_b)
        reclaimed_at = None
        for _ in range(12):  # 1.8 s of progress, every 150 ms
            writer.sendall(b"tick")
            assert srv.recv_exact(reader, 4) == b"tick"
            time.sleep(0.15)
            if reclaimed_at is None and p.stats()["idle_reclaimed"] >= n:
                reclaimed_at = time.monotonic() - t0
        st_ = srv.wait_for(lambda: (lambda s: s if s["idle_reclaimed"] >= n else None)(
            p.stats()), 5.0)
        assert st_, p.stats()
        # Reclaimed soon after the timeout (the scan runs every timeout/4).
        assert reclaimed_at is not None and reclaimed_at < 1.5, reclaimed_at
        assert st_["idle_reclaimed"] == n, st_  # the busy one was kept
        assert p.stats()["tcp_active"] == 1
        for c, b in pairs:
            # The side that can still write finds the connection gone...
            still_open = b if side == "client" else c
            with pytest.raises(RESET_ERRORS):
                for _ in range(50):
                    still_open.send(b"late")
                    time.sleep(0.01)
            # ...and the half-closed side sees the reset (or the end).
            other = c if side == "client" else b
            assert expect_reset_or_eof(other, 2.0) in ("reset", "eof")
            c.close()
            b.close()
        assert "Reclaimed" in p.log() and "SPLICEPROXY_IDLE_TIMEOUT" in p.log(), p.log()
        # The busy one still relays both ways until it is closed properly.
        writer.sendall(b"end")
        assert srv.recv_exact(reader, 3) == b"end"
        busy_c.close()
        busy_b.close()
        settled(p)
        print("\nreclaimed %d half-closed pairs within %.2f s of abandoning them (timeout 0.5 s)"
              % (n, reclaimed_at))
        assert p.alive()


def test_half_closed_pairs_are_kept_with_idle_timeout_zero(proxy_path, tmp_path):
    env = {"SPLICEPROXY_IDLE_TIMEOUT": "0"}  # never (the default is two minutes)
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port,
                      env=env) as p:
        pairs = _half_close(backend, p, 5, "client")
        time.sleep(2.0)
        st_ = p.stats()
        assert st_["idle_reclaimed"] == 0 and st_["tcp_active"] == 5, st_
        for c, b in pairs:  # still relayed from the backend to the client
            b.sendall(b"still here")
            assert srv.recv_exact(c, 10) == b"still here"
            b.close()
            assert c.recv(10) == b""
            c.close()
        settled(p)


def test_resets_and_abrupt_closes_never_wedge_the_loop(proxy_path, tmp_path):
    rng = random.Random(1234)
    seeds = [rng.randrange(1 << 30) for _ in range(8)]
    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port) as p:
        srv.echo_roundtrip("127.0.0.1", p.port, b"w" * 100_000)
        settled(p)
        fds0 = p.fd_count()

        def abuse(seed):
            r = random.Random(seed)
            for _ in range(120):
                s = socket.socket()
                s.settimeout(2.0)
                try:
                    s.connect(("127.0.0.1", p.port))
                    what = r.randrange(6)
                    if what >= 1:
                        s.sendall(os.urandom(r.choice((1, 1000, 100_000, 600_000))) if what
                                  in (1, 2, 3) else b"x")
                    if what == 2:
                        with contextlib.suppress(OSError):
                            s.recv(r.choice((1, 4096)))
                    if what == 4:
                        s.shutdown(socket.SHUT_WR)
                    time.sleep(r.choice((0, 0, 0.0005, 0.002)))
                    if r.random() < 0.6:
                        srv.abortive_close(s)
                    else:
                        s.close()
                except OSError:
                    s.close()

        srv.run_threads(*[(lambda sd=sd: abuse(sd)) for sd in seeds], timeout=90.0)
        assert p.alive()
        srv.echo_roundtrip("127.0.0.1", p.port, b"after the storm" * 1000)
        st_ = settled(p, 15.0)
        assert srv.wait_for(lambda: p.fd_count() <= fds0, 5.0), (p.fd_count(), fds0)
        assert st_["tcp_accepted"] >= 8 * 120
        assert st_["tcp_resets"] > 0, st_  # resets were propagated, not swallowed
        assert p.alive()


@pytest.mark.parametrize("direction", ["to-backend", "to-client"])
def test_peer_closing_while_the_proxy_writes_never_kills_it(proxy_path, tmp_path, direction):
    """EPIPE/ECONNRESET while relaying (SIGPIPE must not end the process)."""
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        for i in range(15):
            c = p.connect()
            b = backend.accept()
            writer, victim = (c, b) if direction == "to-backend" else (b, c)
            stop = threading.Event()

            def pump(w=writer, ev=stop):
                chunk = b"z" * 65536
                w.settimeout(0.1)
                with contextlib.suppress(OSError):
                    while not ev.is_set():
                        with contextlib.suppress(TimeoutError, socket.timeout):
                            w.send(chunk)

            th = threading.Thread(target=pump, daemon=True)
            th.start()
            srv.recv_exact(victim, 200_000)  # the proxy is writing now
            # Stop feeding (so no send of ours takes the reset report first); the
            # proxy still has a pipe and socket buffers of data to write.
            stop.set()
            th.join(IO_TIMEOUT)
            if i % 2:
                srv.abortive_close(victim)
            else:
                victim.close()  # unread data: the kernel resets
            # The writer's connection is reset too, and the proxy lives on.
            assert expect_reset_or_eof(writer) == "reset"
            writer.close()
            assert p.alive(), "proxy died (rc=%s)" % p.proc.returncode
        st_ = settled(p)
        assert st_["tcp_resets"] >= 15 and st_["err_reset"] >= 1, st_
        c = p.connect()
        b = backend.accept()
        c.sendall(b"alive")
        assert srv.recv_exact(b, 5) == b"alive"
        c.close()
        b.close()
        assert p.alive()


# --------------------------------------------------------------------------
# Backend faults.


def test_stalled_backend_blocks_senders_with_bounded_memory(proxy_path, tmp_path):
    n = 4
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        rss0 = srv.rss_kib(p.pid)
        stalled = []
        for _ in range(n):
            c = p.connect()
            stalled.append((c, backend.accept()))  # accepted, never read
        chunk = b"s" * 65536
        sent = [0] * n
        # Each client sends until its sends block for a whole second.
        for i, (c, _) in enumerate(stalled):
            c.setblocking(False)
            last = time.monotonic()
            deadline = last + 30.0
            while time.monotonic() - last < 1.0:
                assert time.monotonic() < deadline, "sends never blocked (%d bytes)" % sent[i]
                try:
                    sent[i] += c.send(chunk)
                    last = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.02)
        st_ = p.stats()
        rss1 = srv.rss_kib(p.pid)
        print("\nstalled backend: each client could send %s MiB before blocking; "
              "pipes in use %d for %d connections; proxy RSS %d -> %d KiB" % (
                  "/".join("%.1f" % (s / MIB) for s in sent), st_["pipes_in_use"], n, rss0, rss1))
        assert all(s < 64 * MIB for s in sent), sent
        assert st_["pipes_in_use"] <= 2 * n, st_
        assert rss1 - rss0 < 4 * 1024, (rss0, rss1)
        # The loop is not stuck on them: another connection relays both ways.
        c = p.connect()
        srv.relays_both_ways(c, backend.accept(), 300_000)
        # Once the backend reads, every byte the clients sent arrives.
        for i, (c, b) in enumerate(stalled):
            c.setblocking(True)
            c.shutdown(socket.SHUT_WR)
            b.settimeout(IO_TIMEOUT)
            got = 0
            while True:
                data = b.recv(MIB)
                if not data:
                    break
                got += len(data)
            assert got == sent[i]
            b.close()
            c.close()
        settled(p)
        assert srv.rss_kib(p.pid) - rss0 < 4 * 1024


def test_backend_reset_mid_transfer_reaches_the_client_only(proxy_path, tmp_path):
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        other_c = p.connect()
        other_b = backend.accept()
        c = p.connect()
        b = backend.accept()
        payload = os.urandom(4 * MIB)
        th = threading.Thread(target=_send_quietly, args=(c, payload), daemon=True)
        th.start()
        srv.recv_exact(b, 256 * 1024)
        b.sendall(b"partial")
        assert srv.recv_exact(c, 7) == b"partial"
        srv.abortive_close(b)
        assert expect_reset_or_eof(c) == "reset"
        th.join(IO_TIMEOUT)
        c.close()
        # The other connection is unaffected, both ways.
        srv.relays_both_ways(other_c, other_b, 100_000)
        st_ = settled(p)
        assert st_["tcp_resets"] >= 1, st_
        assert p.alive()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_backend_restarting_under_load(proxy_path, tmp_path):
    port = srv.free_port()
    echo = srv.CEcho(port)
    with srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", port) as p:
        results: list[tuple[float, bool]] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                ok = False
                try:
                    with srv.connect("127.0.0.1", p.port, 2.0) as s:
                        s.sendall(b"r")
                        ok = s.recv(1) == b"r"
                except OSError:
                    pass
                results.append((time.monotonic(), ok))
                if not ok:
                    time.sleep(0.005)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)
            t_kill = time.monotonic()
            echo.kill()
            time.sleep(1.0)
            t_down_end = time.monotonic()
            echo = srv.CEcho(port)
            t_up = time.monotonic()
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(5.0)
            echo.close()
        before = [ok for t, ok in results if t < t_kill]
        down = [ok for t, ok in results if t_kill + 0.1 < t < t_down_end]
        after = [ok for t, ok in results if t > t_up + 0.2]
        print("\nbackend restart: %d/%d ok before, %d/%d ok while down, %d/%d ok after" % (
            sum(before), len(before), sum(down), len(down), sum(after), len(after)))
        assert before and all(before)
        assert down and not any(down)
        assert after and all(after)
        assert p.alive()
        assert p.stats()["tcp_failed"] >= len(down)
        assert "Can't forward traffic to backend" in p.log()
        settled(p)


@pytest.mark.standalone_only(
    reason="the RLIMIT_NOFILE of the standalone process itself; engine mode: test_engine_mode.py"
           "::test_an_engine_out_of_descriptors_pauses_accepting_and_recovers")
def test_descriptor_exhaustion_pauses_accepting_and_recovers(proxy_path, tmp_path):
    limit = 64

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with srv.EchoServer("127.0.0.1") as echo, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", echo.port,
                      preexec_fn=low_nofile) as p:
        with open("/proc/%d/limits" % p.pid) as f:
            assert any(ln.startswith("Max open files") and ln.split()[3] == str(limit)
                       for ln in f), "limit not applied"
        srv.echo_roundtrip("127.0.0.1", p.port)
        n = limit  # more connections than the proxy can hold (2 descriptors each)
        socks = [srv.connect("127.0.0.1", p.port, IO_TIMEOUT) for _ in range(n)]
        served, dropped = [], []
        try:
            for s in socks:
                s.sendall(b"1")
                s.setblocking(False)

            def collect(pending: list, window: float, close: bool) -> None:
                deadline = time.monotonic() + window
                while pending and time.monotonic() < deadline:
                    ready = select.select(pending, [], [], 0.1)[0]
                    for s in ready:
                        pending.remove(s)
                        try:
                            got = s.recv(1)
                        except RESET_ERRORS:
                            got = b""
                        (served if got == b"1" else dropped).append(s)
                        if close:
                            s.close()

            waiting = list(socks)
            collect(waiting, 1.5, close=False)
            first = len(served)
            st_ = p.stats()
            assert p.alive()
            assert waiting, "all %d served under a limit of %d" % (n, limit)
            # Accepting pauses when descriptors run short (before or at EMFILE).
            assert st_["accept_pauses"] >= 1, st_
            # Those waiting in the backlog are served as descriptors free up.
            for s in served:
                s.close()
            n_waiting = len(waiting)
            collect(waiting, 30.0, close=True)
            assert not waiting, "%d connections never served" % len(waiting)
            # A connection the proxy could not serve is closed, not left hanging.
            assert len(dropped) <= 2, (len(dropped), p.stats())
        finally:
            for s in socks:
                s.close()
        print("\nRLIMIT_NOFILE=%d: %d served at once, %d waited in the backlog and were "
              "served as others closed, %d dropped; accept pauses %d" % (
                  limit, first, n_waiting, len(dropped), p.stats()["accept_pauses"]))
        settled(p)
        for _ in range(3 * limit):  # recovered for good
            srv.echo_roundtrip("127.0.0.1", p.port)
        assert srv.wait_for(lambda: "again" in p.log(), 5.0), p.log()
        assert "paused" in p.log(), p.log()
        assert p.alive()


# --------------------------------------------------------------------------
# Shutdown.


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_under_full_load_exits_0_at_once(proxy_path, tmp_path, sig):
    n = 200
    with srv.SourceSinkServer("127.0.0.1") as source, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", source.port) as p:
        socks = [srv.connect("127.0.0.1", p.port, IO_TIMEOUT) for _ in range(n)]
        sel = selectors.DefaultSelector()
        stop = threading.Event()
        received = [0]

        def drain():
            buf = bytearray(1 << 18)
            while not stop.is_set():
                for key, _ in sel.select(0.1):
                    try:
                        k = key.fileobj.recv_into(buf)
                    except (BlockingIOError, OSError):
                        continue
                    if not k:
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(key.fileobj)
                    received[0] += k
                    with contextlib.suppress(OSError):
                        key.fileobj.send(b"u" * 1024)  # some traffic the other way too

        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        th = threading.Thread(target=drain, daemon=True)
        th.start()
        try:
            ok = srv.wait_for(lambda: p.stats()["tcp_active"] == n and received[0] > 50 * MIB,
                              20.0)
            assert ok, (p.stats()["tcp_active"], received[0])
            time.sleep(0.3)
            pidfd = os.pidfd_open(p.pid)
            try:
                t0 = time.perf_counter()
                os.kill(p.pid, sig)
                exited = select.select([pidfd], [], [], 5.0)[0]
                dt = time.perf_counter() - t0
            finally:
                os.close(pidfd)
            assert exited, "still running 5 s after the signal"
            rc = p.proc.wait(5.0)
        finally:
            stop.set()
            th.join(5.0)
            sel.close()
            for s in socks:
                s.close()
        print("\n%s with %d busy connections (%.0f MiB relayed): exit %d after %.1f ms" % (
            signal.Signals(sig).name, n, received[0] / MIB, rc, dt * 1000))
        assert rc == 0
        assert dt < 0.5, dt


PR_SET_CHILD_SUBREAPER = 36


@pytest.mark.parametrize("keep", [
    pytest.param("", id="dropped-privileges", marks=pytest.mark.standalone_only(
        reason="the standalone process's own uid; engine mode: test_engine_mode.py::"
               "test_engine_drops_privileges_keeping_only_low_port_binding")),
    pytest.param("1", id="kept-privileges")])
def test_proxy_exits_when_its_parent_dies(proxy_path, tmp_path, keep):
    libc = ctypes.CDLL(None, use_errno=True)
    # Orphans come to us instead of init, so the proxy's exit status can be read.
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("cannot become a child subreaper")
    parent = None
    proxy_pid = None
    try:
        with srv.EchoServer("127.0.0.1") as echo:
            port = srv.free_port()
            argv = proxy_argv(proxy_path, "tcp", "127.0.0.1", port, "127.0.0.1", echo.port)
            env = dict(os.environ, SPLICEPROXY_KEEP_PRIVILEGES=keep)
            parent = srv.FakeDockerd([argv], env=env)
            assert parent.pids, "the parent did not start the proxy"
            proxy_pid = parent.pids[0]
            with open("/proc/%d/status" % proxy_pid) as f:
                status = f.read()
            uid = int(status.split("Uid:")[1].split()[0])
            if os.geteuid() == 0:
                assert (uid == 0) == (keep == "1"), uid
            srv.echo_roundtrip("127.0.0.1", port)
            pidfd = os.pidfd_open(proxy_pid)
            try:
                parent.kill()
                exited = select.select([pidfd], [], [], 5.0)[0]
            finally:
                os.close(pidfd)
            assert exited, "proxy still running 5 s after its parent died"
            _, wstatus = os.waitpid(proxy_pid, 0)
            proxy_pid = None
            assert os.waitstatus_to_exitcode(wstatus) == 0
    finally:
        if parent is not None:
            parent.close()
        if proxy_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(proxy_pid, signal.SIGKILL)
                os.waitpid(proxy_pid, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# --------------------------------------------------------------------------
# Random peer behaviour across concurrent connections.

STEP = st.one_of(
    st.tuples(st.just("c2b"), st.integers(1, 200_000)),
    st.tuples(st.just("b2c"), st.integers(1, 200_000)),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.001, 0.01, 0.05])),
)
ENDING = st.sampled_from(["client_fin", "backend_fin", "client_rst", "backend_rst",
                          "both_fin"])
SCRIPT = st.tuples(st.lists(STEP, max_size=6), ENDING)


def _play(c: socket.socket, b: socket.socket, steps, ending: str) -> None:
    for kind, arg in steps:
        if kind == "sleep":
            time.sleep(arg)
            continue
        src, dst = (c, b) if kind == "c2b" else (b, c)
        data = os.urandom(arg)
        t = threading.Thread(target=_send_quietly, args=(src, data), daemon=True)
        t.start()
        assert srv.recv_exact(dst, arg) == data
        t.join(IO_TIMEOUT)
    if ending == "client_rst":
        srv.abortive_close(c)
        assert expect_reset_or_eof(b) == "reset"
        b.close()
    elif ending == "backend_rst":
        srv.abortive_close(b)
        assert expect_reset_or_eof(c) == "reset"
        c.close()
    elif ending == "client_fin":
        c.shutdown(socket.SHUT_WR)
        assert b.recv(1) == b""
        b.sendall(b"bye")  # the other direction still works
        assert srv.recv_exact(c, 3) == b"bye"
        b.close()
        assert c.recv(1) == b""
        c.close()
    elif ending == "backend_fin":
        b.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""
        c.sendall(b"bye")
        assert srv.recv_exact(b, 3) == b"bye"
        c.close()
        assert b.recv(1) == b""
        b.close()
    else:
        c.shutdown(socket.SHUT_WR)
        b.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b"" and b.recv(1) == b""
        c.close()
        b.close()


@pytest.fixture
def fuzz_proxy(proxy_path, tmp_path):
    with srv.AcceptingBackend() as backend, \
            srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1", backend.port) as p:
        yield p, backend


@given(scripts=st.lists(SCRIPT, min_size=1, max_size=4))
def test_random_peer_behaviour_across_connections(fuzz_proxy, scripts):
    p, backend = fuzz_proxy
    pairs = []
    try:
        for _ in scripts:  # one pending connection at a time: accept pairs them up
            c = p.connect()
            pairs.append((c, backend.accept()))
        srv.run_threads(*[(lambda c=c, b=b, s=s: _play(c, b, s[0], s[1]))
                      for (c, b), s in zip(pairs, scripts)], timeout=60.0)
    finally:
        for c, b in pairs:
            c.close()
            b.close()
    assert p.alive()
    settled(p)


def test_a_backend_reset_right_after_accept_reaches_the_client_as_a_reset(fuzz_proxy):
    """The backend accepts and resets at once, often before the proxy has seen
    its connect complete (SO_ERROR then says ECONNRESET): that is a reset from
    the backend like any other, never a plain close of the client."""
    p, backend = fuzz_proxy
    seen = []
    for _ in range(100):
        c = p.connect()
        try:
            srv.abortive_close(backend.accept())
            seen.append(expect_reset_or_eof(c))
        finally:
            c.close()
    assert seen == ["reset"] * len(seen), "%d of %d clients saw a FIN" % (
        seen.count("eof"), len(seen))
    assert p.alive()
    settled(p)
