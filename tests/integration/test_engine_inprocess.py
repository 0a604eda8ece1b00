"""The engine driven through the binding alone, in this process.

No front end and no child process: an Engine gets a TCP and a UDP listener
(add_tcp, add_udp) and runs in a thread of its own, as the proxy's main loop
runs it (the GIL released for the whole run), while this thread plays the
client over real loopback sockets against real backends.  What comes back
must be exactly what was sent, the engine's counters must say so, and
closing it must release every descriptor it was given or opened.
"""

from __future__ import annotations

import os
import socket
import threading

from spliceproxy import _engine

from support import servers as srv

PAYLOAD = os.urandom(4 << 20)


class RunningEngine:
    """An Engine whose loop runs in a thread until stop()."""

    def __init__(self):
        self.eng = _engine.Engine()
        self.results: list[int] = []
        self.events: list[tuple[int, int, int, int]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RunningEngine:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                rc = self.eng.run(1000)
                self.results.append(rc)
                if rc == _engine.RUN_EVENTS:
                    self.events.extend(self.eng.events())
                if rc == _engine.RUN_STOPPED:
                    return
        except BaseException as e:  # noqa: B036 - handed to the test thread
            self.error = e

    def stop(self) -> None:
        self.eng.stop()  # from another thread: what the binding promises
        self._thread.join(10)
        assert not self._thread.is_alive(), "the loop did not return after stop()"
        assert self.error is None, self.error
        self.eng.close()


def test_engine_in_a_thread_relays_tcp_and_udp_through_the_binding():
    with srv.EchoServer("127.0.0.1") as tcp_echo, srv.UdpEcho("127.0.0.1") as udp_echo:
        loop = RunningEngine()
        port, fd = srv.tcp_listener()
        assert loop.eng.add_tcp(fd, socket.AF_INET, socket.inet_aton("127.0.0.1"),
                                tcp_echo.port) >= 0
        rc, step = _engine.open_listener(socket.SOCK_DGRAM, socket.AF_INET,
                                         socket.inet_aton("127.0.0.1"), 0)
        assert rc >= 0, step
        uport = socket.socket(fileno=os.dup(rc))
        udp_port = uport.getsockname()[1]
        uport.close()
        assert loop.eng.add_udp(rc, socket.AF_INET, socket.AF_INET,
                                socket.inet_aton("127.0.0.1"), udp_echo.port) >= 0
        loop.start()
        try:
            # Several TCP connections at once, each a different slice.
            def one(i: int) -> str:
                data = PAYLOAD[i * 1000:]
                with srv.connect("127.0.0.1", port) as c:
                    sender = threading.Thread(target=lambda: (c.sendall(data),
                                                              c.shutdown(socket.SHUT_WR)))
                    sender.start()
                    got = srv.recv_to_eof(c)
                    sender.join(10)
                assert got == (len(data), srv.sha(data)), i
                return got[1]

            srv.run_threads(*[(lambda i=i: one(i)) for i in range(4)], timeout=60)

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(5)
                u.connect(("127.0.0.1", udp_port))
                for size in (1, 1400, 65507):
                    msg = PAYLOAD[:size]
                    u.send(msg)
                    assert u.recv(65535) == msg, size

            sent = sum(len(PAYLOAD) - i * 1000 for i in range(4))
            # The loop counts what it sent after the send: wait for it.
            st = srv.wait_for(lambda: (lambda s: s if s["tcp_active"] == 0 and
                                       s["bytes_b2c"] == sent and
                                       s["udp_dgrams_b2c"] == 3 else None)(loop.eng.stats()),
                              timeout=10)
            assert st, loop.eng.stats()
            assert st["tcp_accepted"] == st["tcp_closed"] == 4
            assert st["bytes_c2b"] == st["bytes_b2c"] == sent
            assert st["udp_dgrams_c2b"] == st["udp_dgrams_b2c"] == 3
            assert st["udp_bytes_c2b"] == 1 + 1400 + 65507
            assert udp_echo.count == 3
        finally:
            loop.stop()
        # The loop ran without the GIL and came back only to be stopped or
        # for its timeout; nothing went wrong worth an event.
        assert loop.results[-1] == _engine.RUN_STOPPED
        assert loop.events == []
