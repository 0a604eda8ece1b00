"""Fixtures of the dockerd suite: a private dockerd in its own network
namespace, with the proxy under test as its userland proxy (the daemon and
namespace helpers are tests/support/dockerd.py).

Every scenario runs against two daemons (``docker_build``): the system's
dockerd 20.10 (Debian 12's docker.io, the pre-28 protocol: the proxy binds)
and Debian unstable's dockerd 28.5 unpacked by scripts/fetch-docker-sid
(``SPLICEPROXY_DOCKER_SID``, default /var/cache/spliceproxy/docker-sid; the
28+ protocol: the socket on fd 4 with ``-use-listen-fd``).  Scenarios of what
only 28+ does skip under 20.10 with "needs dockerd 28+".

Everything a daemon needs lives in one temporary directory (data-root,
exec-root, socket, pidfile, containerd's root and state) and one network
namespace named ``<prefix><pid>[-b]`` (the prefix is
``SPLICEPROXY_E2E_NETNS_PREFIX``, default ``spe2e-``, the two daemons' bridge
subnets the halves of ``SPLICEPROXY_E2E_SUBNET``; a range the host already
uses or a namespace of the prefix that is not a dead run's fails the session
with the reason).  What a run whose process is gone left behind (namespaces,
directories, clients' cgroups) is removed first.  containerd is started by the
fixture with the same private paths, so a containerd already running on the
machine is never used.  Teardown removes containers, stops dockerd and
containerd, kills whatever is still running in the namespace (and reports it
as a leak), unmounts what is left under the directory, deletes the namespace
and the directory, also when the test failed.

Which proxy: the ``spliceproxy`` installed for this interpreter by default, or
the absolute path in ``SPLICEPROXY_E2E_PROXY`` (e.g. ``/usr/sbin/docker-proxy``
to run the same scenarios against the reference). spliceproxy runs every
scenario three times: standalone (``SPLICEPROXY_ENGINE=0`` in dockerd's
environment), in engine mode (``SPLICEPROXY_ENGINE=1`` and one
``SPLICEPROXY_ENGINE_DIR`` for the whole session, as /run/spliceproxy is on a
host: each daemon's stubs find the engine of their own namespace by its
name there, while an engine of the host's namespace serves a mapping of its
own in the same directory all along; a 1 s idle exit, so an engine never
outlives its daemon's last mapping by more than that), and in engine mode
with the kernel fast path on (``fastpath``:
``SPLICEPROXY_FASTPATH=1``, ``SPLICEPROXY_FASTPATH_CGROUP`` a child cgroup
``<prefix><pid>[-suffix]-fp`` made for each daemon). In that mode the
host-local clients (netns_client.py run in the daemon's namespace) are moved
into their daemon's cgroup before they exec, so they are the only processes
on the machine the programs ever rewrite; teardown checks that nothing is
attached to that cgroup any more, removes it, and at the end of the mode that
the cgroup v2 root carries no more programs than before.
Prerequisites that are missing skip the suite with the reason, unless
``SPLICEPROXY_E2E_REQUIRE=1`` (CI), which turns them into errors.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from spliceproxy import control, engine_status
from spliceproxy import fastpath as fastpath_mod
from spliceproxy.bench.launch import proxy_argv, spawn

from support import cc as cc_flags
from support import dockerd as dk
from support import fastpath_env
from support import servers as srv
from support.dockerd import Daemon, DockerBuild, Netns, ProxyUnderTest
from support.engine import kill_engines

HERE = Path(__file__).resolve().parent
UDP_ECHO_SRC = HERE / "udp_echo.c"

# The ranges of the two daemons (bridge and networks a test creates), from
# the benchmarking range; with SPLICEPROXY_E2E_SUBNET set, the halves of it.
SESSION_HALF = "198.18.77.0/24"
SCRATCH_HALF = "198.18.78.0/24"
NETNS_PREFIX = os.environ.get("SPLICEPROXY_E2E_NETNS_PREFIX") or "spe2e-"

APPLETS = ("sh", "httpd", "sleep", "seq", "cat", "echo", "ls")

_LIVE_DAEMONS: list[Daemon] = []


# --------------------------------------------------------------------------
# fixtures


def _fastpath_prerequisite() -> str | None:
    if fastpath_mod.default_cgroup_path() is None:
        return "cgroup v2 is not mounted"
    return None


@pytest.fixture(scope="session", params=["standalone", "engine", "fastpath"])
def proxy_under_test(request) -> ProxyUnderTest:
    dk.require_prerequisites()
    path, _ = dk.proxy_program()
    assert path is not None
    proxy = ProxyUnderTest(path=path, name=os.path.basename(path)[:15],
                           engine=request.param in ("engine", "fastpath"),
                           fastpath=request.param == "fastpath")
    if proxy.engine and proxy.is_reference:
        pytest.skip("engine mode is spliceproxy's; the reference runs standalone only")
    if proxy.engine and not os.access(proxy.stub, os.X_OK):
        pytest.fail(f"engine mode: no executable {proxy.stub} beside {path}", pytrace=False)
    if not proxy.fastpath:
        yield proxy
        return
    why = _fastpath_prerequisite()
    if why is not None:
        dk.unmet(f"fast-path mode: {why}")
    root = fastpath_mod.default_cgroup_path()
    on_root = fastpath_mod.attached(root)
    loaded = fastpath_mod.programs_loaded()
    yield proxy
    # The engines attached to their daemons' cgroups only, and went with them.
    assert fastpath_mod.attached(root) == on_root, (
        f"programs on the cgroup v2 root changed: {on_root} -> {fastpath_mod.attached(root)}")
    deadline = time.monotonic() + 10.0
    while fastpath_mod.programs_loaded() > loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    now = fastpath_mod.programs_loaded()
    if now > loaded:
        # More than before: ours, unless other work on the machine (a
        # benchmark's fast path, another test run) attached some meanwhile.
        others = fastpath_env.attached_elsewhere((f"{NETNS_PREFIX}{os.getpid()}",))
        assert others, (f"fast-path programs loaded: {loaded} before the fast-path mode, "
                        f"{now} after, and no other cgroup holds any")


@pytest.fixture(scope="session")
def engine_dir(proxy_under_test):
    """Engine mode: the session's directory of engine sockets, and in it, for
    as long as the mode runs, an engine of the host's own namespace serving a
    mapping of its own.  The daemons' stubs, each in its daemon's namespace,
    must find their own namespace's engine and never that one (before one
    engine per namespace, an engine alive elsewhere broke 6 of 13 checks)."""
    if not proxy_under_test.engine:
        yield None
        return
    d = Path(tempfile.mkdtemp(prefix=f"{NETNS_PREFIX}{os.getpid()}-engines-", dir="/tmp"))
    d.chmod(0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLICEPROXY_")}
    env.update(SPLICEPROXY_ENGINE="1", SPLICEPROXY_ENGINE_DIR=str(d),
               SPLICEPROXY_ENGINE_IDLE_EXIT="1s")
    echo = srv.EchoServer("127.0.0.1")
    port = srv.free_port()
    stub = None
    try:
        stub = spawn(proxy_argv(proxy_under_test.path, "tcp", "127.0.0.1", port, "127.0.0.1",
                                echo.port), env=env, timeout=15.0)
        yield d
        # Still served all along, by an engine that took none of the daemons'.
        srv.echo_roundtrip("127.0.0.1", port, b"host namespace")
        doc = engine_status.query(str(d / control.socket_name(control.netns_id())))
        assert [m["stub_pid"] for m in doc["mappings"]] == [stub.pid], doc
    finally:
        if stub is not None:
            stub.stop()
        echo.close()
        for sock in d.glob("*.sock"):
            kill_engines(str(sock))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session", params=list(dk.docker_builds()))
def docker_build(request) -> DockerBuild:
    """Which dockerd the scenarios run against (20.10 and 28.5)."""
    dk.require_prerequisites()
    build = dk.docker_builds()[request.param]
    why = build.missing()
    if why is not None:
        dk.unmet(why)
    return build


@pytest.fixture
def dockerd28(docker_build) -> DockerBuild:
    """For what only dockerd 28+ does (the socket on fd 4, proxies per network,
    the hairpin left to the proxy)."""
    if dk.major(docker_build.label) < 28:
        pytest.skip("needs dockerd 28+")
    return docker_build


@pytest.fixture
def engine_mode(proxy_under_test) -> ProxyUnderTest:
    """For scenarios of engine mode alone (with or without the fast path)."""
    if not proxy_under_test.engine:
        pytest.skip("engine mode only")
    return proxy_under_test


class E2ENetwork(NamedTuple):
    """The addresses of a session's daemons: each daemon's bridge in the first
    half of its half of the range, the shared daemon's user-defined networks
    in the second half of its own (IPv6: from the benchmarking block
    2001:2::/48).  Each daemon has a namespace of its own, so only the
    whole range has to be free on the host."""

    session_bip: str
    scratch_bip: str
    #: two subnets for networks a test creates on the shared daemon
    spare: tuple[str, str]
    #: two IPv6 /64s for the same
    spare6: tuple[str, str]


def _plan(halves) -> E2ENetwork:
    bips, spare = [], []
    for h in halves:
        low, high = h.subnets(prefixlen_diff=1)
        bips.append(f"{next(low.hosts())}/{low.prefixlen}")
        spare.append(tuple(str(n) for n in high.subnets(prefixlen_diff=1)))
    tag = 0xe200 | int(str(halves[0].network_address).split(".")[2])
    return E2ENetwork(bips[0], bips[1], spare[0],
                      (f"2001:2:0:{tag:x}::/64", f"2001:2:1:{tag:x}::/64"))


def _e2e_network() -> E2ENetwork:
    """The session's addresses, checked against the host; pytest.fail with the reason."""
    import ipaddress

    from spliceproxy.bench import topology

    raw = os.environ.get("SPLICEPROXY_E2E_SUBNET")
    if raw:
        try:
            net = ipaddress.ip_network(raw, strict=True)
        except ValueError as exc:
            pytest.fail(f"SPLICEPROXY_E2E_SUBNET={raw!r}: {exc}", pytrace=False)
        if net.version != 4 or net.prefixlen > 26:
            pytest.fail(f"SPLICEPROXY_E2E_SUBNET={raw!r}: need an IPv4 /26 or larger "
                        "(two bridges and two networks)", pytrace=False)
        halves = list(net.subnets(prefixlen_diff=1))
        ranges = [str(net)]
    else:
        halves = [ipaddress.ip_interface(b).network for b in (SESSION_HALF, SCRATCH_HALF)]
        ranges = [str(h) for h in halves]
    try:
        topology.check_prefix(NETNS_PREFIX)
        _clean_stale_once()
        for r in ranges:
            clash = topology.subnet_conflicts(r)
            if clash:
                raise topology.ConfigError(
                    f"{r} is already in use on this host ({'; '.join(clash[:5])}); choose "
                    "another with SPLICEPROXY_E2E_SUBNET")
        names = topology.prefix_conflicts(NETNS_PREFIX)
        if names:
            raise topology.ConfigError(
                f"network namespace(s) with prefix {NETNS_PREFIX!r} already exist "
                f"({', '.join(names[:5])}); choose another with SPLICEPROXY_E2E_NETNS_PREFIX")
    except topology.ConfigError as exc:
        pytest.fail(f"e2e network: {exc}", pytrace=False)
    return _plan(halves)


