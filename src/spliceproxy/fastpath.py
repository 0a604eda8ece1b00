"""Kernel fast path for host-local clients of published ports.

Cgroup socket-address programs (csrc/fastpath.c) rewrite a host-local
connect() -- or unconnected UDP sendmsg() -- to a published host address
and port straight to the container, and make getpeername()/recvfrom() show
the address the client dialled.  The relay keeps serving behind it: a
client the programs leave alone (another network namespace, a 6->4 mapping,
a listener that is gone) reaches the relay's listener exactly as before.

    fp = load()                     # FastPath, or Unavailable (falsy) with a reason
    m = fp.add_mapping("tcp", "0.0.0.0", 8080, "172.17.0.2", 80, listener)
    fp.stats()[m.id]["connections"]
    fp.remove_mapping(m.id)
    fp.close()                      # or let the process die: nothing stays attached

Off by default: SPLICEPROXY_FASTPATH takes Go booleans only, parsed by
spliceproxy.settings like every other setting (parse_setting here for
callers holding a plain environment).
"""

from __future__ import annotations

import os
import socket

SETTING = "SPLICEPROXY_FASTPATH"
# Where cgroup v2 lives: the hybrid layout's unified mount first, then a
# pure v2 host's /sys/fs/cgroup.
CGROUP_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")

_PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def parse_setting(value: str | None) -> bool:
    """The fast-path switch, read as spliceproxy.settings reads every
    boolean: Go's strconv.ParseBool spellings only, unset or empty is off.

    Raises settings.SettingError naming the variable for anything else, so
    a typo never silently changes routing."""
    from spliceproxy import settings

    if value is None or value == "":
        return False
    try:
        return settings.boolean(value)
    except ValueError as e:
        raise settings.SettingError("invalid %s=%r: %s" % (SETTING, value, e)) from None


def enabled(environ=None) -> bool:
    """Whether the environment turns the fast path on (raises SettingError)."""
    env = os.environ if environ is None else environ
    return parse_setting(env.get(SETTING))


class Unavailable:
    """Why the fast path is off; falsy, so `if fp:` reads naturally.

    kind: "kernel", "cgroup", "permission", "verifier", "other" or "module"
    (the extension is missing); log: the verifier's log when it spoke."""

    def __init__(self, kind: str, reason: str, log: str = ""):
        self.kind = kind
        self.reason = reason
        self.log = log

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return "fast path unavailable (%s): %s" % (self.kind, self.reason)

    def __repr__(self) -> str:
        return "Unavailable(%r, %r)" % (self.kind, self.reason)


def _is_cgroup2(path: str) -> bool:
    # cgroup.controllers exists only in cgroup v2 directories.
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def default_cgroup_path() -> str | None:
    """The host's cgroup v2 root, or None when cgroup v2 is not mounted."""
    for path in CGROUP_CANDIDATES:
        if _is_cgroup2(path):
            return path
    return None


def cgroup_path(conf) -> str | None:
    """The cgroup the host engine attaches to: SPLICEPROXY_FASTPATH_CGROUP
    (settings.Settings, checked there to be a cgroup v2 directory), else the
    cgroup v2 root; None when cgroup v2 is not mounted."""
    return conf.fastpath_cgroup or default_cgroup_path()


def load(cgroup_path: str | None = None) -> FastPath | Unavailable:
    """Load and attach the programs for this process's network namespace.

    Never raises for an environment that cannot have it (old kernel, no
    cgroup v2, no privilege): the caller logs the Unavailable once and
    serves through the relay."""
    try:
        from spliceproxy import _fastpath
    except ImportError as e:  # a build without the extension
        return Unavailable("module", "the fast-path extension is missing: %s" % e)
    if cgroup_path is None:
        cgroup_path = default_cgroup_path()
        if cgroup_path is None:
            return Unavailable("cgroup", "cgroup v2 is not mounted (looked at %s)"
                               % ", ".join(CGROUP_CANDIDATES))
    try:
        programs = _fastpath.Programs(cgroup_path)
    except _fastpath.LoadError as e:
        return Unavailable(e.kind, e.what, e.log)
    return FastPath(programs, cgroup_path)


# ---------------------------------------------------------------------------
# Local addresses, for mappings on a wildcard host address.

def local_addresses(family: int) -> list[str]:
    """This namespace's own addresses of one family (no link-local IPv6).

    A wildcard mapping gets one entry per address; the engine keeps them
    current with add_address()/remove_address() as addresses come and go."""
    if family == socket.AF_INET:
        return _local_v4()
    return _local_v6()


def _proc_net(name: str) -> str:
    # /proc/net shows the main thread's namespace; thread-self the caller's
    # (a thread that entered the host namespace reads the host's addresses).
    own = os.path.join("/proc/thread-self/net", name)
    return own if os.path.exists(own) else os.path.join("/proc/net", name)


