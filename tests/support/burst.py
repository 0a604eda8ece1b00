"""Clients of a burst, each kind in a process of its own.

Run as a script by the tests (``python burst.py KIND ...``), so that
thousands of socket calls are not slowed down by the test's own threads (a
backend, a timer): a thread waits for the interpreter lock after each call,
which spread the FINs of a burst over seconds and measured the test instead
of the proxy.

  abandon PORT N BYTE  N clients start a nonblocking connect to PORT at once,
                       print "connected"; on a line on stdin each sends one
                       byte if BYTE is 1 and then its FIN, and "abandoned" is
                       printed; the sockets are held, never read, until
                       stdin ends.
  busy PORT N LOG      N clients connect to PORT (an echo path) and print
                       "ready"; then rounds of a message each way on every
                       one, until stdin ends, appending "ROUND MONOTONIC" to
                       LOG after each; a wrong echo, an EOF or an error ends
                       it with "error ..." in LOG and exit status 1.
"""

from __future__ import annotations

import select
import socket
import sys
import time


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def abandon(port: int, n: int, byte: bool) -> None:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    _say("connected")
    sys.stdin.readline()
    for s in socks:
        try:
            if byte:
                s.send(b"a")
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    _say("abandoned")
    sys.stdin.read()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def busy(port: int, n: int, log: str) -> int:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    _say("ready")
    i = 0
    with open(log, "a", buffering=1) as out:
        try:
            while not select.select([sys.stdin], [], [], 0)[0]:
                msgs = [b"%05d:%06d:" % (k, i) + b"x" * 48 for k in range(n)]
                for s, m in zip(socks, msgs):
                    s.sendall(m)
                for k, (s, m) in enumerate(zip(socks, msgs)):
                    got = _recv_exact(s, len(m))
                    if got != m:
                        raise AssertionError("pair %d: %r" % (k, got))
                out.write("%d %.6f\n" % (i, time.monotonic()))
                i += 1
        except Exception as exc:  # noqa: BLE001 - the test reads it from the log
            out.write("error in round %d: %r\n" % (i, exc))
            return 1
    return 0


def main(argv: list[str]) -> int:
    kind, port, n = argv[0], int(argv[1]), int(argv[2])
    if kind == "abandon":
        abandon(port, n, argv[3] == "1")
        return 0
    if kind == "busy":
        return busy(port, n, argv[3])
    raise SystemExit("unknown kind %r" % kind)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
