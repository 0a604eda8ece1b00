"""The proxy in its real setting: dockerd 20.10 and 28.5 start it for every published port.

Each scenario drives the docker CLI and checks what a user would see: pages
served through published ports, `ps` output, errors from `docker run`, ports
that are free again after a container goes away.

With the fast path on (the `fastpath` mode), each scenario also checks which
way its host-local clients went, from the per-mapping counts of `spliceproxy
status --json`: a client dialling a host address of an IPv4 mapping goes
straight to the container (the mapping's fast-path count grows, its relay's
does not); a `::1` client of dockerd's `::` binding (an IPv4 container: 6->4),
a client outside the clients' cgroup or in another network namespace is
relayed; a stopped mapping is refused, never rewritten.

Every scenario runs under both daemons (the ``docker_build`` parameter); the
last ones are about what only dockerd 28+ does (the socket on fd 4, proxies
that follow a container's networks, IPv6 networks, the hairpin left to the
proxy) and skip under 20.10 with "needs dockerd 28+".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from spliceproxy import fastpath

from support.dockerd import BindTrace, socket_inodes

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

HTTPD = ["/bin/httpd", "-f", "-p", "80", "-h", "/www"]


def argv_tail(d, proto: str, host_ip: str, host_port: int, container_ip: str,
              container_port: int) -> str:
    """dockerd's argv for one binding, as `ps` prints it after the program path
    (dockerd 28+ passes the socket on fd 4 and says so last)."""
    return (f"-proto {proto} -host-ip {host_ip} -host-port {host_port}"
            f" -container-ip {container_ip} -container-port {container_port}"
            + (" -use-listen-fd" if d.major >= 28 else ""))


def proxies_for_port(d, host_port: int):
    return [p for p in d.proxies() if f" -host-port {host_port} " in p.args]


def assert_pages(d, host: str, ports, token: str) -> None:
    res = d.netns.client("http", host, *ports)
    bad = [r for r in res["results"] if not r["ok"] or r.get("body", "").strip() != token]
    assert not bad, f"via {host}: {bad}\n{d.diagnostics()}"


def route_counts(d, ports) -> dict[tuple[str, int], tuple[int, int]]:
    """(mapping's host address, port) -> (fast-path connects + datagrams, relayed
    connections + UDP flows), from the engine's status."""
    want = set(ports)
    out = {}
    doc = d.status()
    assert doc["engine"]["fastpath"]["active"], f"fast path not active: {doc['engine']}"
    for m in doc["mappings"]:
        host, _, port = m["host"].rpartition(":")
        if int(port) not in want:
            continue
        fp = m.get("fastpath") or {}
        c = m.get("counters") or {}
        out[(host.strip("[]"), int(port))] = (
            fp.get("connections", 0) + fp.get("datagrams", 0),
            c.get("tcp_accepted", 0) + c.get("udp_flows_created", 0))
    return out


class Routes:
    """Which way clients went (fast-path mode; a no-op in the other modes).

        with Routes(d, [port]) as r:
            assert_pages(d, "127.0.0.1", [port], token)
        r.expect(fast=[("0.0.0.0", port)])
    """

    def __init__(self, d, ports):
        self.d, self.ports = d, list(ports)
        self.on = d.proxy.fastpath
        self.before: dict = {}
        self.after: dict = {}

    def __enter__(self):
        if self.on:
            self.before = route_counts(self.d, self.ports)
        return self

    def __exit__(self, *exc) -> None:
        if self.on and exc[0] is None:
            self.after = route_counts(self.d, self.ports)

    def delta(self, key) -> tuple[int, int]:
        b, a = self.before.get(key, (0, 0)), self.after.get(key, (0, 0))
        return a[0] - b[0], a[1] - b[1]

    def expect(self, fast=(), relay=()) -> None:
        """Each mapping in fast took the fast path (at least once) and none of
        its clients was relayed; each in relay the other way round."""
        if not self.on:
            return
        for key in fast:
            assert key in self.after, (key, self.after)
            f, r = self.delta(key)
            assert f >= 1 and r == 0, (
                f"{key}: {f} fast-path connect(s), {r} relayed; want fast only\n"
                f"{self.before} -> {self.after}\n{self.d.diagnostics()}")
        for key in relay:
            assert key in self.after, (key, self.after)
            f, r = self.delta(key)
            assert f == 0 and r >= 1, (
                f"{key}: {f} fast-path connect(s), {r} relayed; want the relay only\n"
                f"{self.before} -> {self.after}\n{self.d.diagnostics()}")


def assert_refused(d, host: str, port: int) -> None:
    """A connect to a port nobody serves any more is refused at once, as with no
    proxy at all: never rewritten to the address the container had."""
    res = d.netns.client("http", host, port, "--deadline", "0.5", "--timeout", "2")
    (r,) = res["results"]
    assert not r["ok"] and "ConnectionRefused" in r.get("error", ""), (
        f"{host}:{port}: {r}\n{d.diagnostics()}")


def assert_pages_outside_cgroup(d, host: str, ports, token: str) -> None:
    res = d.netns.client("http", host, *ports, cgroup=False)
    bad = [r for r in res["results"] if not r["ok"] or r.get("body", "").strip() != token]
    assert not bad, f"via {host}: {bad}\n{d.diagnostics()}"


def assert_port_free(d, proto: str, port: int) -> None:
    res = d.netns.client("bind", proto, port)
    assert res == {"0.0.0.0": "ok", "::": "ok"}, (
        f"{proto} port {port} still taken: {res}\n{d.diagnostics()}")


