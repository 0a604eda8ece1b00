"""SPLICEPROXY_TRANSPARENT=1 under a real dockerd with ``--iptables=false``.

The scratch daemon of the suite, restarted with ``--iptables=false`` (its
namespace's iptables emptied first, as on a host whose dockerd never had
them), and an outside client namespace routed into the daemon's namespace
through a veth pair. The container runs busybox httpd with a CGI script that
answers ``$REMOTE_ADDR $REMOTE_PORT``: the peer it sees.

Engine mode only (the setting is the engine's; a standalone proxy refuses it,
see tests/integration/test_transparent.py, which also covers UDP and the
fallbacks); the other modes skip.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from support import transparent_env as te
from support.fastpath_env import in_netns, ip

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

IMAGE = "local/spe2e-busybox:test"
PREFIX = os.environ.get("SPLICEPROXY_E2E_NETNS_PREFIX") or "spe2e-"
HOST_SIDE, CLIENT = "198.18.82.253", "198.18.82.254"  # a /30 of the session half
PORT = 18190
SERVE = ("B=/bin/busybox; $B mkdir -p /w/cgi-bin; "
         "{ echo '#!/bin/sh'; echo 'echo Content-Type: text/plain'; echo echo; "
         "echo 'echo $REMOTE_ADDR $REMOTE_PORT'; } > /w/cgi-bin/peer; "
         "$B chmod 755 /w/cgi-bin/peer; exec /bin/httpd -f -p 80 -h /w")


def ask(n: int = 1) -> list[tuple[str, int, int]]:
    """n GETs of the CGI: (address the container saw, its port, our port)."""
    out = []
    for _ in range(n):
        with socket.create_connection((HOST_SIDE, PORT), timeout=10) as s:
            mine = s.getsockname()[1]
            s.sendall(b"GET /cgi-bin/peer HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        # The CGI's one line comes last; httpd shows an IPv4 peer of its
        # IPv6 socket as [::ffff:a.b.c.d].
        body = data.decode().strip().splitlines()[-1].split()
        assert len(body) == 2 and data.startswith(b"HTTP/1.1 200"), data
        addr = body[0].strip("[]").removeprefix("::ffff:")
        out.append((addr, int(body[1]), mine))
    return out


def wait_served(client_ns: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            in_netns(client_ns, ask)
            return
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def routing(d) -> dict[str, list[str]]:
    """The daemon namespace's routing, without what the kernel adds and
    takes as the bridge's links come and go with containers (the veth
    interfaces' routes, IPv6 link-local and multicast routes, "linkdown")."""
    def keep(line: str) -> bool:
        return not any(w in line for w in (" dev veth", "fe80:", "ff00::/8"))

    return {k: [ln.replace(" linkdown", "") for ln in v if keep(ln)]
            for k, v in te.routing(d.netns.name).items()}


def restart(d, env: dict) -> None:
    """dockerd again with env for its proxies, once the engine of its last
    run has exited (an engine keeps the settings it started with)."""
    d.remove_all_containers()
    d.stop_dockerd()
    deadline = time.monotonic() + 15
    while d.engines():
        assert time.monotonic() < deadline, d.diagnostics()
        time.sleep(0.2)
    d.extra_args = ["--iptables=false"]
    d.extra_env = env
    d.start_dockerd()


@pytest.fixture
def client_ns(request, proxy_under_test):
    """(the scratch daemon, the client namespace's name)."""
    if not proxy_under_test.engine or proxy_under_test.fastpath:
        pytest.skip("SPLICEPROXY_TRANSPARENT is the host engine's (engine mode, without the "
                    "fast path's cgroup setup)")
    d = request.getfixturevalue("scratch_dockerd")
    name = f"{PREFIX}{os.getpid()}-cl"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", d.netns.name, "link", "add", "out0", "type", "veth", "peer", "name", "eth0",
           "netns", name)
        ip("-n", d.netns.name, "addr", "add", HOST_SIDE + "/30", "dev", "out0")
        ip("-n", d.netns.name, "link", "set", "out0", "up")
        ip("-n", name, "addr", "add", CLIENT + "/30", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "route", "add", "default", "via", HOST_SIDE)
        # dockerd's first start (iptables on) left its chains: a host with
        # "iptables": false has none.
        for tool in ("iptables", "ip6tables"):
            for table in ("nat", "filter", "raw", "mangle"):
                d.netns.run([tool, "-w", "-t", table, "-F"])
                d.netns.run([tool, "-w", "-t", table, "-X"])
            d.netns.run([tool, "-w", "-P", "FORWARD", "ACCEPT"])
        yield d, name
    finally:
        ip("netns", "del", name, check=False)


def test_the_container_sees_the_outside_client(client_ns):
    d, client_ns = client_ns
    version = d.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    print("dockerd", version)
    # Unset: the container sees the daemon's bridge address, as with docker-proxy.
    restart(d, {})
    d.docker("run", "-d", "--name", "peer", "-p", f"{PORT}:80", IMAGE, "sh", "-c", SERVE)
    wait_served(client_ns)
    seen, _, _ = in_netns(client_ns, ask)[0]
    assert seen == d.gateway, d.diagnostics()
    assert d.status()["engine"]["transparent"]["on"] is False

    restart(d, {"SPLICEPROXY_TRANSPARENT": "1"})
    before = routing(d)
    d.docker("run", "-d", "--name", "peer", "-p", f"{PORT}:80", IMAGE, "sh", "-c", SERVE)
    wait_served(client_ns)
    got = in_netns(client_ns, lambda: ask(200))
    wrong = [g for g in got if (g[0], g[1]) != (CLIENT, g[2])]
    assert not wrong, (version, wrong[:5], d.diagnostics())
    st = d.status()
    assert st["engine"]["transparent"]["on"] and st["engine"]["transparent"]["rules"]
    assert st["engine"]["counters"]["tcp_transparent"] >= 200
    during = routing(d)
    diff = te.difference(before, during)
    assert diff and all(not gone for gone, _ in diff.values()), diff

    # kill -9: the stubs start the next engine, which removes what was left
    # and adds its own (one set, as before).
    for e in d.engines():
        os.kill(e.pid, 9)
    deadline = time.monotonic() + 20
    while True:
        try:
            if d.status()["mappings"]:
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, d.diagnostics()
        time.sleep(0.3)
    seen, port, mine = in_netns(client_ns, ask)[0]
    assert (seen, port) == (CLIENT, mine)
    assert routing(d) == during

    # The last mapping gone, and dockerd stopped: nothing of the mode is left.
    d.remove_all_containers()
    deadline = time.monotonic() + 10
    while routing(d) != before and time.monotonic() < deadline:
        time.sleep(0.3)
    assert routing(d) == before, te.difference(before, routing(d))
    d.stop_dockerd()
    assert routing(d) == before
