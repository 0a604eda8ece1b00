"""The host engine serves each network namespace from that namespace.

A stub finds the engine of its own network namespace (the socket's name is
derived from the namespace's identity), and an engine refuses a stub of
another namespace: a mapping is bound, and connects to its container, only
where the dockerd that started its stub runs.  These run real stubs in real
namespaces, as dockerd in a namespace (a CI runner, a second daemon) and
dockerd 29.5's rootless ``nsenter -n<netns> -F -- <proxy> ...`` start them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess

import pytest

from spliceproxy import control
from spliceproxy.bench.launch import ProxyStartError, proxy_argv, spawn

from support import servers as srv
from support.engine import alive, kill_engines, private_dir
from support.fastpath_env import in_netns, ip

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
    reason="needs root, iproute2 and nsenter (network namespaces)")

PORT = 18331  # the same host port in every namespace
BACKEND = 18332  # and the same container port


def _netns_ident(name: str) -> tuple[int, int]:
    return control.netns_id("/run/netns/" + name)


@pytest.fixture
def namespaces():
    """Two fresh namespaces with loopback up; removed afterwards."""
    names = ["nsx-%s-%d" % (tag, os.getpid()) for tag in ("a", "b")]
    try:
        for n in names:
            ip("netns", "add", n)
            ip("-n", n, "link", "set", "lo", "up")
        yield names
    finally:
        for n in names:
            ip("netns", "del", n, check=False)


@pytest.fixture
def engine_dir():
    """A private SPLICEPROXY_ENGINE_DIR; every engine of a socket in it is ended."""
    d = private_dir("nsd-")
    try:
        yield d
    finally:
        for sock in glob.glob(os.path.join(d, "*.sock")):
            kill_engines(sock)
        shutil.rmtree(d, ignore_errors=True)


def _env(engine_dir: str, **extra: str) -> dict:
    env = srv.env_without_settings({"SPLICEPROXY_ENGINE": "1",
                                    "SPLICEPROXY_ENGINE_DIR": engine_dir,
                                    "SPLICEPROXY_ENGINE_IDLE_EXIT": "30s"})
    env.pop("SPLICEPROXY_ENGINE_SOCKET", None)  # the session's: the namespace's own here
    env.update(extra)
    return env


def _nsenter(ns: str | None) -> list[str]:
    """dockerd 29.5's rootless shape: nsenter -n<netns> -F -- <proxy> ..."""
    return ["nsenter", "-n/run/netns/" + ns, "-F", "--"] if ns else []


def _start(proxy_path: str, ns: str | None, env: dict, host_port: int = PORT,
           container_port: int = BACKEND, check: bool = True):
    return spawn(_nsenter(ns) + proxy_argv(proxy_path, "tcp", "127.0.0.1", host_port,
                                           "127.0.0.1", container_port),
                 env=env, check=check, timeout=15.0)


def _roundtrip_in(ns: str | None, port: int, payload: bytes) -> bytes:
    """payload sent to 127.0.0.1:port of namespace ns, and what comes back to EOF."""
    def go():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
    return in_netns(ns, go) if ns else go()


def _stop(*stubs) -> None:
    for lp in stubs:
        with contextlib.suppress(Exception):
            lp.stop()


def test_same_port_in_two_namespaces_beside_an_engine_of_the_host(proxy_path, namespaces,
                                                                   engine_dir):
    """An engine already serves a mapping of this namespace; two more namespaces
    publish the same port: each is served in its own namespace, by its own engine."""
    a, b = namespaces
    env = _env(engine_dir)
    echoes = {ns: in_netns(ns, lambda: srv.EchoServer("127.0.0.1", BACKEND)) for ns in (a, b)}
    with srv.EchoServer("127.0.0.1") as host_echo:
        host_port = srv.free_port()
        host_stub = _start(proxy_path, None, env, host_port=host_port,
                           container_port=host_echo.port)
        stubs = []
        try:
            stubs = [_start(proxy_path, ns, env) for ns in (a, b)]
            for ns in (a, b):
                before = {n: e.accepted for n, e in echoes.items()}
                assert _roundtrip_in(ns, PORT, b"hello " + ns.encode()) == \
                    b"hello " + ns.encode()
                # The container connection left from the stub's namespace.
                assert echoes[ns].accepted == before[ns] + 1
                assert all(echoes[n].accepted == before[n] for n in echoes if n != ns)
            # Nothing of theirs was bound here.
            assert srv.port_is_free(PORT)
            srv.echo_roundtrip("127.0.0.1", host_port, b"host")
            # One engine per namespace, each on the socket named after it.
            socks = sorted(os.path.basename(p) for p in glob.glob(engine_dir + "/*.sock"))
            want = sorted(control.socket_name(i) for i in
                          (control.netns_id(), _netns_ident(a), _netns_ident(b)))
            assert socks == want
            # `spliceproxy status` in a namespace shows that namespace's engine.
            for ns in (a, b):
                out = subprocess.run(_nsenter(ns) + [proxy_path, "status", "--json"], env=env,
                                     capture_output=True, text=True, timeout=10)
                assert out.returncode == 0, out.stderr
                doc = json.loads(out.stdout)
                assert doc["engine"]["netns"] == control.netns_name(_netns_ident(ns))
                assert [m["stub_pid"] for m in doc["mappings"]] == \
                    [stubs[(a, b).index(ns)].pid]
        finally:
            _stop(*stubs, host_stub)
            for e in echoes.values():
                e.close()
    # Stopped, the port is free again in both namespaces.
    for ns in (a, b):
        assert in_netns(ns, lambda: srv.port_is_free(PORT))