def _local_v4() -> list[str]:
    # The "Local:" table of the FIB lists every address this host owns as
    # "/32 host LOCAL" under its "|-- a.b.c.d" line.
    out: list[str] = []
    table = None
    last = None
    with open(_proc_net("fib_trie")) as f:
        for line in f:
            if line and not line[0].isspace():
                table = line.strip().rstrip(":")
                continue
            text = line.strip()
            if text.startswith("|--"):
                last = text[3:].strip()
            elif table == "Local" and text.startswith("/32 host LOCAL") and last:
                if last not in out:
                    out.append(last)
    return out


def _local_v6() -> list[str]:
    out: list[str] = []
    try:
        f = open(_proc_net("if_inet6"))
    except FileNotFoundError:  # IPv6 disabled
        return out
    with f:
        for line in f:
            fields = line.split()
            if len(fields) < 6:
                continue
            scope, flags = int(fields[3], 16), int(fields[4], 16)
            if scope == 0x20 or flags & (0x40 | 0x08):  # link-local; tentative, dadfailed
                continue
            addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
            if addr not in out:
                out.append(addr)
    return out


def _unmapped(ip: str) -> str:
    """::ffff:a.b.c.d is IPv4, as docker-proxy (Go's To4) reads it."""
    if ip.lower().startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _packed(ip: str) -> bytes:
    try:
        return socket.inet_pton(_family(ip), ip)
    except OSError:
        raise ValueError("not an IP address: %r" % ip) from None


def _is_wildcard(ip: str) -> bool:
    return _packed(ip) == bytes(len(_packed(ip)))


class Mapping:
    """One published port as the fast path knows it."""

    def __init__(self, mapping_id: int, proto: str, host_ip: str, host_port: int,
                 container_ip: str, container_port: int, listener_fd: int):
        self.id = mapping_id
        self.proto = proto
        self.host_ip = host_ip
        self.host_port = host_port
        self.container_ip = container_ip
        self.container_port = container_port
        self.listener_fd = listener_fd
        self.addresses: list[str] = []   # host addresses with an entry
        self.reason = ""                  # why there are none, when there are none
        self.retired = [0, 0]             # counts of entries already removed

    @property
    def wildcard(self) -> bool:
        return _is_wildcard(self.host_ip)

    def __repr__(self) -> str:
        return "Mapping(%d, %s %s:%d -> %s:%d, %d entries)" % (
            self.id, self.proto, self.host_ip, self.host_port, self.container_ip,
            self.container_port, len(self.addresses))


class FastPath:
    """The attached programs and the mappings they serve."""

    def __init__(self, programs, cgroup_path: str):
        self._p = programs
        self.cgroup_path = cgroup_path
        self._mappings: dict[int, Mapping] = {}
        self._next_id = 1

    def __bool__(self) -> bool:
        return True

    def __enter__(self) -> FastPath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def netns_cookie(self) -> int:
        return self._p.netns_cookie

    @property
    def programs(self):
        """The low-level binding (spliceproxy._fastpath.Programs)."""
        return self._p

    def mappings(self) -> list[Mapping]:
        return list(self._mappings.values())

    def add_mapping(self, proto: str, host_ip: str, host_port: int, container_ip: str,
                    container_port: int, listener) -> Mapping:
        """Serve one published port; ``listener`` is the relay's own listening
        socket (or its fd) for it, whose tag vouches for the entries.

        Returns the Mapping; its ``addresses`` is empty, with ``reason`` set,
        when the fast path cannot serve it (6->4 and 4->6 stay on the relay)."""
        if proto not in _PROTOS:
            raise ValueError("protocol must be tcp or udp, not %r" % proto)
        host_ip, container_ip = _unmapped(host_ip), _unmapped(container_ip)
        for port in (host_port, container_port):
            if not 1 <= int(port) <= 65535:
                raise ValueError("port out of range: %r" % port)
        if _is_wildcard(container_ip):
            raise ValueError("container address must be concrete: %r" % container_ip)
        fd = listener if isinstance(listener, int) else listener.fileno()
        m = Mapping(self._next_id, proto, host_ip, int(host_port), container_ip,
                    int(container_port), fd)
        if _family(host_ip) != _family(container_ip):
            m.reason = "IPv%s clients to an IPv%s container stay on the relay" % (
                "6" if _family(host_ip) == socket.AF_INET6 else "4",
                "6" if _family(container_ip) == socket.AF_INET6 else "4")
            self._next_id += 1
            self._mappings[m.id] = m
            return m
        self._p.tag(fd, m.id)
        self._next_id += 1
        self._mappings[m.id] = m
        try:
            addrs = local_addresses(_family(host_ip)) if m.wildcard else [host_ip]
            for addr in addrs:
                self._add_entry(m, addr)
        except BaseException:
            self.remove_mapping(m.id)
            raise
        if not m.addresses:
            m.reason = "no local address to serve"
        return m

    def _key(self, m: Mapping, addr: str) -> tuple:
        return (_family(addr), _packed(addr), m.host_port, _PROTOS[m.proto])

    def _add_entry(self, m: Mapping, addr: str) -> None:
        if addr in m.addresses:
            return
        self._p.entry_add(*self._key(m, addr), _packed(m.container_ip), m.container_port, m.id)
        m.addresses.append(addr)

    def add_address(self, mapping_id: int, addr: str) -> bool:
        """A local address appeared: serve it if the mapping is a wildcard of
        its family.  Returns whether an entry was added."""
        m = self._mappings[mapping_id]
        if not m.wildcard or m.reason.startswith("IPv") or _family(addr) != _family(m.host_ip):
            return False
        if _is_wildcard(addr):
            raise ValueError("a wildcard address never gets an entry")
        self._add_entry(m, addr)
        m.reason = ""
        return True

    def remove_address(self, mapping_id: int, addr: str) -> None:
        """A local address went away: drop its entry, keeping its counts."""
        m = self._mappings[mapping_id]
        if addr not in m.addresses:
            return
        key = self._key(m, addr)
        try:
            _, conns, dgrams = self._p.entry_get(*key)
            m.retired[0] += conns
            m.retired[1] += dgrams
        except OSError:
            pass
        self._p.entry_del(*key)
        m.addresses.remove(addr)

    def remove_mapping(self, mapping_id: int) -> None:
        """Stop serving a mapping: its entries go first, then its tag."""
        m = self._mappings.get(mapping_id)
        if m is None:
            return
        for addr in list(m.addresses):
            try:
                self.remove_address(mapping_id, addr)
            except OSError:
                pass
        try:
            self._p.untag(m.listener_fd)
        except OSError:
            pass  # the listener is closed already: its tag went with it
        del self._mappings[mapping_id]

    def apply(self, events) -> None:
        """Apply AddressWatch.read() events to every wildcard mapping; None
        (events lost) re-reads the local addresses instead."""
        if events is None:
            self.resync()
        else:
            _apply(self, events)

    def resync(self) -> None:
        """Make every wildcard mapping's entries the local addresses now."""
        for m in self.mappings():
            if not m.wildcard or m.reason.startswith("IPv"):
                continue
            now = local_addresses(_family(m.host_ip))
            for addr in list(m.addresses):
                if addr not in now:
                    self.remove_address(m.id, addr)
            for addr in now:
                self.add_address(m.id, addr)

    def stats(self) -> dict[int, dict]:
        """Per mapping: connections and datagrams that took the fast path."""
        out = {}
        for m in self._mappings.values():
            conns, dgrams = m.retired
            for addr in m.addresses:
                try:
                    _, c, d = self._p.entry_get(*self._key(m, addr))
                except OSError:
                    continue
                conns += c
                dgrams += d
            out[m.id] = {"connections": conns, "datagrams": dgrams,
                         "addresses": list(m.addresses), "reason": m.reason}
        return out

    def close(self) -> None:
        """Detach the programs; connects go to the relay from now on."""
        self._p.close()
        self._mappings.clear()


