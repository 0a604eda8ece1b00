"""The client / host / container network namespaces a published port crosses.

With the default subnet 198.18.1.0/24, split in two halves, one per link:

client (198.18.1.1) --veth-- host (198.18.1.2 | 198.18.1.129) --veth-- container (198.18.1.130)

Namespaces are named <prefix><pid>-{cli,host,ctr} (prefix `spb-` by default);
stale ones whose owner pid is gone are removed at start, and every exit path
(finally, atexit, SIGTERM, SIGHUP, Ctrl-C) tears the live ones down, killing
whatever still runs inside.  Before anything is created, `check_free` refuses
a subnet that an address or route of the host already overlaps, and a prefix
that a live namespace already carries (another run), with a message instead
of a half-built topology.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass

from spliceproxy.bench import procs

PREFIX = "spb-"
SUBNET = "198.18.1.0/24"
NETNS_DIR = "/var/run/netns"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class ConfigError(ValueError):
    """A subnet or namespace prefix that cannot be used (message for the user)."""


@dataclass(frozen=True)
class AddressPlan:
    """The four addresses of the two links, carved from one subnet."""

    subnet: str
    client: str
    host_ext: str
    host_int: str
    container: str
    prefixlen: int  # of each link (half the subnet)


def plan(subnet: str) -> AddressPlan:
    """Split an IPv4 subnet in two halves, one per veth link (each needs two hosts)."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError("invalid subnet %r: %s" % (subnet, exc)) from None
    if net.version != 4:
        raise ConfigError("subnet %s: only IPv4 subnets are supported" % subnet)
    if net.prefixlen > 29:
        raise ConfigError("subnet %s is too small: need at least a /29 (two links of two "
                          "hosts)" % subnet)
    a, b = net.subnets(prefixlen_diff=1)
    ha, hb = list(a.hosts())[:2], list(b.hosts())[:2]
    return AddressPlan(str(net), str(ha[0]), str(ha[1]), str(hb[0]), str(hb[1]), a.prefixlen)


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix or ""):
        raise ConfigError("invalid namespace prefix %r: 1-32 characters from A-Z a-z 0-9 _ . -"
                          % prefix)
    return prefix


def _ip_json(*args: str) -> list:
    try:
        cp = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ConfigError("`ip` (iproute2) is not installed") from None
    if cp.returncode != 0:
        raise ConfigError("ip %s failed: %s" % (" ".join(args), cp.stderr.strip()))
    try:
        return json.loads(cp.stdout or "[]")
    except ValueError:
        return []


def subnet_conflicts(subnet: str) -> list[str]:
    """Addresses and routes of this (the host's) namespace that overlap subnet."""
    net = ipaddress.ip_network(subnet)
    found = []
    for link in _ip_json("-4", "addr", "show"):
        for ai in link.get("addr_info", []):
            local = ai.get("local")
            if local and ipaddress.ip_address(local) in net:
                found.append("address %s/%s on %s" % (local, ai.get("prefixlen", "?"),
                                                      link.get("ifname", "?")))
    for rt in _ip_json("-4", "route", "show", "table", "all"):
        dst = rt.get("dst")
        if not dst or dst == "default":
            continue  # a default route overlaps everything and is not a use of the range
        try:
            rnet = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if rnet.prefixlen and rnet.overlaps(net):
            where = " dev %s" % rt["dev"] if rt.get("dev") else ""
            table = " table %s" % rt["table"] if rt.get("table") not in (None, "main") else ""
            found.append("route %s%s%s" % (dst, where, table))
    return found


def prefix_conflicts(prefix: str) -> list[str]:
    if not os.path.isdir(NETNS_DIR):
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def check_free(subnet: str, prefix: str) -> None:
    """Raise ConfigError when the subnet or the namespace prefix is already in use."""
    check_prefix(prefix)
    plan(subnet)
    clash = subnet_conflicts(subnet)
    if clash:
        raise ConfigError("subnet %s is already in use on this host (%s); choose another "
                          "with --subnet" % (subnet, "; ".join(clash[:5])))
    names = prefix_conflicts(prefix)
    if names:
        raise ConfigError("network namespace(s) with prefix %r already exist (%s): another "
                          "run is using it; choose another with --netns-prefix"
                          % (prefix, ", ".join(names[:5])))