def test_http_through_ipv4_and_ipv6(docker, proxy_under_test, page_token):
    d = docker
    port = 18080
    d.docker("run", "-d", "--name", "web", "-p", f"{port}:80", "local/spe2e-busybox:test",
             *HTTPD)
    ip = d.container_ip("web")

    with Routes(d, [port]) as v4:
        assert_pages(d, "127.0.0.1", [port], page_token)
        assert_pages(d, d.gateway, [port], page_token)
    v4.expect(fast=[("0.0.0.0", port)])
    # dockerd gives the `::` binding the container's IPv4 address: 6->4 proxying.
    with Routes(d, [port]) as v6:
        assert_pages(d, "::1", [port], page_token)
    v6.expect(relay=[("::", port)])
    if d.proxy.fastpath:
        # A client in another network namespace (the container's own, dialling
        # the gateway: the hairpin docker-proxy exists for), although in the
        # clients' cgroup, is never rewritten: the relay serves it.
        pid = d.docker("inspect", "-f", "{{.State.Pid}}", "web").stdout.strip()
        with Routes(d, [port]) as other:
            res = d.netns.client("http", d.gateway, port, netns_path=f"/proc/{pid}/ns/net")
            assert all(r["ok"] and r["body"].strip() == page_token for r in res["results"]), res
        other.expect(relay=[("0.0.0.0", port)])
        # A client outside the cgroup is relayed too.
        with Routes(d, [port]) as outside:
            res = d.netns.client("http", "127.0.0.1", port, cgroup=False)
            assert all(r["ok"] for r in res["results"]), res
        outside.expect(relay=[("0.0.0.0", port)])

    procs = d.netns.ps()
    listing = "\n".join(map(str, procs))
    for host_ip in ("0.0.0.0", "::"):
        tail = argv_tail(d, "tcp", host_ip, port, ip, 80)
        started = [p for p in procs
                   if p.args.endswith(tail) and p.ppid == d.pid
                   and any(x in p.args.split()[:4] for x in proxy_under_test.programs)]
        assert started, f"no proxy child of dockerd with `{tail}`:\n{listing}"
        assert any(p.comm in proxy_under_test.comms for p in started), (
            f"ps does not show {proxy_under_test.comms} for `{tail}`:\n{listing}")
    if not proxy_under_test.is_reference:
        stray = [p for p in procs if p.comm == "docker-proxy" or "docker-proxy" in p.args]
        assert not stray, f"docker-proxy is running although {proxy_under_test.path} is set:\n" \
                          f"{listing}"


def test_udp_echo_several_clients(docker):
    d = docker
    port = 18053
    d.docker("run", "-d", "--name", "echo", "-p", f"{port}:5353/udp",
             "local/spe2e-busybox:test", "/bin/udp_echo", "5353")
    d.wait_log("echo", "ready 5353")
    ip = d.container_ip("echo")

    for host, mapping in (("127.0.0.1", "0.0.0.0"), ("::1", "::")):
        with Routes(d, [port]) as routes:
            res = d.netns.client("udp", host, port, "--clients", "4", "--count", "5")
        assert len(set(res["source_ports"])) == 4, res
        assert res["echoed"] == res["sent"] == 20 and not res["failures"], (
            f"via {host}: {res}\n{d.diagnostics()}")
        # Connected UDP sockets: the IPv4 ones go straight to the container
        # (counted per connect); ::1 to this IPv4 container is relayed.
        if mapping == "0.0.0.0":
            routes.expect(fast=[(mapping, port)])
            assert not routes.on or routes.delta((mapping, port))[0] == 4, (
                routes.before, routes.after)
        else:
            routes.expect(relay=[(mapping, port)])

    listing = [p.args for p in d.proxies()]
    for host_ip in ("0.0.0.0", "::"):
        tail = argv_tail(d, "udp", host_ip, port, ip, 5353)
        assert any(a.endswith(tail) for a in listing), (tail, listing)


def test_stop_and_rm_end_every_proxy_and_free_the_port(docker, page_token):
    d = docker
    a_tcp, a_udp, b_tcp = 18090, 18091, 18092
    d.docker("run", "-d", "--name", "alpha", "-p", f"{a_tcp}:80", "-p", f"{a_udp}:5353/udp",
             "local/spe2e-busybox:test", *HTTPD)
    d.docker("run", "-d", "--name", "bravo", "-p", f"{b_tcp}:80", "local/spe2e-busybox:test",
             *HTTPD)
    with Routes(d, [a_tcp, b_tcp]) as routes:
        assert_pages(d, "127.0.0.1", [a_tcp, b_tcp], page_token)
    routes.expect(fast=[("0.0.0.0", a_tcp), ("0.0.0.0", b_tcp)])

    a_pids = [p.pid for p in proxies_for_port(d, a_tcp) + proxies_for_port(d, a_udp)]
    b_pids = [p.pid for p in proxies_for_port(d, b_tcp)]
    assert len(a_pids) >= 4 and len(b_pids) >= 2, d.diagnostics()

    # dockerd stops each proxy with SIGINT and waits for it without a timeout:
    # a proxy that lingers makes `docker stop` hang, which the timeout reports.
    t0 = time.monotonic()
    d.docker("stop", "-t", "1", "alpha", timeout=30)
    took = time.monotonic() - t0
    alive = _settled(lambda: [p for p in d.proxies() if p.pid in a_pids])
    assert not alive, f"after docker stop ({took:.1f}s): {alive}\n{d.diagnostics()}"
    assert_port_free(d, "tcp", a_tcp)
    assert_port_free(d, "udp", a_udp)
    # The stopped mapping is refused, never rewritten to alpha's old address.
    assert_refused(d, "127.0.0.1", a_tcp)
    # The other container is untouched.
    with Routes(d, [b_tcp]) as routes:
        assert_pages(d, "127.0.0.1", [b_tcp], page_token)
    routes.expect(fast=[("0.0.0.0", b_tcp)])
    assert all(p.pid in {q.pid for q in d.proxies()} for p in proxies_for_port(d, b_tcp))

    d.docker("rm", "-f", "bravo", timeout=30)
    alive = _settled(lambda: [p for p in d.proxies() if p.pid in b_pids])
    assert not alive, f"after docker rm -f: {alive}\n{d.diagnostics()}"
    assert_port_free(d, "tcp", b_tcp)
    assert_refused(d, "127.0.0.1", b_tcp)

    d.docker("rm", "alpha", timeout=30)
    assert not d.proxies(), d.diagnostics()