# ---------------------------------------------------------------------------
# Keeping wildcard mappings current: rtnetlink address events.

_RTMGRP_IPV4_IFADDR, _RTMGRP_IPV6_IFADDR = 0x10, 0x100
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RT_SCOPE_LINK = 253


class AddressWatch:
    """Address changes of this namespace, for FastPath.apply().

    A non-blocking rtnetlink socket: put fileno() in the event loop and call
    read() when it is readable.  Made in the thread's namespace, like load()."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[tuple[bool, str]] | None:
        """[(added, address)] since the last read; None when events were lost
        (the kernel's buffer overran): then FastPath.resync()."""
        events: list[tuple[bool, str]] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == 105:  # ENOBUFS: events were dropped
                    return None
                raise
            events += _parse_addr_messages(data)

    def close(self) -> None:
        self.sock.close()


def _parse_addr_messages(data: bytes) -> list[tuple[bool, str]]:
    import struct

    out = []
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16 or off + length > len(data):
            break
        if kind in (_RTM_NEWADDR, _RTM_DELADDR) and length >= 24:
            family, _plen, _flags, scope, _index = struct.unpack_from("=BBBBI", data, off + 16)
            attrs = {}
            a = off + 24
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                attrs[atype] = data[a + 4:a + alen]
                a += (alen + 3) & ~3
            # IFA_LOCAL is the address itself (IFA_ADDRESS is the peer on a
            # point-to-point link); IPv6 has IFA_ADDRESS only.
            raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            fam = {2: socket.AF_INET, 10: socket.AF_INET6}.get(family)
            if raw and fam and scope != _RT_SCOPE_LINK and len(raw) in (4, 16):
                out.append((kind == _RTM_NEWADDR, socket.inet_ntop(fam, raw)))
        off += (length + 3) & ~3
    return out


def _apply(fp: FastPath, events) -> None:
    for added, addr in events:
        for m in fp.mappings():
            if not m.wildcard or _family(addr) != _family(m.host_ip):
                continue
            if added:
                fp.add_address(m.id, addr)
            else:
                fp.remove_address(m.id, addr)


def attached(cgroup_path: str) -> dict[str, int]:
    """Programs attached to a cgroup directory, per hook (ours or anyone's)."""
    from spliceproxy import _fastpath
    return _fastpath.attached(cgroup_path)


def programs_loaded() -> int:
    """Fast-path programs alive on this host, whoever holds them."""
    from spliceproxy import _fastpath
    return _fastpath.programs_loaded()
