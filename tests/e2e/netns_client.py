"""Client side of the end-to-end suite, run inside the daemon's network namespace.

The test process itself stays in the host namespace; every socket that must
see the published ports is opened by this script, started with
``nsenter --net=/var/run/netns/NAME python3 netns_client.py COMMAND ...``.
Each command prints one JSON document on stdout (except ``hold``, which
prints ``ready`` and then waits) and never blocks longer than its deadline.

Commands:
  http HOST PORT [PORT ...]   HTTP/1.0 GET / on each port, retried until it
                              answers or the deadline passes; reads to EOF
  udp HOST PORT               several clients (distinct source ports) send
                              interleaved datagrams and check each echo
  hold PORT                   listen on 0.0.0.0:PORT (TCP) until stdin closes
  bind PROTO PORT             try to bind 0.0.0.0:PORT and [::]:PORT
  bind-many PROTO HOST[,HOST] PORT [PORT ...]
                              bind each address and port; list those taken
  wait-accept HOST PORT [PORT ...]
                              print ready; after a line on stdin, the time
                              until every port accepts a connection
  tcp-states PORT             TCP states of sockets whose local port is PORT
  kill-under-load HOST[,HOST] PID PORT [PORT ...]
                              GETs in a loop on every port, SIGKILL PID, and
                              per port the time from the kill until a GET
                              started after it is answered
  open-request HOST PORT      connect, send part of a request, print ready and
                              keep the connection open until stdin closes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

# /proc/net/tcp state codes (include/net/tcp_states.h).
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def http_get_once(host: str, port: int, timeout: float) -> tuple[int, bytes]:
    """One GET that reads the reply to EOF, so the server side closes first."""
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise OSError(f"truncated reply: {raw[:200]!r}")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP reply: {raw[:200]!r}")
    return int(status_line[1]), body


def cmd_http(args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + args.deadline
    results = []
    for port in args.ports:
        attempts = 0
        while True:
            attempts += 1
            try:
                status, body = http_get_once(args.host, port, args.timeout)
            except OSError as e:
                # The proxy listens before the server in the container does;
                # until then a connection is accepted and closed or reset.
                if time.monotonic() >= deadline:
                    results.append(
                        {"port": port, "ok": False, "error": repr(e), "attempts": attempts}
                    )
                    break
                time.sleep(0.1)
                continue
            results.append(
                {
                    "port": port,
                    "ok": status == 200,
                    "status": status,
                    "body": body.decode(errors="replace"),
                    "attempts": attempts,
                }
            )
            break
    return {"host": args.host, "results": results}


def cmd_udp(args: argparse.Namespace) -> dict:
    fam = family_of(args.host)
    clients = []
    try:
        for _ in range(args.clients):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.connect((args.host, args.port))
            clients.append(s)
        ports = [s.getsockname()[1] for s in clients]
        deadline = time.monotonic() + args.deadline
        failures = []
        echoed = 0
        # Interleave the clients so the proxy has to keep their flows apart.
        for seq in range(args.count):
            for idx, s in enumerate(clients):
                payload = f"client {idx} port {ports[idx]} seq {seq} ".encode() * 3
                got = None
                while got is None and time.monotonic() < deadline:
                    try:
                        s.send(payload)
                        s.settimeout(args.timeout)
                        while True:
                            reply = s.recv(65536)
                            if reply == payload:
                                got = reply
                                break
                            # A late echo of an earlier retry: keep reading.
                    except TimeoutError:
                        continue
                    except ConnectionRefusedError:
                        time.sleep(0.05)
                        continue
                if got is None:
                    failures.append({"client": idx, "seq": seq, "error": "no echo before deadline"})
                else:
                    echoed += 1
        return {
            "host": args.host,
            "source_ports": ports,
            "sent": args.clients * args.count,
            "echoed": echoed,
            "failures": failures,
        }
    finally:
        for s in clients:
            s.close()


def cmd_hold(args: argparse.Namespace) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", args.port))
    s.listen(16)
    print("ready", flush=True)
    # Stay until the test closes our stdin (or dies, which closes it too).
    sys.stdin.read()
    s.close()


def cmd_bind(args: argparse.Namespace) -> dict:
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    out = {}
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, kind)
        try:
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if kind == socket.SOCK_STREAM:
                # What every TCP server (and the proxy) sets: TIME_WAIT
                # leftovers must not count as "in use", a live listener must.
                # Never for UDP, where it would let two sockets share a port.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, args.port))
            if kind == socket.SOCK_STREAM:
                s.listen(1)
            out[host] = "ok"
        except OSError as e:
            out[host] = f"{type(e).__name__}: {e.strerror or e}"
        finally:
            s.close()
    return out


def cmd_bind_many(args: argparse.Namespace) -> dict:
    """Bind (and release) each HOST:PORT; list the ones that are still taken."""
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    taken = []
    for host in args.hosts.split(","):
        for port in args.ports:
            with socket.socket(family_of(host), kind) as s:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError as e:
                    taken.append(f"{host} {port}: {e.strerror or e}")
    return {"taken": taken}


def cmd_wait_accept(args: argparse.Namespace) -> dict:
    """After `go` on stdin: the time until every port accepts a TCP connection."""
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    left = list(args.ports)
    deadline = t0 + args.deadline
    while left and time.monotonic() < deadline:
        still = []
        for port in left:
            with socket.socket(family_of(args.host), socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect((args.host, port))
                except OSError:
                    still.append(port)
        left = still
        if left:
            time.sleep(0.002)
    return {"elapsed": time.monotonic() - t0, "left": left}


def cmd_tcp_states(args: argparse.Namespace) -> dict:
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == args.port:
                    states.append(TCP_STATES.get(fields[3], fields[3]))
    return {"port": args.port, "states": states}


def cmd_kill_under_load(args: argparse.Namespace) -> dict:
    targets = [(h, p) for h in args.hosts.split(",") for p in args.ports]
    killed_at: list[float] = []
    stop = threading.Event()
    before = dict.fromkeys(targets, 0)
    recovered: dict[tuple[str, int], float] = {}
    errors: dict[tuple[str, int], list[str]] = {t: [] for t in targets}

    def worker(target: tuple[str, int]) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _ = http_get_once(*target, args.timeout)
                ok = status == 200
            except OSError as e:
                ok = False
                if len(errors[target]) < 5:
                    errors[target].append(repr(e))
            done = time.monotonic()
            if not ok:
                time.sleep(0.005)
                continue
            if not killed_at:
                before[target] += 1
            elif started >= killed_at[0]:
                recovered[target] = done - killed_at[0]
                return

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.deadline
    # Load first: every mapping has answered a few times before the kill.
    while min(before.values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    killed_at.append(time.monotonic())
    os.kill(args.pid, signal.SIGKILL)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()

    def key(t: tuple[str, int]) -> str:
        return f"{t[0]} {t[1]}"

    return {"before": {key(t): n for t, n in before.items()},
            "recovered": {key(t): v for t, v in recovered.items()},
            "missing": [key(t) for t in targets if t not in recovered],
            "errors": {key(t): v for t, v in errors.items() if v}}


def cmd_open_request(args: argparse.Namespace) -> None:
    with socket.create_connection((args.host, args.port), timeout=10) as s:
        # An unfinished request: the server waits for the rest, the
        # connection stays open with bytes already relayed.
        s.sendall(b"GET / HTTP/1.0\r\nX-Filler: " + b"x" * 4000 + b"\r\n")
        print("ready", flush=True)
        sys.stdin.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("http")
    p.add_argument("host")
    p.add_argument("ports", type=int, nargs="+")
    p.add_argument("--timeout", type=float, default=3.0, help="per-attempt socket timeout")
    p.add_argument("--deadline", type=float, default=15.0, help="overall retry budget")
    p.set_defaults(func=cmd_http)

    p = sub.add_parser("udp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--timeout", type=float, default=0.5, help="wait for one echo")
    p.add_argument("--deadline", type=float, default=15.0)
    p.set_defaults(func=cmd_udp)

    p = sub.add_parser("hold")
    p.add_argument("port", type=int)
    p.set_defaults(func=cmd_hold)

    p = sub.add_parser("bind")
    p.add_argument("proto", choices=("tcp", "udp"))
    p.add_argument("port", type=int)
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("bind-many")
    p.add_argument("proto", choices=("tcp", "udp"))
    p.add_argument("hosts", help="comma-separated")
    p.add_argument("ports", type=int, nargs="+")
    p.set_defaults(func=cmd_bind_many)

    p = sub.add_parser("wait-accept")
    p.add_argument("host")
    p.add_argument("ports", type=int, nargs="+")
    p.add_argument("--deadline", type=float, default=60.0)
    p.set_defaults(func=cmd_wait_accept)

    p = sub.add_parser("tcp-states")
    p.add_argument("port", type=int)
    p.set_defaults(func=cmd_tcp_states)

    p = sub.add_parser("kill-under-load")
    p.add_argument("hosts", help="comma-separated")
    p.add_argument("pid", type=int)
    p.add_argument("ports", type=int, nargs="+")
    p.add_argument("--timeout", type=float, default=3.0, help="per-request socket timeout")
    p.add_argument("--deadline", type=float, default=20.0)
    p.set_defaults(func=cmd_kill_under_load)

    p = sub.add_parser("open-request")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.set_defaults(func=cmd_open_request)

    args = parser.parse_args()
    result = args.func(args)
    if result is not None:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