def test_recreate_on_same_port_while_time_wait(docker, page_token):
    d = docker
    port = 18100
    d.docker("run", "-d", "--name", "first", "-p", f"{port}:80", "local/spe2e-busybox:test",
             *HTTPD)
    # The client reads to EOF, so the closing starts at httpd and the
    # proxy's accepted socket on the host port is the one left in TIME_WAIT.
    # (Outside the clients' cgroup: a fast-path client's connection is to the
    # container's port, and the premise is about the relay's.)
    with Routes(d, [port]) as routes:
        assert_pages_outside_cgroup(d, "127.0.0.1", [port], page_token)
    routes.expect(relay=[("0.0.0.0", port)])
    states = d.netns.client("tcp-states", port)["states"]
    assert "TIME_WAIT" in states, f"premise: no TIME_WAIT on port {port}: {states}"
    first_ip = d.container_ip("first")

    d.docker("rm", "-f", "first", timeout=30)
    d.docker("run", "-d", "--name", "second", "-p", f"{port}:80", "local/spe2e-busybox:test",
             *HTTPD)
    # The mapping made again (for a container that may have the same address)
    # is served by the fast path again, with the new container's page.
    with Routes(d, [port]) as routes:
        assert_pages(d, "127.0.0.1", [port], page_token)
    routes.expect(fast=[("0.0.0.0", port)])
    with Routes(d, [port]) as routes:
        assert_pages(d, "::1", [port], page_token)
    routes.expect(relay=[("::", port)])
    # Restarted: dockerd stops the mapping and starts it again; the fast path
    # serves the new one, to wherever the container is now.
    d.docker("restart", "-t", "1", "second", timeout=30)
    with Routes(d, [port]) as routes:
        assert_pages(d, "127.0.0.1", [port], page_token)
    routes.expect(fast=[("0.0.0.0", port)])
    print(f"first container {first_ip}, second {d.container_ip('second')}")


def test_port_in_use_fails_fast_with_proxy_error(docker, page_token):
    """A port another process holds: the container's start fails at once with
    the reason (from the proxy before 28, from dockerd's own bind since)."""
    d = docker
    port = 18110
    holder = d.netns.hold_port(port)
    try:
        t0 = time.monotonic()
        r = d.docker("run", "-d", "--name", "clash", "-p", f"{port}:80",
                     "local/spe2e-busybox:test", *HTTPD, check=False, timeout=30)
        took = time.monotonic() - t0
        assert r.returncode != 0, f"docker run succeeded on a taken port\n{d.diagnostics()}"
        if d.major >= 28:
            # dockerd binds the port itself: the proxy is never started.
            assert "failed to bind host port" in r.stderr, r.stderr
        else:
            assert "Error starting userland proxy" in r.stderr, r.stderr
        assert "address already in use" in r.stderr, r.stderr
        # The proxy reports over fd 3 at once; dockerd's own timeout is 16 s.
        assert took < 5.0, f"docker run took {took:.1f}s to fail: {r.stderr}"
        left = _settled(lambda: proxies_for_port(d, port))
        assert not left, f"proxy left behind after the failed start: {left}\n{d.diagnostics()}"
        state = d.docker("inspect", "-f", "{{.State.Running}}", "clash").stdout.strip()
        assert state == "false"
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()

    # Once the other listener is gone, the same container starts.
    d.docker("start", "clash", timeout=30)
    with Routes(d, [port]) as routes:
        assert_pages(d, "127.0.0.1", [port], page_token)
    routes.expect(fast=[("0.0.0.0", port)])


