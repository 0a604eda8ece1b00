"""Property tests of the TCP relay through one long-lived proxy.

hypothesis draws payload sizes (0..4 MiB, weighted to the edges), write
chunking, write pacing and the order in which the two sides finish; every
byte must arrive intact both ways (sha256), the counters must account for
exactly those bytes, and nothing may stay open.  A second property resets a
connection from either side at a random point: the other side must see the
end (EOF or reset) promptly and the proxy must keep serving.

HYPOTHESIS_PROFILE=long runs many more examples.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import servers as srv

MIB = 1 << 20
MAX_PAYLOAD = 4 * MIB
MAX_PACED_WRITES = 300  # writes beyond this go out in one piece, to bound the run time
EXAMPLE_TIMEOUT = 30.0

# The relay is cheap to exercise, so the default profile gets a few more
# examples here; other profiles (HYPOTHESIS_PROFILE=long) are taken as they are.
if os.environ.get("HYPOTHESIS_PROFILE", "fast") == "fast":
    EXAMPLES = settings(max_examples=settings.default.max_examples * 4)
else:
    EXAMPLES = settings()


class Relay:
    """The module's proxy and the backend the tests drive by hand."""

    def __init__(self, proxy_path: str, tmpdir: str):
        self.backend = srv.AcceptingBackend("127.0.0.1")
        self.proxy = srv.Proxy(proxy_path, tmpdir, "127.0.0.1", "127.0.0.1", self.backend.port)

    def pair(self) -> tuple[socket.socket, socket.socket]:
        client = srv.connect("127.0.0.1", self.proxy.port, timeout=EXAMPLE_TIMEOUT)
        try:
            conn = self.backend.accept(timeout=EXAMPLE_TIMEOUT)
        except BaseException:
            client.close()
            raise
        return client, conn

    def check_serving(self) -> None:
        """One full exchange through the proxy: it is alive and relays both ways."""
        assert self.proxy.alive(), "the proxy exited (log: %r)" % self.proxy.log()[-2000:]
        client, conn = self.pair()
        try:
            client.sendall(b"ping")
            assert srv.recv_exact(conn, 4) == b"ping"
            conn.sendall(b"pong")
            assert srv.recv_exact(client, 4) == b"pong"
        finally:
            client.close()
            conn.close()

    def close(self) -> None:
        self.proxy.close()
        self.backend.close()


@pytest.fixture(scope="module")
def relay(proxy_path, tmp_path_factory):
    r = Relay(proxy_path, str(tmp_path_factory.mktemp("fuzz")))
    try:
        yield r
        # The long-lived proxy ends clean: nothing open, nothing in flight.
        st_ = r.proxy.wait_idle()
        assert st_["pipes_in_use"] == 0
        assert r.proxy.stop() == 0
    finally:
        r.close()


# --------------------------------------------------------------------------
# Strategies.

EDGE_SIZES = [0, 1, 2, 3, 1023, 1024, 4095, 4096, 4097, 16383, 16384, 65535, 65536, 65537,
              131072, MIB - 1, MIB, MIB + 1, 2 * MIB, MAX_PAYLOAD - 1, MAX_PAYLOAD]

sizes = st.one_of(
    st.sampled_from(EDGE_SIZES),
    st.integers(0, 70_000),
    st.integers(0, MAX_PAYLOAD),
)

chunkings = st.lists(
    st.one_of(st.sampled_from([1, 2, 7, 1448, 4096, 65535, 65536, 65537, 262144, MIB]),
              st.integers(1, MIB)),
    min_size=1, max_size=6,
)

pacings = st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.002, 0.01]), max_size=12)

orderings = st.sampled_from(["client_first", "backend_first", "both"])


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _write(sock: socket.socket, data: bytes, chunks: list[int], pauses: list[float]) -> None:
    """Write data in pieces of the drawn sizes, sleeping between the first pieces."""
    view = memoryview(data)
    off = 0
    sizes_ = itertools.cycle(chunks)
    for i in itertools.count():
        if off >= len(data):
            break
        if i >= MAX_PACED_WRITES:
            sock.sendall(view[off:])
            break
        n = next(sizes_)
        sock.sendall(view[off:off + n])
        off += n
        if i < len(pauses) and pauses[i]:
            time.sleep(pauses[i])
    sock.shutdown(socket.SHUT_WR)