_live: list[Topology] = []
_lock = threading.Lock()
_handlers_installed = False


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, capture_output=True, text=True,
                        timeout=30)
    if check and cp.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), cp.stderr.strip()))
    return cp


def _ns_pids(name: str) -> list[int]:
    cp = _run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def _remove_ns(name: str) -> None:
    for pid in _ns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _run(["ip", "netns", "delete", name], check=False)


def _lookup(ns, ifname: str, timeout: float = 5.0) -> int:
    """Index of ifname; a veth peer created in another namespace shows up asynchronously."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = ns.link_lookup(ifname=ifname)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise RuntimeError("interface %s did not appear" % ifname)
        time.sleep(0.02)


# The bench's namespace names after <prefix><pid>: [-<tag>]-{cli,host,ctr}.
BENCH_TAIL = r"(?:-.+)?-(?:cli|host|ctr)"


def clean_stale(prefix: str = PREFIX, tail: str = BENCH_TAIL) -> list[str]:
    """Remove <prefix><pid><tail> namespaces whose creating process no longer
    exists, killing whatever still runs in them.

    Only names of exactly that shape (tail a regular expression; the bench's
    by default, the dockerd suite passes its own): a namespace that merely
    starts with the prefix belongs to someone else and is left alone
    (check_free then refuses the prefix).
    """
    removed = []
    if not os.path.isdir(NETNS_DIR):
        return removed
    shape = re.compile(re.escape(prefix) + r"(\d+)" + tail)
    for name in sorted(os.listdir(NETNS_DIR)):
        m = shape.fullmatch(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and procs.alive(pid):
            continue
        if pid == os.getpid() and any(name in t.names for t in _live):
            continue
        _remove_ns(name)
        removed.append(name)
    return removed


def _teardown_all() -> None:
    with _lock:
        tops = list(_live)
    for t in tops:
        if t.owner == os.getpid():  # not in a forked helper (pyroute2 forks some)
            t.teardown()


def _on_signal(signum, frame):
    if not any(t.owner == os.getpid() for t in _live):
        os._exit(128 + signum)
    _teardown_all()
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
    _handlers_installed = True


class Topology:
    """Three namespaces and two veth pairs; iptables DNAT rules in host."""

    def __init__(self, tag: str = "", *, subnet: str = SUBNET, prefix: str = PREFIX):
        self.prefix = check_prefix(prefix)
        self.addr = plan(subnet)
        base = "%s%d%s" % (prefix, os.getpid(), ("-" + tag) if tag else "")
        self.client = base + "-cli"
        self.host = base + "-host"
        self.container = base + "-ctr"
        self.names = (self.client, self.host, self.container)
        self.owner = os.getpid()
        self.up = False

    def setup(self) -> Topology:
        from pyroute2 import NetNS, netns

        _install_handlers()
        clean_stale(self.prefix)
        check_free(self.addr.subnet, self.prefix)
        with _lock:
            _live.append(self)
        self.up = True
        for name in self.names:
            netns.create(name)
        with NetNS(self.client) as ns:
            ns.link("add", ifname="cli0", kind="veth",
                    peer={"ifname": "hc0", "net_ns_fd": self.host})
        with NetNS(self.host) as ns:
            ns.link("add", ifname="hk0", kind="veth",
                    peer={"ifname": "ctr0", "net_ns_fd": self.container})
        a = self.addr
        layout = {
            self.client: [("cli0", a.client)],
            self.host: [("hc0", a.host_ext), ("hk0", a.host_int)],
            self.container: [("ctr0", a.container)],
        }
        for name, addrs in layout.items():
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                for ifname, ip in addrs:
                    idx = _lookup(ns, ifname)
                    ns.addr("add", index=idx, address=ip, prefixlen=a.prefixlen)
                    ns.link("set", index=idx, state="up")
                if name == self.client:
                    ns.route("add", dst="0.0.0.0/0", gateway=a.host_ext)
                elif name == self.container:
                    ns.route("add", dst="0.0.0.0/0", gateway=a.host_int)
        self.sysctl(self.host, "net.ipv4.ip_forward", "1")
        # The measuring client must not run out of ports; the host (where the
        # proxies connect from) keeps the kernel defaults a real host has.
        self.sysctl(self.client, "net.ipv4.ip_local_port_range", "1024 65535")
        self.sysctl(self.client, "net.ipv4.tcp_tw_reuse", "1")
        for name in self.names:
            self.sysctl(name, "net.core.somaxconn", "65535")
        return self

    def sysctl(self, ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "%s=%s" % (key, value)])

    def iptables(self, *args: str) -> None:
        _run(["ip", "netns", "exec", self.host, "iptables", "-w", *args])

    def add_dnat(self, proto: str, port: int, to_ip: str, to_port: int) -> None:
        """Docker's rule for an external client: DNAT in PREROUTING, then forward."""
        self.iptables("-t", "nat", "-A", "PREROUTING", "-d", self.addr.host_ext, "-p", proto,
                      "--dport", str(port), "-j", "DNAT",
                      "--to-destination", "%s:%d" % (to_ip, to_port))

    def add_local_dnat(self, proto: str, port: int, to_ip: str, to_port: int) -> None:
        """dockerd's rules for a host-local client with the userland proxy off.

        With `--userland-proxy=false` dockerd makes loopback clients reach the
        container by NAT: DNAT in nat OUTPUT for connections to a local
        address (127.0.0.1 included) and the published port, route_localnet
        on the bridge so a 127.0.0.0/8 source may leave through it, and
        MASQUERADE for such sources on the way out (the container cannot
        answer 127.0.0.1).  hk0 is the host's bridge side here.
        """
        if not getattr(self, "_local_nat", False):
            self.sysctl(self.host, "net.ipv4.conf.hk0.route_localnet", "1")
            self.iptables("-t", "nat", "-A", "POSTROUTING", "-s", "127.0.0.0/8", "-o", "hk0",
                          "-m", "addrtype", "--src-type", "LOCAL", "-j", "MASQUERADE")
            self._local_nat = True
        self.iptables("-t", "nat", "-A", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL",
                      "-p", proto, "--dport", str(port), "-j", "DNAT",
                      "--to-destination", "%s:%d" % (to_ip, to_port))

    def teardown(self) -> None:
        if self.owner != os.getpid():
            return
        with _lock:
            if self in _live:
                _live.remove(self)
        if not self.up:
            return
        self.up = False
        for name in self.names:
            if os.path.exists(os.path.join(NETNS_DIR, name)):
                _remove_ns(name)

    def __enter__(self) -> Topology:
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


def ns_fd(name: str) -> int:
    return os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def in_netns(name: str | None):
    """Run the block with the calling thread in netns `name` (None: stay)."""
    if name is None:
        yield
        return
    from spliceproxy.bench.loadgen import check, load

    _ffi, lib = load()
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fd = ns_fd(name)
    try:
        check(lib.lg_setns(fd), "setns " + name)
        try:
            yield
        finally:
            check(lib.lg_setns(back), "setns back")
    finally:
        os.close(fd)
        os.close(back)


def child_preexec(netns_name: str | None):
    """A preexec_fn that enters netns_name and asks for SIGTERM when we die (as dockerd)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = -1
    if netns_name:
        # Keep it clear of fds 3 and 4, which the launcher dup2()s into place.
        low = ns_fd(netns_name)
        fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 64)
        os.close(low)

    def pre():
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if fd >= 0 and libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            os._exit(121)

    pre.fd = fd
    return pre