def test_port_range_every_port_answers(docker, page_token):
    d = docker
    first, count = 20100, 20
    last = first + count - 1
    ports = list(range(first, last + 1))
    script = (f"for p in $(seq {first} {last}); do httpd -p $p -h /www || exit 1; done;"
              " echo started; exec sleep 3600")
    t0 = time.monotonic()
    d.docker("run", "-d", "--name", "range", "-p", f"{first}-{last}:{first}-{last}",
             "local/spe2e-busybox:test", "/bin/sh", "-c", script, timeout=90)
    took = time.monotonic() - t0
    d.wait_log("range", "started")
    ip = d.container_ip("range")

    procs = d.proxies()
    assert len(procs) == 2 * count, (
        f"{len(procs)} proxies for {count} ports (want one per port and family)\n"
        + "\n".join(map(str, procs)))
    for port in ports:
        for host_ip in ("0.0.0.0", "::"):
            tail = argv_tail(d, "tcp", host_ip, port, ip, port)
            assert any(p.args.endswith(tail) for p in procs), tail
    with Routes(d, ports) as routes:
        assert_pages(d, "127.0.0.1", ports, page_token)
    routes.expect(fast=[("0.0.0.0", p) for p in ports])
    with Routes(d, ports) as routes:
        assert_pages(d, "::1", ports, page_token)
    routes.expect(relay=[("::", p) for p in ports])
    print(f"docker run with {count} published ports took {took:.2f}s")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_daemon_stop_leaves_no_proxy(scratch_dockerd, page_token, how):
    """SIGTERM: dockerd shuts down and releases the ports itself. SIGKILL:
    dockerd gets no say, only the parent-death signal (SIGTERM) reaches the
    proxies, and they must still go, with any process they started."""
    d = scratch_dockerd
    # PID 1 of these containers ignores SIGTERM; a short stop timeout keeps
    # dockerd's shutdown (and restore after SIGKILL) quick.
    d.docker("run", "-d", "--stop-timeout", "1", "--name", "web", "-p", "18120:80",
             "-p", "18121:5353/udp", "local/spe2e-busybox:test", *HTTPD)
    d.docker("run", "-d", "--stop-timeout", "1", "--name", "echo", "-p", "18122:5353/udp",
             "local/spe2e-busybox:test", "/bin/udp_echo", "5353")
    with Routes(d, [18120, 18122]) as routes:
        assert_pages(d, "127.0.0.1", [18120], page_token)
        res = d.netns.client("udp", "127.0.0.1", 18122, "--clients", "2", "--count", "2")
        assert res["echoed"] == res["sent"] == 4, res
    routes.expect(fast=[("0.0.0.0", 18120), ("0.0.0.0", 18122)])
    proxies = d.proxies()
    assert len(proxies) >= 6, d.diagnostics()
    # Everything that runs in the namespace besides the daemons themselves:
    # the proxies and whatever they may have forked.
    others = {d.pid, d.containerd.pid}
    watched = [p for p in d.netns.ps()
               if p.pid not in others and p.comm not in ("containerd-shim", "containerd")]
    assert {p.pid for p in proxies} <= {p.pid for p in watched}
    if d.proxy.engine:
        # The engine runs in the daemon's namespace too: it must go as well.
        engines = d.engines()
        assert len(engines) == 1, d.diagnostics()
        assert engines[0].pid in {p.pid for p in watched}

    d.dockerd.send_signal(getattr(signal, how))
    try:
        d.dockerd.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dockerd did not exit within 30s of {how}\n{d.diagnostics()}")
    pids = {p.pid for p in watched}
    survivors = _settled(lambda: [p for p in d.netns.ps() if p.pid in pids], timeout=5.0)
    assert not survivors, (
        f"processes outlived dockerd ({how}):\n" + "\n".join(map(str, survivors))
        + "\n" + d.diagnostics())
    for port in (18120,):
        assert_port_free(d, "tcp", port)
    for port in (18121, 18122):
        assert_port_free(d, "udp", port)
    if d.proxy.fastpath:
        # The engine went with its daemon, and its programs with it.
        attached = fastpath.attached(str(d.netns.cgroup))
        assert sum(attached.values()) == 0, attached
        assert_refused(d, "127.0.0.1", 18120)

    if how == "SIGKILL":
        # The containers outlived their daemon; a restarted dockerd reaps them
        # (no live-restore), so teardown finds the usual state.
        d.start_dockerd()


def _range_script(first: int, last: int) -> list[str]:
    return ["/bin/sh", "-c", f"for p in $(seq {first} {last}); do httpd -p $p -h /www || exit 1;"
            " done; echo started; exec sleep 3600"]


def test_port_range_100_ipv4_and_ipv6_twins(docker, page_token):
    """-p 127.0.0.1:A-B:C-D and the same on [::1]: 200 mappings, every one answers,
    and `docker rm -f` ends every proxy and frees every port."""
    d = docker
    first, cfirst, count = 21000, 22000, 100
    last, clast = first + count - 1, cfirst + count - 1
    ports = list(range(first, last + 1))
    spec = f"{first}-{last}:{cfirst}-{clast}"
    t0 = time.monotonic()
    d.docker("run", "-d", "--name", "range100", "-p", f"127.0.0.1:{spec}", "-p", f"[::1]:{spec}",
             "local/spe2e-busybox:test", *_range_script(cfirst, clast), timeout=120)
    took_run = time.monotonic() - t0
    d.wait_log("range100", "started")
    ip = d.container_ip("range100")

    procs = d.proxies()
    assert len(procs) == 2 * count, (
        f"{len(procs)} proxies for {count} ports on two addresses\n"
        + "\n".join(map(str, procs)))
    for i in range(count):
        for host_ip in ("127.0.0.1", "::1"):
            tail = argv_tail(d, "tcp", host_ip, first + i, ip, cfirst + i)
            assert any(p.args.endswith(tail) for p in procs), tail
    if d.proxy.engine:
        assert len(d.engines()) == 1, d.diagnostics()
        assert len(d.status()["mappings"]) == 2 * count
    with Routes(d, ports) as routes:
        assert_pages(d, "127.0.0.1", ports, page_token)
        assert_pages(d, "::1", ports, page_token)
    # [::1] to this IPv4 container is 6->4: the relay's.
    routes.expect(fast=[("127.0.0.1", p) for p in ports], relay=[("::1", p) for p in ports])

    pids = [p.pid for p in procs]
    t0 = time.monotonic()
    d.docker("rm", "-f", "range100", timeout=60)
    took_rm = time.monotonic() - t0
    alive = _settled(lambda: [p for p in d.proxies() if p.pid in pids])
    assert not alive, f"after docker rm -f: {alive}\n{d.diagnostics()}"
    res = d.netns.client("bind-many", "tcp", "127.0.0.1,::1", *ports)
    assert not res["taken"], f"ports still taken after rm -f: {res}\n{d.diagnostics()}"
    print(f"2x{count} ports: docker run {took_run:.2f}s, docker rm -f {took_rm:.2f}s")


