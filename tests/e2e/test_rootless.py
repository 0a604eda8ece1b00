"""A real rootless dockerd (RootlessKit + slirp4netns, docker.io's
dockerd-rootless.sh) run by a user created for the test, with spliceproxy in
engine mode, the default, and standalone as its userland proxy.

A published port reaches the host through RootlessKit's port driver; the
stub and its engine run in RootlessKit's user and network namespaces, as
the user.  There, the stub is root of a user namespace: it must take its
engine's socket from the user's XDG_RUNTIME_DIR (RootlessKit's /run is a
copy whose /run/spliceproxy may be a link to the host's, which the stub
refuses), and the engine must keep the user's ids (no dynamic uid is
mapped there).  Before that, every container with a published port failed
to start: "cannot open /run/spliceproxy: Not a directory (it must be a
directory, not a link)".
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import urllib.request
import uuid

import pytest

from spliceproxy import control

from support import dockerd as dk
from support import rootless
from support import servers as srv

IMAGE = "local/rl-busybox:test"
CAP_NET_BIND_SERVICE = 10
NETNS_PREFIX = os.environ.get("SPLICEPROXY_E2E_NETNS_PREFIX") or "spe2e-"
SCRATCH_HALF = "198.18.78.0/24"  # conftest's: the scratch daemon's default range


def _bip() -> str:
    """The rootless bridge, from the suite's range (SPLICEPROXY_E2E_SUBNET or
    the scratch daemon's half): it lives in RootlessKit's namespace, so only
    the host needs the range to be free, as for the other daemons."""
    net = ipaddress.ip_network(os.environ.get("SPLICEPROXY_E2E_SUBNET") or SCRATCH_HALF)
    return f"{next(net.hosts())}/{net.prefixlen}"


@pytest.fixture(params=[(b, m) for b in dk.docker_builds() for m in ("engine", "standalone")],
                ids=lambda p: f"{p[1]}-{p[0]}")
def rootless_dockerd(request):
    label, mode = request.param
    build = dk.docker_builds()[label]
    why = rootless.missing(build)
    if why is not None:
        dk.unmet(why)
    path, _ = dk.proxy_program()
    # What a killed run left: its user (whose processes went with the run:
    # setpriv's parent-death signal), then its directories.
    gone = rootless.clean_stale(NETNS_PREFIX) + dk.clean_stale(NETNS_PREFIX)
    if gone:
        print(f"rootless: removed what dead runs left behind: {', '.join(gone)}")
    d = rootless.RootlessDaemon(build, path, NETNS_PREFIX, _bip(),
                                env={"SPLICEPROXY_ENGINE": "0"} if mode == "standalone" else {})
    try:
        d.start()
        yield d
    finally:
        d.close()
    if d.leaks:
        pytest.fail("rootless teardown found leftovers:\n" + "\n".join(d.leaks), pytrace=False)


def _image(d: rootless.RootlessDaemon, page: str) -> None:
    root = d.workdir / "rootfs"
    root.mkdir()
    dk.busybox_rootfs(root, page, ("sh", "httpd"))
    tar = d.workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True, timeout=30)
    tar.chmod(0o644)
    with open(tar, "rb") as f:
        d.docker("import", "-", IMAGE, stdin=f)


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        return r.read().decode()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_rootless_dockerd_publishes_through_spliceproxy(rootless_dockerd):
    d = rootless_dockerd
    page = f"rootless {uuid.uuid4().hex}"
    _image(d, page)
    port = srv.free_port()
    cid = d.docker("run", "-d", "-p", f"{port}:80", IMAGE,
                   "/bin/httpd", "-f", "-p", "80", "-h", "/www").stdout.strip()

    # Served on the host's loopback, through RootlessKit's port driver.
    assert srv.wait_for(lambda: _try_get(port) == page + "\n", 15.0), \
        f"no page on 127.0.0.1:{port}\n{dk.tail(d.log, 30)}"

    # The proxies dockerd started are ours, in RootlessKit's namespaces: the
    # stub, or standalone the front end it became.
    child = d.child_pid()
    rootless_ns = rootless.netns_of(child)
    assert rootless_ns != os.readlink("/proc/self/ns/net")
    proxy = os.path.realpath(d.proxy)
    stubs = [p for p in rootless.user_pids(d.uid)
             if "-host-port" in rootless.cmdline(p) and str(port) in rootless.cmdline(p)
             and (_exe(p) == proxy if d.mode == "engine" else
                  any(a.endswith("spliceproxy-front") for a in rootless.cmdline(p)))]
    hosts = sorted(_flag(rootless.cmdline(p), "-host-ip") for p in stubs)
    assert "127.0.0.1" in hosts, (hosts, [rootless.cmdline(p) for p in stubs])
    assert {rootless.netns_of(p) for p in stubs} == {rootless_ns}
    if d.mode == "standalone":
        # Each keeps the user's ids (uid 0 there) and no capability at all.
        for p in stubs:
            assert set(_caps(p).values()) == {0}, (rootless.cmdline(p), _caps(p))
        _remove_frees_the_port(d, cid, stubs, port)
        return

    # Its engine: one, of that namespace, its socket in the user's runtime
    # directory, serving those stubs' mappings.
    st = os.stat(f"/proc/{child}/ns/net")
    sock = f"{d.runtime}/spliceproxy/{control.socket_name((st.st_dev, st.st_ino))}"
    engines = [p for p in rootless.user_pids(d.uid)
               if "engine" in rootless.cmdline(p)
               and any(a.endswith("spliceproxy-front") for a in rootless.cmdline(p))]
    assert [_flag(rootless.cmdline(p), "--socket") for p in engines] == [sock], \
        [rootless.cmdline(p) for p in engines]
    assert rootless.netns_of(engines[0]) == rootless_ns
    # It stays the user (uid 0 of RootlessKit's namespace: no dynamic uid is
    # mapped there) with no capability over that namespace but binding.
    caps = _caps(engines[0])
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == 1 << CAP_NET_BIND_SERVICE, caps
    r = subprocess.run(d.in_namespaces([d.proxy, "status", "--json"]), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["engine"]["pid"] == engines[0] and doc["engine"]["socket"] == sock
    assert doc["engine"]["netns"] == rootless_ns
    assert sorted(m["stub_pid"] for m in doc["mappings"]) == sorted(stubs)
    assert any(m["host"] == f"127.0.0.1:{port}" and m["container"].endswith(":80")
               for m in doc["mappings"]), doc["mappings"]

    _remove_frees_the_port(d, cid, stubs, port)


def _remove_frees_the_port(d: rootless.RootlessDaemon, cid: str, stubs: list[int],
                           port: int) -> None:
    """docker rm -f: the proxies end, the host's port is free again."""
    d.docker("rm", "-f", cid)
    assert not dk.wait_gone(stubs, 10.0), [rootless.cmdline(p) for p in stubs]
    assert srv.wait_for(lambda: _refused(port), 10.0), f"127.0.0.1:{port} still answers"
    with socket.socket() as s:  # (the page's connection may be in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def _try_get(port: int) -> str | None:
    try:
        return _get(port)
    except OSError:
        return None


def _caps(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":\t", 1) for line in f)
                if k.startswith("Cap")}


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == name:
            return argv[i + 1]
    return None
