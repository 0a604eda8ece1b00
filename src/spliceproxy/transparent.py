"""SPLICEPROXY_TRANSPARENT: the container sees the client's own address.

The engine's relay binds a mapping's backend sockets to the client's address
and port (IP_TRANSPARENT, csrc/transparent.c).  The container answers that
address through its gateway, the host, and this module's policy route hands
those replies to the engine's sockets, in the engine's network namespace:

* a firewall rule marks packets that belong to a transparent socket
  (iptables ``-m socket --transparent``, in a chain of its own, or nftables
  ``socket transparent 1``, in a table of its own);
* ``ip rule fwmark MARK/MARK lookup TABLE`` (IPv4 and IPv6);
* ``local default dev lo table TABLE``: those packets are delivered locally.

Only packets of transparent sockets carry the mark, so nothing else is
diverted.  Everything is named as the engine's (the chain, the comment, the
table and the mark below), added when the first transparent mapping starts,
removed with the last one and when the engine stops; an engine that finds
them at start (its predecessor was killed) removes them first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess

# The engine's own names: documented in docs/transparent.md.
MARK = 0x10000000           # one bit, set and matched under its own mask
TABLE = 5350                # routing table holding the local default route
PREF = 5350                 # the ip rule's priority (before main's 32766)
CHAIN = "SPLICEPROXY-TRANSPARENT"  # iptables mangle chain
COMMENT = "spliceproxy"     # iptables comment of the jump to the chain
# The jump's comment when adding the chain made the mangle table (iptables-nft
# on a host without one): removing everything then deletes the table too.
COMMENT_MADE = "spliceproxy-made-mangle"
_BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
NFT_TABLE = "spliceproxy"   # nftables table (inet family)

CAP_NET_ADMIN = 12
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
TIMEOUT_S = 10.0


class Unavailable(Exception):
    """The host lacks what the mode needs (the message says what)."""


def _raise_ambient() -> None:
    """In a child before exec: keep CAP_NET_ADMIN across it (the engine runs
    as an unprivileged user that holds it; see engine_service)."""
    if os.geteuid() == 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN, 0, 0)


def run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run one command of iproute2, iptables or nft; its stdout.  Unavailable
    (with its stderr) when it fails and check is true."""
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                           timeout=TIMEOUT_S, preexec_fn=_raise_ambient,
                           env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                                "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable("%s: %s" % (argv[0], e)) from None
    if check and p.returncode != 0:
        raise Unavailable("%s: %s" % (" ".join(argv), (p.stderr or p.stdout).strip()
                                      or "exit status %d" % p.returncode))
    return p.stdout if p.returncode == 0 else ""


# nf_tables over netlink, for the one thing iptables cannot do: delete a
# table (linux/netfilter/nfnetlink.h, nf_tables.h).
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFNL_BATCH_GENID = 1
_NFT_MSG_DELTABLE, _NFT_MSG_GETGEN = 2, 16
_NFTA_TABLE_NAME = 1
_NFTA_GEN_ID = 1
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
NFPROTO = {socket.AF_INET: 2, socket.AF_INET6: 10}