def test_engine_killed_under_load_every_mapping_serves_within_1s(docker, engine_mode,
                                                                 page_token):
    """kill -9 the engine while every mapping carries requests: the stubs keep the
    ports bound, start a new engine and register again; each mapping answers a
    request made after the kill within one second."""
    d = docker
    first, count = 21200, 8
    last = first + count - 1
    ports = list(range(first, last + 1))
    d.docker("run", "-d", "--name", "load", "-p", f"{first}-{last}:{first}-{last}",
             "local/spe2e-busybox:test", *_range_script(first, last))
    d.wait_log("load", "started")
    assert_pages(d, "127.0.0.1", ports, page_token)
    stubs = {p.pid for p in d.proxies()}
    assert len(stubs) == 2 * count, d.diagnostics()
    (engine,) = d.engines()

    res = d.netns.client("kill-under-load", "127.0.0.1,::1", engine.pid, *ports, timeout=60)
    assert not res["missing"], f"mappings that did not serve again: {res}\n{d.diagnostics()}"
    worst = max(res["recovered"].values())
    assert worst <= 1.0, f"slowest mapping served again after {worst:.3f}s: {res}"
    print(f"engine kill -9 under load: every mapping served again within {worst:.3f}s")

    new = d.engines()
    assert len(new) == 1 and new[0].pid != engine.pid, d.diagnostics()
    # The same stubs, still dockerd's children: dockerd saw nothing.
    assert {p.pid for p in d.proxies()} == stubs, d.diagnostics()
    assert len(d.status()["mappings"]) == 2 * count
    # The new engine serves the fast path again, with its own programs.
    with Routes(d, ports) as routes:
        assert_pages(d, "127.0.0.1", ports, page_token)
    routes.expect(fast=[("0.0.0.0", p) for p in ports])


def test_two_dockerds_on_one_host_have_separate_engines(docker, scratch_dockerd, engine_mode,
                                                        page_token):
    """Two daemons in namespaces of their own, nothing set but the shared engine
    directory, publishing the same port: each namespace's stubs find their own
    engine (two engines, each with its own daemon's mappings only); killing
    one leaves the other alone."""
    a, b = docker, scratch_dockerd
    port = 18130
    for d in (a, b):
        d.docker("run", "-d", "--name", "twin", "-p", f"{port}:80", "local/spe2e-busybox:test",
                 *HTTPD)
        # Each engine's programs rewrite its own namespace's connects only.
        with Routes(d, [port]) as routes:
            assert_pages(d, "127.0.0.1", [port], page_token)
        routes.expect(fast=[("0.0.0.0", port)])
    (ea,), (eb,) = a.engines(), b.engines()
    assert ea.pid != eb.pid
    assert str(a.engine_socket) in ea.args and str(b.engine_socket) in eb.args
    assert a.engine_socket != b.engine_socket
    for d in (a, b):
        st = d.status()
        assert st["engine"]["socket"] == str(d.engine_socket)
        assert st["engine"]["netns"] == "net:[%d]" % d.netns.ino()[1]
        assert {m["stub_pid"] for m in st["mappings"]} == {p.pid for p in d.proxies()}, st

    a.netns.run(["kill", "-9", ea.pid], check=True)
    assert_pages(a, "127.0.0.1", [port], page_token)
    assert [e.pid for e in b.engines()] == [eb.pid], b.diagnostics()
    assert_pages(b, "::1", [port], page_token)
    assert [e.pid for e in a.engines()] != [ea.pid], a.diagnostics()