def _side(sock, data, chunks, pauses, read_first: bool):
    """One end of a transfer: returns (length, sha256) of what it received up to EOF."""
    if read_first:
        got = srv.recv_to_eof(sock)
        _write(sock, data, chunks, pauses)
        return got
    errors: list[BaseException] = []

    def writer():
        try:
            _write(sock, data, chunks, pauses)
        except BaseException as e:  # noqa: B036 - reported by the reading thread
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got = srv.recv_to_eof(sock)
    t.join(EXAMPLE_TIMEOUT)
    if t.is_alive():
        raise AssertionError("writer still blocked after the peer finished")
    if errors:
        raise errors[0]
    return got




# --------------------------------------------------------------------------


@pytest.mark.slow
@EXAMPLES
@given(
    up_size=sizes, down_size=sizes, seed=st.integers(0, 2**32 - 1),
    up_chunks=chunkings, down_chunks=chunkings,
    up_pauses=pacings, down_pauses=pacings, ordering=orderings,
)
def test_transfer_integrity(relay, up_size, down_size, seed, up_chunks, down_chunks,
                            up_pauses, down_pauses, ordering):
    up = _payload(seed, up_size)
    down = _payload(seed ^ 0x5A5A5A5A, down_size)
    before = relay.proxy.stats()
    client, conn = relay.pair()
    try:
        client_got, backend_got = srv.run_threads(
            lambda: _side(client, up, up_chunks, up_pauses, read_first=ordering == "backend_first"),
            lambda: _side(conn, down, down_chunks, down_pauses,
                          read_first=ordering == "client_first"),
            timeout=EXAMPLE_TIMEOUT * 2,
        )
    finally:
        client.close()
        conn.close()
    assert backend_got == (len(up), srv.sha(up))
    assert client_got == (len(down), srv.sha(down))
    after = relay.proxy.wait_idle()
    assert after["bytes_c2b"] - before["bytes_c2b"] == len(up)
    assert after["bytes_b2c"] - before["bytes_b2c"] == len(down)
    assert after["tcp_accepted"] - before["tcp_accepted"] == 1
    assert after["tcp_resets"] == before["tcp_resets"]
    assert after["pipes_in_use"] == 0


def _drain(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the connection ends; return (bytes, how it ended)."""
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(buf), "reset"
        except TimeoutError:
            return bytes(buf), "timeout"
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk


def _send_ignoring_end(sock: socket.socket, data: bytes) -> int:
    """Send until done or until the connection is gone; return bytes accepted by the kernel."""
    sent = 0
    view = memoryview(data)
    while sent < len(data):
        try:
            sent += sock.send(view[sent:sent + 65536])
        except (BrokenPipeError, ConnectionResetError):
            break
        except TimeoutError:
            return -1
    return sent


@pytest.mark.slow
@EXAMPLES
@given(
    resetter=st.sampled_from(["client", "backend"]),
    before_reset=st.sampled_from([0, 1, 100, 65536, 300_000, MIB]),
    peer_sends=st.sampled_from([0, 10, 65536, MIB, 2 * MIB]),
    delay=st.sampled_from([0.0, 0.0, 0.001, 0.02]),
    how=st.sampled_from(["rst", "close_unread"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_resets_never_hurt_the_proxy(relay, resetter, before_reset, peer_sends, delay,
                                            how, seed):
    data = _payload(seed, before_reset)
    peer_data = _payload(seed + 1, peer_sends)
    client, conn = relay.pair()
    victim, peer = (client, conn) if resetter == "client" else (conn, client)
    peer.settimeout(10.0)
    try:
        outcome: dict = {}

        def peer_reads():
            outcome["read"] = _drain(peer)

        def peer_writes():
            outcome["sent"] = _send_ignoring_end(peer, peer_data)

        threads = [threading.Thread(target=f, daemon=True) for f in (peer_reads, peer_writes)]
        for t in threads:
            t.start()
        _send_ignoring_end(victim, data)
        if delay:
            time.sleep(delay)
        if how == "rst":
            srv.abortive_close(victim)
        else:
            # A plain close with unread data in the receive queue also sends RST;
            # without unread data it is a FIN.
            victim.close()
        for t in threads:
            t.join(15.0)
        assert not any(t.is_alive() for t in threads), "the peer never saw the end"
        got, end = outcome["read"]
        assert end in ("eof", "reset"), "the peer saw no end of the connection (%s)" % end
        assert outcome["sent"] >= 0, "the peer's writes blocked forever"
        # What arrived is exactly a prefix of what was sent.
        assert got == data[:len(got)]
    finally:
        client.close()
        conn.close()
    relay.proxy.wait_idle()
    relay.check_serving()
