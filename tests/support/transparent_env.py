"""The setting the transparent-mode tests share: a client routed through a
"host" to a "container" behind a bridge, each a network namespace of its own.

    client ns            host ns (the engine)              container ns
    <c4>.2 ---veth--- <c4>.1   br0 <b4>.1 ---veth--- <b4>.2  (PeerServer)
                                   \\---veth--- <b4>.3  neighbour ns

The host forwards; the client's and the containers' default routes point at
it, as a Docker host's containers point at their bridge.  ``PeerServer``s in
the container answer every TCP connection and UDP datagram with the address
and port they see it come from.  ``routing`` snapshots what the mode must
leave as it found it: ip rules, every routing table, iptables and ip6tables.
Names carry the prefix and this process's pid (``support.guard``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time

from support.fastpath_env import in_netns, ip, tool_env

IO_TIMEOUT = 5.0


def skip_reason() -> str | None:
    """Why the transparent tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, IP_TRANSPARENT, policy routing)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    if shutil.which("iptables") is None and shutil.which("nft") is None:
        return "needs iptables or nft"
    if not os.path.exists("/proc/net/if_inet6"):
        return "needs IPv6"
    return None


class PeerServer:
    """TCP and UDP servers on (addr, port) that answer "<ip> <port>\\n" of
    their peer: the TCP one per connection (then closes), the UDP one per
    datagram.  Made inside the namespace its caller entered."""

    def __init__(self, addr: str, port: int):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.tcp = socket.socket(fam, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((addr, port))
        self.tcp.listen(256)
        self.udp = socket.socket(fam, socket.SOCK_DGRAM)
        self.udp.bind((addr, port))
        self.seen: list[tuple[str, str, int]] = []  # (proto, ip, port)
        self._stop = False
        self._threads = [threading.Thread(target=f, daemon=True)
                         for f in (self._serve_tcp, self._serve_udp)]
        for t in self._threads:
            t.start()

    def _serve_tcp(self) -> None:
        while not self._stop:
            try:
                c, peer = self.tcp.accept()
            except OSError:
                return
            with c:
                self.seen.append(("tcp", peer[0], peer[1]))
                with contextlib.suppress(OSError):
                    c.sendall(b"%s %d\n" % (peer[0].encode(), peer[1]))

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                data, peer = self.udp.recvfrom(2048)
            except OSError:
                return
            if self._stop or peer is None:  # woken by close()
                return
            self.seen.append(("udp", peer[0], peer[1]))
            with contextlib.suppress(OSError):
                self.udp.sendto(b"%s %d\n" % (peer[0].encode(), peer[1]), peer)

    def close(self) -> None:
        self._stop = True
        for s in (self.tcp, self.udp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(2.0)


def ask_tcp(host: str, port: int, n: int = 1) -> list[tuple[str, int, int]]:
    """n sequential connections: (address the server saw, port it saw, our port)."""
    out = []
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(n):
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(IO_TIMEOUT)
            s.connect((host, port))
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            seen_ip, seen_port = data.decode().split()
            out.append((seen_ip, int(seen_port), s.getsockname()[1]))
    return out


def ask_udp(host: str, port: int) -> tuple[str, int, int]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(IO_TIMEOUT)
        s.connect((host, port))
        for _ in range(3):
            s.send(b"who")
            try:
                data = s.recv(256)
                break
            except TimeoutError:
                continue
        else:
            raise TimeoutError("no answer from %s port %d" % (host, port))
        seen_ip, seen_port = data.decode().split()
        return seen_ip, int(seen_port), s.getsockname()[1]


class Topology:
    """The four namespaces above; ``with Topology("tpe", "198.18.82", "198.18.83",
    "fd00:82::1", "fd00:82::2", 8080) as t: t.client4, t.cont4, ...``"""

    def __init__(self, prefix: str, c4: str, b4: str, c6: str, b6: str, port: int):
        pid = os.getpid()
        self.host = "%s-h-%d" % (prefix, pid)
        self.client = "%s-cl-%d" % (prefix, pid)
        self.cont = "%s-ct-%d" % (prefix, pid)
        self.neigh = "%s-nb-%d" % (prefix, pid)
        self.host4, self.client4 = c4 + ".1", c4 + ".2"
        self.bridge4, self.cont4, self.neigh4 = b4 + ".1", b4 + ".2", b4 + ".3"
        self.host6, self.client6 = c6 + ":1", c6 + ":2"
        self.bridge6, self.cont6, self.neigh6 = b6 + ":1", b6 + ":2", b6 + ":3"
        self.port = port
        self.servers: list[PeerServer] = []

    def __enter__(self) -> Topology:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        h = self.host
        for ns in (h, self.client, self.cont, self.neigh):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        # No duplicate address detection: the link-local addresses (and
        # their routes) are there at once, not a moment into a snapshot.
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                    "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"):
            subprocess.run(["ip", "netns", "exec", h, "sysctl", "-qw", key], check=True,
                           env=tool_env())
        # client <-> host
        ip("-n", h, "link", "add", "out0", "type", "veth", "peer", "name", "eth0",
           "netns", self.client)
        ip("-n", h, "addr", "add", self.host4 + "/24", "dev", "out0")
        ip("-n", h, "addr", "add", self.host6 + "/112", "dev", "out0", "nodad")
        ip("-n", h, "link", "set", "out0", "up")
        ip("-n", self.client, "addr", "add", self.client4 + "/24", "dev", "eth0")
        ip("-n", self.client, "addr", "add", self.client6 + "/112", "dev", "eth0", "nodad")
        ip("-n", self.client, "link", "set", "eth0", "up")
        ip("-n", self.client, "route", "add", "default", "via", self.host4)
        ip("-n", self.client, "-6", "route", "add", "default", "via", self.host6)
        # the bridge and the containers behind it
        ip("-n", h, "link", "add", "br0", "type", "bridge")
        ip("-n", h, "addr", "add", self.bridge4 + "/24", "dev", "br0")
        ip("-n", h, "addr", "add", self.bridge6 + "/112", "dev", "br0", "nodad")
        ip("-n", h, "link", "set", "br0", "up")
        for i, (ns, a4, a6) in enumerate(((self.cont, self.cont4, self.cont6),
                                         (self.neigh, self.neigh4, self.neigh6))):
            ip("-n", h, "link", "add", "veth%d" % i, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", h, "link", "set", "veth%d" % i, "master", "br0", "up")
            ip("-n", ns, "addr", "add", a4 + "/24", "dev", "eth0")
            ip("-n", ns, "addr", "add", a6 + "/112", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "default", "via", self.bridge4)
            ip("-n", ns, "-6", "route", "add", "default", "via", self.bridge6)
        for addr in (self.cont4, self.cont6):
            self.servers.append(in_netns(self.cont, lambda a=addr: PeerServer(a, self.port)))
        self.settle()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the host's routing stops changing (addresses of links
        just brought up come with routes of their own)."""
        deadline = time.monotonic() + timeout
        last = routing(self.host)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = routing(self.host)
            if now == last and not _out(self.host, ["ip", "-6", "addr", "show", "tentative"]):
                return
            last = now
        raise TimeoutError("the host namespace's routing did not settle")

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.servers = []
        for ns in (self.client, self.cont, self.neigh, self.host):
            ip("netns", "del", ns, check=False)

    def in_client(self, fn):
        return in_netns(self.client, fn)

    def in_host(self, fn):
        return in_netns(self.host, fn)

    def in_neighbour(self, fn):
        return in_netns(self.neigh, fn)


def _out(ns: str | None, argv: list[str]) -> str:
    if ns:
        argv = ["ip", "netns", "exec", ns] + argv
    p = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=tool_env())
    return p.stdout if p.returncode == 0 else ""


def routing(ns: str | None) -> dict[str, list[str]]:
    """What a namespace routes by: ip rules, every table's routes, iptables
    and ip6tables (packet counters and dates left out), nft if installed."""
    snap = {}
    for fam in ("-4", "-6"):
        snap["rule" + fam] = _out(ns, ["ip", fam, "rule", "show"]).splitlines()
        snap["route" + fam] = sorted(_out(ns, ["ip", fam, "route", "show", "table", "all"])
                                     .splitlines())
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            text = _out(ns, [tool])
            snap[tool] = [re.sub(r"\[\d+:\d+\]", "", ln) for ln in text.splitlines()
                          if not ln.startswith("#")]
    if shutil.which("nft"):
        snap["nft"] = [re.sub(r"counter packets \d+ bytes \d+", "counter", ln)
                       for ln in _out(ns, ["nft", "list", "ruleset"]).splitlines()]
    return snap


def difference(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict:
    """{key: (lines gone, lines new)} for every key that differs."""
    out = {}
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k, []), after.get(k, [])
        if a != b:
            out[k] = (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    return out