def test_status_during_traffic(docker, engine_mode, page_token):
    """`spliceproxy status` while a connection is open: the mapping, its stub, an
    active connection, the totals and bytes so far; table and Prometheus too."""
    d = docker
    port = 18140
    d.docker("run", "-d", "--name", "stat", "-p", f"{port}:80", "local/spe2e-busybox:test",
             *HTTPD)
    with Routes(d, [port]) as routes:
        assert_pages(d, "127.0.0.1", [port, port, port], page_token)
    routes.expect(fast=[("0.0.0.0", port)])
    # Held open by a relayed client (outside the clients' cgroup): the relay's
    # counters are what this scenario reads.
    held = d.netns.open_request("127.0.0.1", port, cgroup=False)
    try:
        deadline = time.monotonic() + 5.0
        while True:
            doc = d.status()
            mine = [m for m in doc["mappings"] if m["host"].endswith(f":{port}")]
            v4 = [m for m in mine if m["host"].startswith("0.0.0.0")]
            c = v4[0].get("counters") if v4 else None
            if c and c.get("tcp_active", 0) >= 1 and c.get("bytes_c2b", 0) >= 4000:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"status never showed the open connection: {doc}")
            time.sleep(0.05)
        assert len(mine) == 2, doc
        stubs = {p.pid: p for p in d.proxies()}
        assert {m["stub_pid"] for m in mine} <= set(stubs), (doc, stubs)
        assert all(m["proto"] == "tcp" for m in mine)
        if d.proxy.fastpath:
            # The three pages went straight to the container, uncounted here.
            assert c["tcp_accepted"] >= 1, c
            assert v4[0]["fastpath"]["connections"] >= 3, v4[0]
        else:
            assert c["tcp_accepted"] >= 4 and c["bytes_b2c"] > 3 * len(page_token), c

        env = d.status_env()
        table = subprocess.run(d.status_argv(), capture_output=True, text=True,
                               timeout=20, env=env)
        assert table.returncode == 0, table.stderr
        assert f"0.0.0.0:{port}" in table.stdout and str(v4[0]["stub_pid"]) in table.stdout, \
            table.stdout
        prom = subprocess.run(d.status_argv("--prometheus"), capture_output=True,
                              text=True, timeout=20, env=env)
        assert prom.returncode == 0, prom.stderr
        assert f'host_port="{port}"' in prom.stdout and "# TYPE" in prom.stdout, prom.stdout
        # The same text from the engine's /metrics, on the unix socket that
        # dockerd's environment names (SPLICEPROXY_METRICS_ADDR).
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(d.metrics_socket))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: spliceproxy\r\n\r\n")
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        active = [ln for ln in body.decode().splitlines()
                  if ln.startswith("spliceproxy_mapping_tcp_active{")
                  and f'host_ip="0.0.0.0",host_port="{port}"' in ln]
        assert len(active) == 1 and int(active[0].rsplit(" ", 1)[1]) >= 1, body[:2000]
    finally:
        held.stdin.close()
        held.wait(10)


def _settled(probe, timeout: float = 3.0):
    """Poll probe() until it returns something empty or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# dockerd's own limit on a userland proxy's start (portmapper/proxy.go): a
# proxy that has not reported on fd 3 by then fails the container's start.
DOCKERD_PROXY_TIMEOUT = 16.0


def test_burst_8_containers_2_ports_started_at_once(docker, page_token):
    """As `docker compose up` does: 8 containers with 2 published TCP ports
    each, `docker run -d` all at once (in engine mode with no engine running:
    the stubs race to start it).  Every run succeeds well within dockerd's
    16 s limit on a proxy's start, and every port serves."""
    d = docker
    if d.proxy.engine:
        # The previous test's mappings are gone; so is their engine (1 s idle exit).
        assert not _settled(d.engines, timeout=10.0), d.diagnostics()
    base, count = 18300, 8
    ports = [base + i for i in range(2 * count)]

    def run(i: int) -> tuple[int, float, str]:
        t0 = time.monotonic()
        r = d.docker("run", "-d", "--name", f"burst{i}", "-p", f"{base + 2 * i}:80",
                     "-p", f"{base + 2 * i + 1}:81", "local/spe2e-busybox:test", "/bin/sh", "-c",
                     "httpd -p 81 -h /www && exec httpd -f -p 80 -h /www", check=False,
                     timeout=60)
        return r.returncode, time.monotonic() - t0, r.stderr.strip()

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(run, range(count)))
    failed = [(i, r) for i, r in enumerate(results) if r[0] != 0]
    assert not failed, f"docker run failed in the burst: {failed}\n{d.diagnostics()}"
    slowest = max(r[1] for r in results)
    assert slowest < DOCKERD_PROXY_TIMEOUT, (
        f"slowest docker run took {slowest:.1f}s: {results}\n{d.diagnostics()}")
    procs = d.proxies()
    assert len(procs) == 2 * len(ports), (
        f"{len(procs)} proxies for {len(ports)} ports\n" + "\n".join(map(str, procs)))
    if d.proxy.engine:
        assert len(d.engines()) == 1, d.diagnostics()
        assert len(d.status()["mappings"]) == 2 * len(ports)
    with Routes(d, ports) as routes:
        assert_pages(d, "127.0.0.1", ports, page_token)
    routes.expect(fast=[("0.0.0.0", p) for p in ports])
    assert_pages(d, "::1", ports, page_token)
    print(f"burst of {count} docker run with 2 ports each: slowest {slowest:.2f}s, "
          f"mean {sum(r[1] for r in results) / count:.2f}s")


# --------------------------------------------------------------------------
# what only dockerd 28+ does


def _ours(d) -> set[int]:
    """Pids of the proxy under test's processes in the daemon's namespace."""
    return {p.pid for p in d.proxies()} | {e.pid for e in d.engines()}


