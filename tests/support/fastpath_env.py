"""The setting the kernel fast-path tests share: a "container", a child cgroup
and clients started inside it.

- ``Container``: a network namespace joined to this one by a veth pair, with
  an IPv4 and an IPv6 address on each end (``<net4>.1``/``<net6>::1`` here,
  ``.2``/``::2`` there), TCP echo servers (``servers.EchoServer``) and UDP
  echoes (``servers.UdpEcho``) on both of its addresses, made by a thread that
  entered the namespace (a socket keeps the namespace it was made in), and
  optionally a second, unrelated namespace.
- ``child_cgroup``: a cgroup v2 directory below the root for one test, which
  only the test's client processes join: the programs attached to it rewrite
  nothing else on the host.
- ``run_client``: one client process, moved into that cgroup before it execs
  (and into a namespace with ``ip netns exec``), whose last line of output is
  JSON.

Names carry the caller's prefix and this process's pid, so the namespace
check of ``support.guard`` attributes them to this run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from spliceproxy import fastpath

from support import servers as srv

CLONE_NEWNET = 0x40000000
TIMEOUT = 10.0
# Moves the shell into the cgroup ($0), then becomes the command.
LAUNCH = 'echo $$ > "$0/cgroup.procs" && exec "$@"'

_libc = ctypes.CDLL(None, use_errno=True)


def skip_reason() -> str | None:
    """Why the fast-path tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, bpf)"
    if fastpath.default_cgroup_path() is None:
        return "cgroup v2 is not mounted"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    if not os.path.exists("/proc/net/if_inet6"):
        return "needs IPv6"
    return None


# A sanitizer runtime preloaded into the test run (.ci/sanitizers) is there
# for the engine; the system's own tools (iproute2, iptables, nft, sysctl)
# run without it, or it aborts them on faults of their own (iproute2's
# print_route trips ASan's strncpy overlap check).
_SANITIZER_VARS = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS")


def tool_env() -> dict[str, str]:
    """This process's environment for a system tool: without a sanitizer runtime."""
    return {k: v for k, v in os.environ.items() if k not in _SANITIZER_VARS}


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if not check else None, env=tool_env())