_CLEANED: list[str] = []


def _clean_stale_once() -> None:
    """Remove, at the session's start, what a run of this prefix whose
    process is gone left behind (a killed or cancelled run)."""
    if not _CLEANED:
        _CLEANED.append(NETNS_PREFIX)
        gone = dk.clean_stale(NETNS_PREFIX)
        if gone:
            print(f"e2e: removed what dead runs left behind: {', '.join(gone)}")


@pytest.fixture(scope="session")
def e2e_network(proxy_under_test) -> E2ENetwork:
    return _e2e_network()


@pytest.fixture(scope="session")
def page_token() -> str:
    """Content of the page httpd serves, unique per run."""
    return f"spliceproxy e2e {uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def image_rootfs(proxy_under_test, page_token):
    """busybox-static + the UDP echo compiled now, laid out as an image root."""
    root = Path(tempfile.mkdtemp(prefix=f"{NETNS_PREFIX}{os.getpid()}-rootfs-", dir="/tmp"))
    try:
        dk.busybox_rootfs(root, page_token, APPLETS)
        r = subprocess.run(["gcc", "-static", "-O2", *cc_flags.cflags(),
                            "-o", str(root / "bin" / "udp_echo"), str(UDP_ECHO_SRC)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            msg = f"gcc -static failed (libc6-dev installed?): {r.stderr.strip()}"
            if os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1":
                pytest.fail(msg, pytrace=False)
            pytest.skip(f"e2e: {msg}")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _new_daemon(proxy: ProxyUnderTest, build: DockerBuild, rootfs: Path, bip: str,
                suffix: str, **kw) -> Daemon:
    name = f"{NETNS_PREFIX}{os.getpid()}{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    d = Daemon(netns=Netns(name), workdir=workdir, proxy=proxy, bip=bip, rootfs=rootfs,
               build=build, **kw)
    _LIVE_DAEMONS.append(d)
    try:
        d.start()
    except BaseException:
        d.close()
        _LIVE_DAEMONS.remove(d)
        raise
    return d


def _finish(d: Daemon) -> None:
    try:
        d.close()
    finally:
        _LIVE_DAEMONS.remove(d)
    if d.leaks:
        pytest.fail("teardown found leftovers:\n" + "\n".join(d.leaks), pytrace=False)


@pytest.fixture(scope="session")
def dockerd(proxy_under_test, docker_build, image_rootfs, e2e_network, engine_dir):
    """One daemon per mode and build shared by the scenarios (started once)."""
    d = _new_daemon(proxy_under_test, docker_build, image_rootfs, e2e_network.session_bip, "",
                    engine_dir=engine_dir)
    yield d
    _finish(d)


@pytest.fixture
def docker(dockerd):
    """The shared daemon, emptied of containers after each test, checked for leftover proxies."""
    yield dockerd
    if not dockerd.alive():
        pytest.fail("the shared dockerd died during the test\n" + dockerd.diagnostics(),
                    pytrace=False)
    dockerd.remove_all_containers()
    left = dk.wait_gone([p.pid for p in dockerd.proxies()], 10.0)
    if left:
        stray = [str(p) for p in dockerd.proxies()]
        for pid in left:
            dk.signal_pid(pid, signal.SIGKILL)
        pytest.fail("proxy processes survived removal of every container:\n"
                    + "\n".join(stray) + "\n" + dockerd.diagnostics(), pytrace=False)


@pytest.fixture
def scratch_dockerd(proxy_under_test, docker_build, image_rootfs, e2e_network, engine_dir):
    """A daemon of its own, for a test that stops it."""
    d = _new_daemon(proxy_under_test, docker_build, image_rootfs, e2e_network.scratch_bip, "-b",
                    engine_dir=engine_dir)
    yield d
    _finish(d)


@pytest.fixture
def nsenter_dockerd(proxy_under_test, docker_build, image_rootfs, e2e_network, engine_dir,
                    tmp_path_factory):
    """A daemon of its own whose userland proxy is started the way dockerd 29.5
    starts it for rootless detach-netns, `nsenter -n<netns> -F -- <proxy> ...`
    (here into the daemon's own namespace, where its bridge is): a wrapper
    script given as userland-proxy-path."""
    name = f"{NETNS_PREFIX}{os.getpid()}-b"
    d = Path(tempfile.mkdtemp(prefix=f"{name}-nsenter-", dir="/tmp"))
    d.chmod(0o755)
    wrapper = d / "proxy"
    wrapper.write_text('#!/bin/sh\nexec nsenter -n/run/netns/%s -F -- %s "$@"\n'
                       % (name, proxy_under_test.path))
    wrapper.chmod(0o755)
    daemon = _new_daemon(proxy_under_test, docker_build, image_rootfs, e2e_network.scratch_bip,
                         "-b", engine_dir=engine_dir,
                         extra_args=["--userland-proxy-path", str(wrapper)])
    try:
        yield daemon
    finally:
        try:
            _finish(daemon)
        finally:
            shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("call", "setup"):
        already = str(rep.longrepr)
        for d in list(_LIVE_DAEMONS):
            if str(d.log) in already:
                continue  # the assertion message carries it already
            try:
                text = d.diagnostics(lines=60)
            except Exception as e:  # diagnostics must never hide the real failure
                text = f"<diagnostics unavailable: {e!r}>"
            rep.sections.append((f"dockerd {d.netns.name}", text))



def pytest_report_collectionfinish(config, start_path, items):
    """Say in the header, before anything runs, that these tests start daemons.

    (pytest_report_header would not do: a conftest below the test root is
    loaded only during collection, after the header is printed.)
    """
    if not any(HERE in Path(str(item.path)).parents for item in items):
        return []
    why = dk.missing_prerequisite()
    if why is None:
        path, _ = dk.proxy_program()
        builds = []
        for label, build in dk.docker_builds().items():
            missing = build.missing()
            builds.append(f"{label} ({build.dockerd})" if missing is None
                          else f"{label} ({'fails' if dk.required() else 'skipped'}: {missing})")
        return [f"e2e: starts private dockerd and containerd daemons (own data-root, socket and "
                f"network namespace {NETNS_PREFIX}*, all removed afterwards; the host's dockerd "
                f"is not used), userland proxy {path}, standalone, in engine mode and in "
                f"engine mode with the fast path (attached to child cgroups "
                f"{NETNS_PREFIX}*-fp only); dockerd {', '.join(builds)}"]
    if os.environ.get("SPLICEPROXY_E2E_REQUIRE") == "1":
        return [f"e2e: will fail, prerequisites missing (SPLICEPROXY_E2E_REQUIRE=1): {why}"]
    return [f"e2e: skipped, starts no daemon: {why}"]