def test_listen_fd_adopted_for_tcp_and_udp(dockerd28, docker, page_token):
    """dockerd 28 binds each port itself and starts the proxy with the socket on
    fd 4 and `-use-listen-fd`: the proxy (stub and engine) serves that very
    socket and binds none of its own; UDP arrives with PKTINFO set, so a reply
    leaves from the address the datagram was sent to (127.0.0.2, an extra
    IPv6 address) and the connected clients accept it."""
    d = docker
    tcp, udp = 18200, 18201
    with BindTrace(d.pid, d.workdir / "binds.trace") as trace:
        d.docker("run", "-d", "--name", "fd4", "-p", f"{tcp}:80", "-p", f"{udp}:5353/udp",
                 "local/spe2e-busybox:test", "/bin/sh", "-c",
                 "/bin/udp_echo 5353 & exec /bin/httpd -f -p 80 -h /www")
    d.wait_log("fd4", "ready 5353")
    ip = d.container_ip("fd4")
    procs = d.proxies()
    ours = _ours(d)
    listing = "\n".join(map(str, procs))
    for proto, port, cport in (("tcp", tcp, 80), ("udp", udp, 5353)):
        for host_ip in ("0.0.0.0", "::"):
            tail = argv_tail(d, proto, host_ip, port, ip, cport)
            assert tail.endswith(" -use-listen-fd")
            assert any(p.args.endswith(tail) for p in procs), f"no `{tail}`:\n{listing}"
        binds = trace.binds(port)
        # dockerd's threads bound the port, one socket per family; nothing of ours did.
        assert sorted(b.family for b in binds if b.ok) == ["AF_INET", "AF_INET6"], binds
        assert not [b for b in binds if b.pid in ours], (
            f"the proxy bound port {port} itself: {binds}\n{listing}")
        assert all(os.path.exists(f"/proc/{d.pid}/task/{b.pid}") for b in binds), (
            f"a bind of port {port} by something other than dockerd: {binds}")
        # The socket on the port is the proxy's (the stub's, and in engine
        # mode the engine's too: the stub handed it over and keeps it).
        listeners = d.netns.listeners(proto, port)
        assert set(listeners) == {"0.0.0.0", "::"}, listeners
        for host_ip, ino in listeners.items():
            (stub,) = [p for p in procs if f" -proto {proto} -host-ip {host_ip} " in p.args
                       and f" -host-port {port} " in p.args]
            assert ino in socket_inodes(stub.pid), (host_ip, ino, stub)
            if d.proxy.engine:
                (engine,) = d.engines()
                assert ino in socket_inodes(engine.pid), (host_ip, ino, engine)

    # Relayed traffic (outside the fast path's cgroup): the proxy's own work.
    for host in ("127.0.0.1", "::1"):
        res = d.netns.client("http", host, tcp, cgroup=False)
        assert all(r["ok"] and r["body"].strip() == page_token for r in res["results"]), res
    d.netns.run(["ip", "addr", "replace", "2001:2:0:ffff::7/128", "dev", "lo", "nodad"],
                check=True)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "2001:2:0:ffff::7"):
        res = d.netns.client("udp", host, udp, "--clients", "3", "--count", "3", cgroup=False)
        assert res["echoed"] == res["sent"] == 9 and not res["failures"], (
            f"UDP via {host}: {res}\n{d.diagnostics()}")


def _ipv4_in(d, name: str, network: str) -> str:
    return d.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}")'
                    '.IPAddress}}', name).stdout.strip()


def _proxied_ips(d, port: int) -> set[str]:
    """The container addresses of the proxies of host port `port`."""
    out = set()
    for p in proxies_for_port(d, port):
        words = p.args.split()
        out.add(words[words.index("-container-ip") + 1])
    return out


def test_proxies_follow_the_gateway_network(dockerd28, docker, e2e_network, page_token):
    """dockerd 28 publishes a container's ports on its gateway network only:
    connecting a second network changes nothing; disconnecting the gateway
    network stops its proxies and starts new ones to the address on the
    network left; disconnecting that one too stops them all and frees the
    port; connecting again starts them again."""
    d = docker
    port = 18210
    net_a, net_b = "spe2e-a", "spe2e-b"
    d.docker("network", "create", "--subnet", e2e_network.spare[0], net_a)
    try:
        d.docker("network", "create", "--subnet", e2e_network.spare[1], net_b)
        d.docker("run", "-d", "--name", "moving", "--network", net_a, "-p", f"{port}:80",
                 "local/spe2e-busybox:test", *HTTPD)
        ip_a = _ipv4_in(d, "moving", net_a)
        assert _proxied_ips(d, port) == {ip_a}, d.diagnostics()
        first = {p.pid for p in proxies_for_port(d, port)}
        assert len(first) == 2
        assert_pages(d, "127.0.0.1", [port], page_token)

        d.docker("network", "connect", net_b, "moving")
        ip_b = _ipv4_in(d, "moving", net_b)
        assert ip_b and ip_b != ip_a
        assert {p.pid for p in proxies_for_port(d, port)} == first, d.diagnostics()
        assert_pages(d, "127.0.0.1", [port], page_token)

        d.docker("network", "disconnect", net_a, "moving")
        moved = _settled(lambda: [p for p in d.proxies() if p.pid in first])
        assert not moved, f"proxies to {ip_a} outlived its network: {moved}\n{d.diagnostics()}"
        assert _proxied_ips(d, port) == {ip_b}, d.diagnostics()
        assert len(proxies_for_port(d, port)) == 2, d.diagnostics()
        with Routes(d, [port]) as routes:
            assert_pages(d, "127.0.0.1", [port], page_token)
        routes.expect(fast=[("0.0.0.0", port)])
        assert_pages(d, "::1", [port], page_token)

        d.docker("network", "disconnect", net_b, "moving")
        left = _settled(lambda: proxies_for_port(d, port))
        assert not left, f"proxies outlived the last network: {left}\n{d.diagnostics()}"
        assert_port_free(d, "tcp", port)
        assert_refused(d, "127.0.0.1", port)

        d.docker("network", "connect", net_a, "moving")
        assert _proxied_ips(d, port) == {_ipv4_in(d, "moving", net_a)}, d.diagnostics()
        assert_pages(d, "127.0.0.1", [port], page_token)
    finally:
        d.remove_all_containers()
        d.docker("network", "rm", net_a, net_b, check=False)


