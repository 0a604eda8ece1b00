"""One client address cannot push another out of the UDP table (issue 11, item 6).

Every client (address, port) of a UDP port gets an entry holding its own
backend socket, so the backend sees one source port per client for as long
as the entry lives.  A flood of source ports from one address (or a few)
used to evict an established client of another address, which then reached
the backend from a new port.  Sources are loopback addresses (all of
127.0.0.0/8 is local), so no namespace is needed.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from spliceproxy import control

from support import servers as srv
from support.engine import mapping_counters
from support.servers import proxy_argv, spawn


def _is_client(data: bytes) -> bool:
    return data.startswith(b"client")


@pytest.fixture
def backend():
    # Echoes the b"client" datagrams only: the flood needs no answer.
    b = srv.UdpEcho(reply_if=_is_client)
    yield b
    b.close()


def _start(proxy_path, tmp_path, backend_port: int, env: dict):
    """The proxy, its port, and its counters (a function: from the counters
    file standalone, from the engine's status in engine mode)."""
    port = srv.free_port("127.0.0.1", socket.SOCK_DGRAM)
    stats = str(tmp_path / "udp.stats")
    full = dict(os.environ, SPLICEPROXY_LOG_FILE=str(tmp_path / "udp.log"), **env)
    engine_socket = full["SPLICEPROXY_ENGINE_SOCKET"] if control.engine_enabled(full) else None
    if engine_socket is None:
        full["SPLICEPROXY_STATS_FILE"] = stats
    lp = spawn(proxy_argv(proxy_path, "udp", "127.0.0.1", port, "127.0.0.1", backend_port),
               env=full, timeout=20.0)
    if engine_socket is None:
        return lp, port, lambda: srv.settled_stats(stats)
    return lp, port, lambda: mapping_counters(engine_socket, lp.pid)


def _ask(client: socket.socket, payload: bytes) -> None:
    for _ in range(5):  # UDP: retry a lost datagram
        client.send(payload)
        try:
            assert client.recv(65536) == payload
            return
        except TimeoutError:
            continue
    raise AssertionError("no echo for %r" % payload)


def _settled(stats) -> dict:
    """The counters once the proxy stopped creating entries."""
    last = stats()
    for _ in range(50):
        time.sleep(0.15)
        cur = stats()
        if cur["udp_flows_created"] == last["udp_flows_created"]:
            return cur
        last = cur
    return last


def _flood(port: int, sources: list[str], per_source: int) -> None:
    """per_source datagrams from as many source ports of each address."""
    for _ in range(per_source):
        for addr in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((addr, 0))
            s.sendto(b"flood", ("127.0.0.1", port))
            s.close()


@pytest.mark.parametrize("sources,per_source", [
    (["127.0.0.2"], 4000),                                   # the attack
    (["127.0.0.%d" % i for i in range(2, 42)], 120),         # and one spread over 40 addresses
], ids=["one-address", "forty-addresses"])
def test_a_flood_of_source_ports_does_not_evict_another_address(
        proxy_path, tmp_path, backend, sources, per_source):
    lp, port, stats = _start(proxy_path, tmp_path, backend.port,
                                  {"SPLICEPROXY_UDP_MAX_FLOWS": "1024"})
    try:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.settimeout(1.0)
        client.connect(("127.0.0.1", port))
        _ask(client, b"client before")
        t0 = time.monotonic()
        # Datagrams the listener's receive buffer could not hold are lost
        # before the proxy sees them (a loaded machine loses many): flood
        # again, in the same way, until the proxy has seen well past the
        # table's 1024 entries.
        for _ in range(10):
            _flood(port, sources, per_source)
            st = _settled(stats)
            if st["udp_flows_created"] > 1500:
                break
        took = time.monotonic() - t0
        assert st["udp_flows_created"] > 1500, st  # well past the table's 1024
        _ask(client, b"client after")
        st = stats()
        print("\n%d source ports from %d address(es) in %.2f s: %d entries evicted by the "
              "per-address bound, %d by the table bound; client kept port %s"
              % (len(sources) * per_source, len(sources), took, st["udp_addr_evicted"],
                 st["udp_flows_evicted"], backend.source_ports(_is_client)))
        # The established client reached the backend from the same port.
        assert len(set(backend.source_ports(_is_client))) == 1, backend.source_ports(_is_client)
        assert st["udp_flows_active"] <= 1024
        if len(sources) == 1:
            # A 16th of the table for one address: it only pushed out its own.
            assert st["udp_addr_evicted"] == st["udp_flows_created"] - 1 - 64, st
            assert st["udp_flows_evicted"] == 0, st
        else:
            assert st["udp_flows_evicted"] > 0, st
        client.close()
        assert lp.proc.poll() is None
    finally:
        assert lp.stop(signal.SIGINT) == 0


def test_the_per_address_bound_is_configurable(proxy_path, tmp_path, backend):
    lp, port, stats = _start(proxy_path, tmp_path, backend.port,
                                  {"SPLICEPROXY_UDP_MAX_FLOWS_PER_ADDR": "10"})
    try:
        _flood(port, ["127.0.0.3"], 50)
        st = _settled(stats)
        assert st["udp_flows_active"] == 10, st
        assert st["udp_addr_evicted"] == st["udp_flows_created"] - 10 >= 30, st
    finally:
        assert lp.stop(signal.SIGINT) == 0