def _enter(name: str) -> None:
    fd = os.open("/run/netns/" + name, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def in_netns(name: str, fn):
    """Run fn() in a thread that entered netns ``name``; return its result.
    (Network namespaces are per thread; sockets keep the one they were made in.)"""
    out: dict = {}

    def run():
        try:
            _enter(name)
            out["v"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the caller
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT)
    if "e" in out:
        raise out["e"]
    return out["v"]


class Container:
    """The container side: a namespace behind a veth pair, echo servers in it.

        with Container("fp", "198.18.208", "2001:2:0:d0", 7007) as c:
            c.cont4, c.host6, c.accepted, c.udp4.snapshot()
    """

    def __init__(self, prefix: str, net4: str, net6: str, port: int, other: bool = False):
        pid = os.getpid()
        self.ns = "%s-c-%d" % (prefix, pid)
        self.other_ns = "%s-o-%d" % (prefix, pid) if other else None
        self.veth_host, self.veth_cont = "%s-h%d" % (prefix, pid), "%s-c%d" % (prefix, pid)
        self.host4, self.cont4 = net4 + ".1", net4 + ".2"
        self.host6, self.cont6 = net6 + "::1", net6 + "::2"
        self.port = port
        self.tcp: list[srv.EchoServer] = []
        self.udp: list[srv.UdpEcho] = []

    @property
    def accepted(self) -> int:
        """Connections the container's TCP servers accepted, both families."""
        return sum(s.accepted for s in self.tcp)

    @property
    def udp4(self) -> srv.UdpEcho:
        return self.udp[0]

    def __enter__(self) -> Container:
        ip("netns", "add", self.ns)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        ns = self.ns
        if self.other_ns:
            ip("netns", "add", self.other_ns)
            ip("-n", self.other_ns, "link", "set", "lo", "up")
        ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_cont)
        ip("link", "set", self.veth_cont, "netns", ns)
        ip("addr", "add", self.host4 + "/24", "dev", self.veth_host)
        ip("addr", "add", self.host6 + "/64", "dev", self.veth_host, "nodad")
        ip("link", "set", self.veth_host, "up")
        ip("-n", ns, "addr", "add", self.cont4 + "/24", "dev", self.veth_cont)
        ip("-n", ns, "addr", "add", self.cont6 + "/64", "dev", self.veth_cont, "nodad")
        ip("-n", ns, "link", "set", self.veth_cont, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        for addr in (self.cont4, self.cont6):
            self.tcp.append(in_netns(ns, lambda a=addr: srv.EchoServer(a, self.port, 64)))
            self.udp.append(in_netns(ns, lambda a=addr: srv.UdpEcho(a, self.port)))

    def close(self) -> None:
        for s in self.tcp + self.udp:
            s.close()
        self.tcp, self.udp = [], []
        ip("link", "del", self.veth_host, check=False)
        if self.other_ns:
            ip("netns", "del", self.other_ns, check=False)
        ip("netns", "del", self.ns, check=False)


@contextlib.contextmanager
def child_cgroup(prefix: str):
    """A cgroup v2 directory ``<root>/<prefix>-<pid>-<ns>`` for one test; removed
    after (waiting for its last client to leave it)."""
    root = fastpath.default_cgroup_path()
    assert root is not None
    path = os.path.join(root, "%s-%d-%d" % (prefix, os.getpid(), time.monotonic_ns()))
    os.mkdir(path)
    try:
        yield path
    finally:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                os.rmdir(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def fixtures(net: Container, cgroup_prefix: str):
    """The two fixtures of a fast-path test module, to bind at its top level:
    ``container`` (net, for the whole module) and ``cgroup`` (a child_cgroup
    of cgroup_prefix for each test)::

        container, cgroup = fe.fixtures(NET, "fp-test")
    """

    @pytest.fixture(scope="module", name="container")
    def container():
        with net as c:
            yield c

    @pytest.fixture(name="cgroup")
    def cgroup():
        with child_cgroup(cgroup_prefix) as path:
            yield path

    return container, cgroup


def nothing_left_behind(prefix: str, cgroups: tuple[str, ...], programs: bool = False) -> None:
    """What a fast-path test module must leave when it ends: no namespace
    ``<prefix>-*-<pid>`` (a Container's), no cgroup right below the root whose
    name starts with one of ``cgroups``, and with ``programs`` no fast-path
    program loaded (waiting TIMEOUT for the last to go) unless other work on
    the host holds some."""
    if programs:
        deadline = time.monotonic() + TIMEOUT
        while fastpath.programs_loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fastpath.programs_loaded() == 0 or attached_elsewhere(cgroups), \
            "fast-path programs left loaded"
    assert not [n for n in os.listdir(fastpath.default_cgroup_path()) if n.startswith(cgroups)]
    left = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    pid = "-%d" % os.getpid()
    assert not [n for n in left if n.startswith(prefix + "-") and n.endswith(pid)]


def attached_elsewhere(exclude: tuple[str, ...]) -> dict[str, int]:
    """Cgroups right below the cgroup v2 root whose names start with none of
    ``exclude`` (this run's) and that have fast-path hooks attached: other work
    on the host (a benchmark's fast path, another test run) holding programs,
    which a check of fastpath.programs_loaded() must not count as ours."""
    root = fastpath.default_cgroup_path()
    out: dict[str, int] = {}
    if root is None:
        return out
    for entry in os.scandir(root):
        if not entry.is_dir() or entry.name.startswith(exclude):
            continue
        try:
            n = sum(fastpath.attached(entry.path).values())
        except OSError:
            continue
        if n:
            out[entry.name] = n
    return out


def run_client(script: str, args, cgroup: str | None, netns: str | None = None) -> dict:
    """Run ``python -c script args`` -- in the cgroup when one is given, in netns
    when named -- and return the JSON of its last line of output."""
    argv = [sys.executable, "-c", script, *map(str, args)]
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    if cgroup is not None:
        # Into the cgroup first: `ip netns exec` mounts a fresh /sys without it.
        argv = ["sh", "-c", LAUNCH, cgroup] + argv
    r = subprocess.run(argv, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


# The client: one operation in its own process, which the launcher moved into
# the test's cgroup before exec.  Prints one JSON line.
CLIENT = r"""
import hashlib, json, os, socket, sys
op, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = int(sys.argv[4]) if len(sys.argv) > 4 else 1
bind = sys.argv[5] if len(sys.argv) > 5 else ""
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
payload = os.urandom(size)
out = {}
def addr(a):
    return [a[0], a[1]]
try:
    if op == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        if bind:
            s.bind((bind, 0))
        s.connect((host, port))
        out["peer"] = addr(s.getpeername())
        out["sock"] = addr(s.getsockname())
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            d = s.recv(1 << 16)
            if not d:
                break
            got += d
        out["echo"] = bytes(got) == payload
        out["reply"] = bytes(got[:16]).decode("latin-1")
    elif op in ("udp", "udpc"):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(5)
        if op == "udpc":
            s.connect((host, port))
            out["peer"] = addr(s.getpeername())
            s.send(payload)
            d = s.recv(1 << 16)
        else:
            s.sendto(payload, (host, port))
            d, src = s.recvfrom(1 << 16)
            out["from"] = addr(src)
            out["sock"] = addr(s.getsockname())
        out["echo"] = d == payload
        out["reply"] = d[:16].decode("latin-1")
except OSError as e:
    out["error"] = e.errno
print(json.dumps(out))
"""

def client(cgroup: str | None, op: str, host: str, port: int, size: int = 1, bind: str = "",
           netns: str | None = None) -> dict:
    """One client operation (op: tcp, udp with sendto, udpc on a connected socket)
    of size random bytes to host:port, from bind when given, through run_client;
    its JSON: echo, peer, sock, from, reply, or error (an errno)."""
    return run_client(CLIENT, (op, host, port, size, bind), cgroup, netns)
