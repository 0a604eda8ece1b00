"""Backend servers for the benchmark: TCP echo, TCP sink, UDP echo (C epoll loop).

Run as `python3 -m spliceproxy.bench.servers HOST ECHO_PORT SINK_PORT UDP_PORT`;
prints the three bound ports on one line once listening, exits when stdin closes.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> int:
    from spliceproxy.bench.loadgen import check, load

    ffi, lib = load()
    host, ports = argv[0], [int(p) for p in argv[1:4]]
    from spliceproxy.bench.procs import raise_nofile

    raise_nofile()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for kind, port in zip((0, 1, 2), ports):
        typ = socket.SOCK_DGRAM if kind == 2 else socket.SOCK_STREAM
        s = socket.socket(fam, typ)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, port))
        if kind != 2:
            s.listen(65535)
        s.setblocking(False)
        socks.append(s)
    sys.stdout.write(" ".join(str(s.getsockname()[1]) for s in socks) + "\n")
    sys.stdout.flush()
    lfds = ffi.new("int[]", [s.fileno() for s in socks])
    kinds = ffi.new("int[]", [0, 1, 2])
    check(lib.lg_serve(lfds, kinds, 3, sys.stdin.fileno()), "serve")
    for s in socks:
        s.close()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
