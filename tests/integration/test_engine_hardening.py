"""What a hostile peer, a stop or a bad setting can do to the relay engine.

Real sockets on loopback; the proxy is the installed program started as
dockerd starts it, except for the option tests, which drive the binding in
this process (so the sanitizer run sees the engine's memory use directly).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time

import pytest
import servers as srv

from spliceproxy import _engine

MIB = 1 << 20

SIZING_OPTIONS = [
    (_engine.OPT_COPY_BUF, 1 << 20),
    (_engine.OPT_COPY_MODE, _engine.COPY_SPLICE),
    (_engine.OPT_PIPE_SIZE, 4 << 20),
    (_engine.OPT_PIPE_POOL_MAX, 64),
    (_engine.OPT_UDP_MAX_FLOWS, 1 << 20),
    (_engine.OPT_UDP_MAX_FLOWS_PER_ADDR, 1 << 20),
]


# --------------------------------------------------------------------------
# Options that size buffers are fixed once the engine serves (issue 11, item 12).

def _engine_with_listener(echo_port: int, copy_buf: int) -> tuple[_engine.Engine, int]:
    eng = _engine.Engine()
    eng.set_option(_engine.OPT_COPY_MODE, _engine.COPY_READWRITE)
    eng.set_option(_engine.OPT_COPY_BUF, copy_buf)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    port = ls.getsockname()[1]
    eng.add_tcp(ls.detach(), socket.AF_INET, socket.inet_aton("127.0.0.1"), echo_port)
    return eng, port


def _pump(eng: _engine.Engine, client: socket.socket, data: bytes, got: bytearray,
          until: int, deadline: float) -> int:
    """Send what is left of data and read echoes, running the engine in between,
    until ``until`` bytes came back; returns the bytes sent."""
    sent = 0
    while len(got) < until and time.monotonic() < deadline:
        if sent < len(data):
            try:
                sent += client.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass
        eng.run(5)
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            pass
    return sent


def test_sizing_options_are_refused_once_serving_and_the_relay_stays_sound():
    with srv.EchoServer("127.0.0.1") as echo:
        eng, port = _engine_with_listener(echo.port, 4096)
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.setblocking(False)
            data = os.urandom(2 * MIB)
            got = bytearray()
            deadline = time.monotonic() + 30
            sent = _pump(eng, client, data, got, 256 * 1024, deadline)
            # Data is in flight in 4 KiB buffers now.  Raising the buffer size
            # made the next read() overrun them (a heap overflow under ASan).
            for option, value in SIZING_OPTIONS:
                with pytest.raises(OSError) as exc:
                    eng.set_option(option, value)
                assert exc.value.errno == errno.EBUSY, option
            # Timeouts and limits still apply at any time.
            for option, value in ((_engine.OPT_IDLE_TIMEOUT_MS, 60000),
                                  (_engine.OPT_UDP_TIMEOUT_MS, 1000),
                                  (_engine.OPT_CONNECT_TIMEOUT_MS, 5000),
                                  (_engine.OPT_ACCEPT_BACKOFF_MS, 50),
                                  (_engine.OPT_FD_LIMIT, 4096)):
                eng.set_option(option, value)
            sent += _pump(eng, client, data[sent:], got, len(data), deadline)
            assert bytes(got) == data
            client.close()
            assert eng.stats()["tcp_accepted"] == 1
        finally:
            eng.close()


def test_sizing_options_apply_before_the_first_listener():
    eng = _engine.Engine()
    try:
        for option, value in SIZING_OPTIONS:
            eng.set_option(option, value)
    finally:
        eng.close()


# --------------------------------------------------------------------------
# A stop must not look like a complete download (item 10).

def _serve_download(ls: socket.socket, size: int, result: dict) -> None:
    conn, _ = ls.accept()
    block = b"\x5a" * MIB
    sent = 0
    try:
        while sent < size:
            sent += conn.send(block[:min(MIB, size - sent)])
        result["backend"] = "complete"
    except OSError as e:
        result["backend"] = e.errno
    finally:
        conn.close()
        result["sent"] = sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_mid_download_resets_both_sides(proxy_path, tmp_path, sig):
    size = 200 * MIB
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(10)
    result: dict = {}
    t = threading.Thread(target=_serve_download, args=(ls, size, result), daemon=True)
    t.start()
    with srv.Proxy(proxy_path, str(tmp_path), "127.0.0.1", "127.0.0.1",
                   ls.getsockname()[1]) as p:
        c = p.connect(timeout=10)
        got = 0
        while got < 20 * MIB:
            chunk = c.recv(MIB)
            assert chunk
            got += len(chunk)
        assert p.stop(sig) == 0
        outcome = "eof"
        try:
            while True:
                chunk = c.recv(MIB)
                if not chunk:
                    break
                got += len(chunk)
        except ConnectionResetError:
            outcome = "reset"
        c.close()
    t.join(10)
    ls.close()
    # A FIN here made a download cut at a few tens of MB look complete.
    assert outcome == "reset", (outcome, got)
    assert got < size
    assert result["backend"] in (errno.ECONNRESET, errno.EPIPE), result