def test_ipv6_network_v6_to_v6_and_6to4(dockerd28, docker, e2e_network, page_token):
    """A network made with --ipv6 and a v6 subnet: dockerd 28 gives the `::`
    binding the container's IPv6 address (v6 host address -> v6 container,
    TCP and UDP); a container on an IPv4-only network keeps the 6->4 path."""
    d = docker
    web, echo, web4 = 18220, 18221, 18222
    net = "spe2e-v6"
    d.docker("network", "create", "--ipv6", "--subnet", e2e_network.spare[0],
             "--subnet", e2e_network.spare6[0], net)
    try:
        d.docker("run", "-d", "--name", "six", "--network", net, "-p", f"{web}:80",
                 "-p", f"{echo}:5353/udp", "local/spe2e-busybox:test", "/bin/sh", "-c",
                 "/bin/udp_echo 5353 6 & exec /bin/httpd -f -p 80 -h /www")
        d.docker("run", "-d", "--name", "four", "-p", f"{web4}:80", "local/spe2e-busybox:test",
                 *HTTPD)
        d.wait_log("six", "ready 5353")
        ip6 = d.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}")'
                       '.GlobalIPv6Address}}', "six").stdout.strip()
        ip4 = _ipv4_in(d, "six", net)
        assert ip6.startswith(e2e_network.spare6[0].split("::")[0] + ":"), ip6
        four = d.container_ip("four")
        procs = d.proxies()
        listing = "\n".join(map(str, procs))
        for tail in (argv_tail(d, "tcp", "::", web, ip6, 80),
                     argv_tail(d, "udp", "::", echo, ip6, 5353),
                     argv_tail(d, "tcp", "0.0.0.0", web, ip4, 80),
                     argv_tail(d, "udp", "0.0.0.0", echo, ip4, 5353),
                     argv_tail(d, "tcp", "::", web4, four, 80)):
            assert any(p.args.endswith(tail) for p in procs), f"no `{tail}`:\n{listing}"

        # ::1 is never NATed: the proxy's.  v6 -> v6 and 6 -> 4 side by side.
        res = d.netns.client("http", "::1", web, web4, cgroup=False)
        assert all(r["ok"] and r["body"].strip() == page_token for r in res["results"]), res
        assert_pages(d, "127.0.0.1", [web, web4], page_token)
        for host in ("::1", "127.0.0.1"):
            res = d.netns.client("udp", host, echo, "--clients", "3", "--count", "3",
                                 cgroup=False)
            assert res["echoed"] == res["sent"] == 9 and not res["failures"], (
                f"UDP via {host}: {res}\n{d.diagnostics()}")
    finally:
        d.remove_all_containers()
        d.docker("network", "rm", net, check=False)


def test_hairpin_container_reaches_its_own_published_port(dockerd28, docker, page_token):
    """A container dialling its own published port on the host's address: with
    the userland proxy on, dockerd 28 leaves traffic from the bridge out of
    its DNAT rules, so the proxy serves it (and in engine mode counts it)."""
    d = docker
    port = 18230
    d.docker("run", "-d", "--name", "self", "-p", f"{port}:80", "local/spe2e-busybox:test",
             *HTTPD)
    nat = d.netns.run(["iptables", "-t", "nat", "-S", "DOCKER"], check=True).stdout
    assert "-A DOCKER -i docker0 -j RETURN" in nat, nat
    before = _relayed(d, port)
    pid = d.docker("inspect", "-f", "{{.State.Pid}}", "self").stdout.strip()
    res = d.netns.client("http", d.gateway, port, netns_path=f"/proc/{pid}/ns/net")
    assert all(r["ok"] and r["body"].strip() == page_token for r in res["results"]), (
        f"{res}\n{d.diagnostics()}")
    if d.proxy.engine:
        assert _relayed(d, port) > before, d.diagnostics()


def _relayed(d, port: int) -> int:
    """Connections the engine relayed on the 0.0.0.0 mapping of port (engine mode)."""
    if not d.proxy.engine:
        return 0
    for m in d.status()["mappings"]:
        if m["host"] == f"0.0.0.0:{port}":
            return (m.get("counters") or {}).get("tcp_accepted", 0)
    raise AssertionError(f"no mapping 0.0.0.0:{port}: {d.status()}")


def test_rootless_detach_netns_invocation(nsenter_dockerd, engine_mode, page_token):
    """dockerd 29.5 (rootless, --detach-netns) starts the proxy as
    `nsenter -n<netns> -F -- <proxy> ...`: descriptors 3 and 4 pass through
    nsenter, and the stub finds the engine of the namespace it was put in."""
    d = nsenter_dockerd
    port = 18150
    d.docker("run", "-d", "--name", "ns", "-p", f"{port}:80", "-p", f"{port}:5353/udp",
             "local/spe2e-busybox:test", "/bin/sh", "-c",
             "/bin/udp_echo 5353 & exec /bin/httpd -f -p 80 -h /www")
    d.wait_log("ns", "ready 5353")
    for host in ("127.0.0.1", "::1"):
        assert_pages_outside_cgroup(d, host, [port], page_token)
        res = d.netns.client("udp", host, port, "--clients", "2", "--count", "3",
                             cgroup=False)
        assert res["echoed"] == res["sent"] == 6 and not res["failures"], res
    stubs = d.proxies()
    assert len(stubs) == 4 and all(p.comm == "spliceproxy" for p in stubs), stubs
    doc = d.status()
    assert doc["engine"]["netns"] == "net:[%d]" % d.netns.ino()[1]
    assert {m["stub_pid"] for m in doc["mappings"]} == {p.pid for p in stubs}, doc
    d.docker("rm", "-f", "ns")
    assert_port_free(d, "tcp", port)
    assert_port_free(d, "udp", port)