def test_an_engine_refuses_a_proxy_of_another_namespace(proxy_path, namespaces, engine_dir):
    """SPLICEPROXY_ENGINE_SOCKET forces one engine: a stub of another namespace
    is refused with the reason on fd 3, and nothing is bound anywhere."""
    a, _ = namespaces
    sock = os.path.join(engine_dir, "one.sock")
    env = _env(engine_dir, SPLICEPROXY_ENGINE_SOCKET=sock)
    with srv.EchoServer("127.0.0.1") as echo:
        host_port = srv.free_port()
        host_stub = _start(proxy_path, None, env, host_port=host_port, container_port=echo.port)
        try:
            lp = _start(proxy_path, a, env, check=False)
            assert lp.status.startswith(b"1\n"), lp.status
            text = lp.status[2:].decode()
            assert ("serves network namespace %s; this proxy runs in %s"
                    % (control.netns_name(control.netns_id()),
                       control.netns_name(_netns_ident(a)))) in text, text
            assert lp.proc.wait(5) == 1
            assert srv.port_is_free(PORT)
            assert in_netns(a, lambda: srv.port_is_free(PORT))
            srv.echo_roundtrip("127.0.0.1", host_port, b"still served")
        finally:
            _stop(host_stub)


def test_two_sockets_in_one_directory_have_an_engine_each(proxy_path, engine_dir):
    """Locks are per socket: two engines share a directory."""
    with srv.EchoServer("127.0.0.1") as echo:
        stubs, ports = [], []
        try:
            for name in ("a.sock", "b.sock"):
                env = _env(engine_dir, SPLICEPROXY_ENGINE_SOCKET=os.path.join(engine_dir, name))
                ports.append(srv.free_port())
                stubs.append(_start(proxy_path, None, env, host_port=ports[-1],
                                    container_port=echo.port))
            for port in ports:
                srv.echo_roundtrip("127.0.0.1", port, b"x")
            pids = set()
            for name in ("a.sock", "b.sock"):
                with open(os.path.join(engine_dir, name + ".lock")) as f:
                    pid = int(f.read())
                assert alive(pid)
                pids.add(pid)
            assert len(pids) == 2
        finally:
            _stop(*stubs)


def test_no_proc_is_a_clear_failure_not_a_wrong_engine(proxy_path, namespaces, engine_dir):
    """A stub that cannot know its namespace (no /proc) says so, and binds nothing."""
    a, _ = namespaces
    env = _env(engine_dir)
    # A mount namespace of its own without /proc, as a minimal sandbox has.
    lp = spawn(["unshare", "-m", "--", "sh", "-c", "umount -l /proc && exec \"$@\"", "sh",
                *_nsenter(a), *proxy_argv(proxy_path, "tcp", "127.0.0.1", PORT, "127.0.0.1",
                                          BACKEND)], env=env, check=False, timeout=15.0)
    assert lp.proc.wait(10) == 1
    assert lp.status == (b"1\ncannot tell this proxy's network namespace (/proc/self/ns/net: "
                         b"No such file or directory): the engine it needs is its namespace's")
    assert glob.glob(engine_dir + "/*.sock") == []
    assert in_netns(a, lambda: srv.port_is_free(PORT))


def test_stub_start_failure_is_reported(proxy_path, namespaces, engine_dir):
    """A refused port in a namespace is refused there, with docker-proxy's words."""
    a, _ = namespaces
    env = _env(engine_dir)
    holder = in_netns(a, lambda: socket.create_server(("127.0.0.1", PORT)))
    try:
        with pytest.raises(ProxyStartError, match="address already in use"):
            _start(proxy_path, a, env)
        assert srv.port_is_free(PORT)
    finally:
        holder.close()