def _nlattr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _nlmsg(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _nl_wait(sock: socket.socket, seqs: tuple[int, ...], last: int):
    """Read the kernel's answers to the messages numbered seqs until the ack
    of last or an error for any of them: ({seq: errno}, {seq: payload})."""
    errs: dict[int, int] = {}
    data: dict[int, bytes] = {}
    while last not in errs and not any(errs.get(q) for q in seqs):
        buf = sock.recv(65536)
        off = 0
        while off + 16 <= len(buf):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
            if length < 16:
                break
            payload = buf[off + 16:off + length]
            if kind == _NLMSG_ERROR:
                errs[seq] = -struct.unpack_from("=i", payload)[0]
            else:
                data.setdefault(seq, payload)
            off += (length + 3) & ~3
    return errs, data


def delete_empty_table(family: int, name: str, empty) -> bool:
    """Delete nf_tables table name of family (what iptables-nft made) if
    empty() says it holds nothing, in a batch that the kernel refuses if the
    ruleset changed since empty() looked (its generation id).  Whether it
    was deleted."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sk:
        sk.settimeout(2.0)
        sk.bind((0, 0))
        sk.send(_nlmsg((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN,
                       _NLM_F_REQUEST | _NLM_F_ACK, 1, 0, 0, b""))
        errs, data = _nl_wait(sk, (1,), 1)
        payload = data.get(1, b"")
        # The answer: nfgenmsg, then NFTA_GEN_ID.
        gen = None
        off = 4
        while off + 4 <= len(payload):
            n, kind = struct.unpack_from("=HH", payload, off)
            if n < 4:
                break
            if kind & 0x3fff == _NFTA_GEN_ID and n >= 8:
                gen = struct.unpack_from("!I", payload, off + 4)[0]
            off += (n + 3) & ~3
        if errs.get(1) or gen is None or not empty():
            return False
        batch = (_nlmsg(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, 2, 0, _NFNL_SUBSYS_NFTABLES,
                        _nlattr(_NFNL_BATCH_GENID, struct.pack("!I", gen)))
                 + _nlmsg((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_DELTABLE,
                          _NLM_F_REQUEST | _NLM_F_ACK, 3, NFPROTO[family], 0,
                          _nlattr(_NFTA_TABLE_NAME, name.encode() + b"\0"))
                 + _nlmsg(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, 4, 0, _NFNL_SUBSYS_NFTABLES, b""))
        sk.send(batch)
        try:
            errs, _ = _nl_wait(sk, (2, 3, 4), 3)
        except OSError:
            return False
        return errs.get(3) == 0 and not any(errs.get(q) for q in (2, 4))


def succeeds(argv: list[str]) -> bool:
    """Whether a command ran and exited 0 (its output discarded)."""
    try:
        run(argv)
    except Unavailable:
        return False
    return True


def firewall() -> str:
    """Which tool the host's firewall is written with: "iptables-nft",
    "iptables-legacy" or "nft"; Unavailable if none."""
    ipt = shutil.which("iptables")
    if ipt:
        try:
            version = run([ipt, "-V"])
        except Unavailable:
            version = ""
        if "nf_tables" in version:
            return "iptables-nft"
        if "legacy" in version or version.startswith("iptables v1.4") or version:
            return "iptables-legacy"
    if shutil.which("nft"):
        return "nft"
    raise Unavailable("neither iptables nor nft is installed")


class Rules:
    """The mark, the rules and the routes of one engine's namespace."""

    def __init__(self, tool: str):
        self.tool = tool
        self.families: tuple[int, ...] = ()  # installed for these families

    # -- what is there ---------------------------------------------------

    def _iptables(self, family: int) -> str:
        base = "ip6tables" if family == socket.AF_INET6 else "iptables"
        return base + ("-legacy" if self.tool == "iptables-legacy" else "")

    @staticmethod
    def _ip(family: int) -> list[str]:
        return ["ip", "-6" if family == socket.AF_INET6 else "-4"]

    def _our_rules(self, family: int) -> list[int]:
        """The priorities of ip rules that are ours (this mark to this table)."""
        out = []
        try:
            rules = json.loads(run(self._ip(family) + ["-j", "rule", "show"]) or "[]")
        except (Unavailable, ValueError):
            return out
        for r in rules:
            try:
                mark = int(str(r.get("fwmark", "0")), 0)
                mask = int(str(r.get("fwmask", "0xffffffff")), 0)
            except ValueError:
                continue
            if str(r.get("table")) == str(TABLE) and mark == MARK and mask == MARK:
                out.append(int(r.get("priority", PREF)))
        return out

    def _our_routes(self, family: int) -> int:
        """How many of our routes (local default dev lo) table TABLE holds."""
        try:
            routes = json.loads(run(self._ip(family) + ["-j", "route", "show", "table",
                                                        str(TABLE)]) or "[]")
        except (Unavailable, ValueError):
            return 0
        return sum(1 for r in routes if r.get("type") == "local" and r.get("dst") == "default"
                   and r.get("dev") == "lo")

    def _save(self, family: int) -> str:
        """The mangle table as iptables-save shows it, "" when there is none.
        (Asked for all tables: with -t mangle, iptables-nft shows an absent
        table as empty built-in chains.)"""
        base = "ip6tables" if family == socket.AF_INET6 else "iptables"
        tool = base + ("-legacy-save" if self.tool == "iptables-legacy" else "-save")
        out, inside = [], False
        for line in run([tool], check=False).splitlines():
            if line.startswith("*"):
                inside = line == "*mangle"
            if inside:
                out.append(line)
        return "\n".join(out)

    def _mangle_empty(self, family: int) -> bool:
        """The mangle table holds nothing: no rule, no chain of anyone's,
        every built-in chain's policy ACCEPT."""
        for line in self._save(family).splitlines():
            if line.startswith(("#", "*", "COMMIT")) or not line.strip():
                continue
            words = line.split()
            if line.startswith(":") and words[0][1:] in _BUILTIN and words[1] == "ACCEPT":
                continue
            return False
        return True

    def _our_jumps(self, family: int) -> list[list[str]]:
        """iptables -D argument lists for our jumps in mangle PREROUTING.
        (Read from iptables-save, which, unlike iptables -S, does not make the
        table it lists with iptables-nft.)"""
        out = []
        for line in self._save(family).splitlines():
            words = line.split()
            if words[:2] == ["-A", "PREROUTING"] and "-j" in words[:-1] and \
                    words[words.index("-j") + 1] == CHAIN:
                out.append(["-D"] + words[1:])
        return out

    def _chain_exists(self, family: int) -> bool:
        return any(line.split()[:1] == [":" + CHAIN] for line in self._save(family).splitlines())

    def _nft_exists(self) -> bool:
        return succeeds(["nft", "list", "table", "inet", NFT_TABLE])

    def present(self) -> list[str]:
        """What of ours is in the namespace now, as words for a log line."""
        found = []
        for family in (socket.AF_INET, socket.AF_INET6):
            v = "IPv6" if family == socket.AF_INET6 else "IPv4"
            found += ["%s ip rule %d" % (v, p) for p in self._our_rules(family)]
            if self._our_routes(family):
                found.append("%s route in table %d" % (v, TABLE))
            if self.tool.startswith("iptables"):
                if self._our_jumps(family) or self._chain_exists(family):
                    found.append("%s mangle chain %s" % (v, CHAIN))
        if self.tool == "nft" and self._nft_exists():
            found.append("nftables table inet %s" % NFT_TABLE)
        return found

    # -- changes ---------------------------------------------------------

    def remove(self) -> list[str]:
        """Remove everything of ours, whoever added it; what was found."""
        found = self.present()
        for family in (socket.AF_INET, socket.AF_INET6):
            self._remove_family(family)
        if self.tool == "nft" and self._nft_exists():
            run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
        self.families = ()
        return found

    def _add_family(self, family: int) -> None:
        ip = self._ip(family)
        if self.tool.startswith("iptables"):
            ipt = [self._iptables(family), "-w", "-t", "mangle"]
            made = not self._save(family).strip()
            run(ipt + ["-N", CHAIN])
            run(ipt + ["-A", CHAIN, "-m", "socket", "--transparent", "-m", "comment",
                       "--comment", COMMENT, "-j", "MARK", "--set-xmark",
                       "%#x/%#x" % (MARK, MARK)])
            run(ipt + ["-I", "PREROUTING", "1", "-m", "comment", "--comment",
                       COMMENT_MADE if made else COMMENT, "-j", CHAIN])
        run(ip + ["route", "add", "local", "default", "dev", "lo", "table", str(TABLE)])
        run(ip + ["rule", "add", "pref", str(PREF), "fwmark", "%#x/%#x" % (MARK, MARK),
                  "table", str(TABLE)])

    def install(self) -> list[str]:
        """Add the rules for IPv4 and, where the host has it, IPv6; what of a
        predecessor's was found (and removed) first.  Unavailable if IPv4's
        cannot be added (nothing of ours is left then)."""
        if self.tool == "iptables-legacy" and os.geteuid() != 0:
            raise Unavailable("iptables-legacy needs root for its lock file (/run/xtables.lock); "
                              "the engine runs as uid %d" % os.geteuid())
        stale = self.remove()
        try:
            if self.tool == "nft":
                run(["nft", "-f", "-"], stdin=(
                    "table inet %s {\n chain prerouting {\n"
                    "  type filter hook prerouting priority mangle; policy accept;\n"
                    "  socket transparent 1 meta mark set meta mark | %#x comment \"%s\"\n"
                    " }\n}\n" % (NFT_TABLE, MARK, COMMENT)))
            self._add_family(socket.AF_INET)
        except Unavailable:
            self.remove()
            raise
        families = [socket.AF_INET]
        if os.path.exists("/proc/sys/net/ipv6/conf/lo"):
            try:
                self._add_family(socket.AF_INET6)
                families.append(socket.AF_INET6)
            except Unavailable:
                self._remove_family(socket.AF_INET6)
        self.families = tuple(families)
        return stale

    def _remove_family(self, family: int) -> None:
        ip = self._ip(family)
        for pref in self._our_rules(family):
            run(ip + ["rule", "del", "pref", str(pref), "fwmark", "%#x/%#x" % (MARK, MARK),
                      "table", str(TABLE)], check=False)
        for _ in range(self._our_routes(family)):
            run(ip + ["route", "del", "local", "default", "dev", "lo", "table", str(TABLE)],
                check=False)
        if self.tool.startswith("iptables"):
            ipt = self._iptables(family)
            jumps = self._our_jumps(family)
            for args in jumps:
                run([ipt, "-w", "-t", "mangle"] + args, check=False)
            if self._chain_exists(family):
                run([ipt, "-w", "-t", "mangle", "-F", CHAIN], check=False)
                run([ipt, "-w", "-t", "mangle", "-X", CHAIN], check=False)
            if self.tool == "iptables-nft" and any(COMMENT_MADE in a for a in jumps):
                # The table was not there before: leave none, unless someone
                # has put something in it since.
                try:
                    delete_empty_table(family, "mangle", lambda: self._mangle_empty(family))
                except OSError:
                    pass


def container_networks(backends=()) -> list[tuple[int, bytes, int]]:
    """The prefixes whose clients keep the host's address: every prefix on a
    bridge (Docker's networks are bridges) and on the interface the route to
    each backend leaves by.  A container there reaches the container behind the
    mapping without the host in between, so it would answer a borrowed
    address directly, past the relay.  (family, packed network, length)."""
    devs: set[str] = set()
    for backend in backends:
        try:
            got = json.loads(run(["ip", "-j", "route", "get", backend]) or "[]")
            devs.update(r["dev"] for r in got if r.get("dev"))
        except (Unavailable, ValueError, KeyError, TypeError):
            pass
    try:
        links = json.loads(run(["ip", "-j", "-d", "addr", "show"]) or "[]")
    except (Unavailable, ValueError):
        return []
    out = []
    for link in links:
        kind = (link.get("linkinfo") or {}).get("info_kind")
        if kind != "bridge" and link.get("ifname") not in devs:
            continue
        for a in link.get("addr_info", []):
            try:
                net = ipaddress.ip_interface("%s/%s" % (a["local"], a["prefixlen"])).network
            except (KeyError, ValueError):
                continue
            if net.is_link_local or net.is_loopback:
                continue
            family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
            out.append((family, net.network_address.packed, net.prefixlen))
    return sorted(set(out))
