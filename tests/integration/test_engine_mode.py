"""Engine mode (the default): per-port stubs and one host engine.

Every proxy here is the installed command, the C stub, started exactly as
dockerd starts it (status pipe on fd 3, optional socket on fd 4, stdio on
/dev/null), with SPLICEPROXY_ENGINE=1 and a control socket of the test's
own.  The first stub starts the engine, and the tests look at
real sockets and processes: the port served, freed, bound again; the engine
killed and replaced; the control socket abused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from spliceproxy import control
from spliceproxy.bench.launch import ProxyStartError, proxy_argv, spawn
from spliceproxy.bench.procs import alive

from support import servers as srv
from support.engine import EngineHost

IO_TIMEOUT = 5.0


@pytest.fixture
def host(proxy_path):
    h = EngineHost(proxy_path)
    yield h
    h.close()


def _stub_exe(pid: int) -> str:
    return os.path.basename(os.readlink("/proc/%d/exe" % pid))


# --------------------------------------------------------------------------
# dockerd's contract, through the stub.


def test_status_pipe_ok_and_tcp_relay(host):
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        assert lp.status == b"0\n"
        # The installed command is the stub: no shell or interpreter ran first.
        assert os.readlink("/proc/%d/exe" % lp.pid) == os.path.realpath(host.proxy_path)
        srv.echo_roundtrip("127.0.0.1", lp.port, b"through the engine" * 1000)
        assert host.engine_pid() not in (None, lp.pid)


def test_udp_relay(host):
    with srv.UdpEcho() as echo:
        lp = host.start("udp", echo.port)
        assert srv.udp_roundtrip(lp.port, b"hello udp") == b"hello udp"


def test_startup_failure_is_reported_on_fd3_and_exits_1(host):
    with srv.EchoServer() as echo, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ProxyStartError) as info:
            host.start("tcp", echo.port, host_port=port)
        assert info.value.returncode == 1
        assert str(info.value) == (
            "failed to listen on 127.0.0.1:%d: listen tcp4 127.0.0.1:%d: bind: address "
            "already in use" % (port, port))
        # An unsupported protocol, as the standalone proxy words it.
        with pytest.raises(ProxyStartError) as info:
            host.start("sctp", echo.port)
        assert info.value.returncode == 1
        assert str(info.value).startswith("unsupported protocol sctp")


def _run_both(host, args: list[str]) -> tuple[tuple, tuple]:
    """The same command line standalone and in engine mode: (rc, stdout, stderr) each."""
    out = []
    for engine in ("0", "1"):
        env = dict(host.env, SPLICEPROXY_ENGINE=engine)
        r = subprocess.run([host.proxy_path] + args, capture_output=True, env=env, timeout=15)
        out.append((r.returncode, r.stdout, r.stderr))
    return out[0], out[1]


@pytest.mark.parametrize("args", [
    ["-proto", "tcp", "-bogus"],
    ["-host-port", "x"],
    ["-host-ip", "1.2.3"],
    ["-use-listen-fd=maybe"],
    ["-container-port"],
    ["-h"],
    ["-help"],
    ["-v"],
    ["--version"],
])
def test_flags_usage_and_version_as_standalone(host, args):
    standalone, engine = _run_both(host, args)
    assert engine == standalone
    if args[0] in ("-h", "-help", "-v", "--version"):
        assert engine[0] == 0
    else:
        assert engine[0] == 2 and b"Usage of " + host.proxy_path.encode() in engine[2]


def test_flag_error_writes_nothing_on_fd3(host):
    lp = spawn(host.argv("tcp", "127.0.0.1", 1, "127.0.0.1", 2) + ["-nope"], env=host.env,
               check=False, timeout=15.0)
    host.stubs.append(lp)
    assert lp.proc.wait(10) == 2
    assert lp.status == b""  # EOF without a status, as docker-proxy


GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


@pytest.mark.parametrize("value", GO_FALSE)
def test_engine_false_is_the_standalone_proxy(host, value):
    with srv.EchoServer() as echo:
        env = dict(host.env, SPLICEPROXY_ENGINE=value)
        port = srv.free_port()
        lp = spawn(host.argv("tcp", "127.0.0.1", port, "127.0.0.1", echo.port), env=env)
        try:
            assert lp.status == b"0\n"
            assert _stub_exe(lp.pid).startswith("python")
            srv.echo_roundtrip("127.0.0.1", port, b"standalone")
        finally:
            assert lp.stop() == 0
        assert not os.path.exists(host.sock)
        assert "engine mode not possible" not in host.log()


@pytest.mark.parametrize("value", [None, "", "1", "t", "TRUE", "true", "True"])
def test_engine_mode_is_the_default(host, value):
    """No SPLICEPROXY_ENGINE at all (or empty, or a Go true): the port is
    served by the engine of the socket SPLICEPROXY_ENGINE_SOCKET names."""
    env = {k: v for k, v in host.env.items() if k != "SPLICEPROXY_ENGINE"}
    if value is not None:
        env["SPLICEPROXY_ENGINE"] = value
    host.env = env
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        assert lp.status == b"0\n"
        assert os.readlink("/proc/%d/exe" % lp.pid) == os.path.realpath(host.proxy_path)
        srv.echo_roundtrip("127.0.0.1", lp.port, b"through the default engine")
        assert [m["stub_pid"] for m in host.status()["mappings"]] == [lp.pid]
        assert host.engine_pid() not in (None, lp.pid)


@pytest.mark.parametrize("value", ["yes", "on", "no", "2", " 1", "tRUE", "0 ", "\u0661"])
def test_engine_value_not_a_go_boolean_is_refused(host, value):
    """As every other bad setting: "1\\n<message>" on fd 3, exit 1, nothing
    bound and no engine started."""
    with srv.EchoServer() as echo:
        port = srv.free_port()
        with pytest.raises(ProxyStartError) as info:
            host.start("tcp", echo.port, host_port=port, env={"SPLICEPROXY_ENGINE": value})
        assert info.value.returncode == 1
        assert str(info.value) == (
            "invalid SPLICEPROXY_ENGINE=%r: not a boolean: use one of 1, t, T, TRUE, true, "
            "True, 0, f, F, FALSE, false, False" % value)
        assert srv.port_is_free(port)
        assert not os.path.exists(host.sock) and host.engine_processes() == []


def test_use_listen_fd(host):
    with srv.EchoServer() as echo, socket.socket() as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(16)
        port = ls.getsockname()[1]
        lp = host.start("tcp", echo.port, host_port=port, listen_sock=ls)
        ls.close()
        srv.echo_roundtrip("127.0.0.1", port, b"adopted from fd 4")
        assert lp.status == b"0\n"


def test_udp_listen_fd_loses_reuseaddr_and_serves(host):
    with srv.UdpEcho() as echo, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ls:
        # As dockerd before 29 passes it: SO_REUSEADDR and IP_PKTINFO set.
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO (not in the socket module)
        ls.bind(("127.0.0.1", 0))
        port = ls.getsockname()[1]
        host.start("udp", echo.port, host_port=port, listen_sock=ls)
        # The same socket: nobody else may bind the port beside it any more.
        assert ls.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        assert srv.udp_roundtrip(port, b"via fd 4") == b"via fd 4"


@pytest.mark.skipif(not srv.have_ipv6(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_host_to_ipv4_container(host):
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port, host_ip="::1", container_ip="127.0.0.1")
        srv.echo_roundtrip("::1", lp.port, b"6 to 4")
        assert host.status()["mappings"][0]["host"] == "[::1]:%d" % lp.port


def test_two_mappings_one_engine(host):
    with srv.EchoServer() as echo, srv.UdpEcho() as uecho:
        a = host.start("tcp", echo.port)
        b = host.start("udp", uecho.port)
        srv.echo_roundtrip("127.0.0.1", a.port, b"a")
        assert srv.udp_roundtrip(b.port, b"b") == b"b"
        assert len(host.engine_pids) == 1
        doc = host.status()
        assert doc["engine"]["pid"] in host.engine_pids
        got = {(m["proto"], m["host"], m["stub_pid"]) for m in doc["mappings"]}
        assert got == {("tcp", "127.0.0.1:%d" % a.port, a.pid),
                       ("udp", "127.0.0.1:%d" % b.port, b.pid)}


# --------------------------------------------------------------------------
# Stopping.


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_frees_the_port_at_once(host, sig):
    with srv.EchoServer() as echo:
        keep = host.start("tcp", echo.port)
        lp = host.start("tcp", echo.port)
        with srv.connect("127.0.0.1", lp.port) as open_conn:
            open_conn.sendall(b"x")
            assert srv.recv_exact(open_conn, 1) == b"x"
            assert lp.stop(sig, timeout=5.0) == 0
            # Right after the stub exits, as dockerd restarting the container.
            assert srv.port_is_free(lp.port)
        srv.echo_roundtrip("127.0.0.1", keep.port, b"the other mapping serves on")
        assert {m["stub_pid"] for m in host.status()["mappings"]} == {keep.pid}


def test_stop_frees_a_udp_port_at_once(host):
    with srv.UdpEcho() as echo:
        lp = host.start("udp", echo.port)
        assert srv.udp_roundtrip(lp.port, b"u") == b"u"
        assert lp.stop(signal.SIGINT, timeout=5.0) == 0
        assert srv.port_is_free(lp.port, kind=socket.SOCK_DGRAM)


def test_sigkill_of_a_stub_removes_its_mapping(host):
    with srv.EchoServer() as echo:
        keep = host.start("tcp", echo.port)
        lp = host.start("tcp", echo.port)
        lp.proc.kill()
        lp.proc.wait(5)
        assert srv.wait_for(lambda: srv.port_is_free(lp.port), 2.0)
        assert [m["stub_pid"] for m in host.status()["mappings"]] == [keep.pid]
        srv.echo_roundtrip("127.0.0.1", keep.port)


def test_dockerd_killed_no_stub_survives_and_every_port_is_free(host):
    with srv.EchoServer() as echo:
        argv = proxy_argv(host.proxy_path, "tcp", "127.0.0.1", 0, "127.0.0.1", echo.port)
        with srv.FakeDockerd([argv] * 3, env=host.env) as fake:
            pids = fake.pids
            assert len(pids) == 3
            host.note_engine()
            ports = [m["host"].rsplit(":", 1)[1] for m in host.status()["mappings"]]
            assert len(ports) == 3
            fake.kill()
            assert srv.wait_for(lambda: not any(alive(p) for p in pids), 3.0)
            assert all(srv.port_is_free(int(p)) for p in ports)
            assert host.status()["mappings"] == []


def test_stop_is_bounded_when_the_engine_hangs(host):
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        engine = host.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert lp.stop(signal.SIGTERM, timeout=10.0) == 0
            assert time.monotonic() - t0 < 3.0
        finally:
            os.kill(engine, signal.SIGCONT)


def test_engine_exits_after_the_grace_period(proxy_path):
    h = EngineHost(proxy_path, idle_exit="300ms")
    try:
        with srv.EchoServer() as echo:
            lp = h.start("tcp", echo.port)
            engine = h.engine_pid()
            time.sleep(0.6)
            assert alive(engine), "exited while serving a mapping"
            assert lp.stop() == 0
            assert srv.wait_for(lambda: not alive(engine), 3.0), "still running without mappings"
            # The next stub starts a new one.
            lp = h.start("tcp", echo.port)
            srv.echo_roundtrip("127.0.0.1", lp.port)
            assert h.engine_pid() not in (None, engine)
    finally:
        h.close()


# --------------------------------------------------------------------------
# Starting and crashing.


def test_concurrent_first_stubs_start_exactly_one_engine(host):
    with srv.EchoServer() as echo:
        n = 12
        results = srv.run_threads(*[lambda: host.start("tcp", echo.port) for _ in range(n)],
                                  timeout=60.0)
        assert all(r.status == b"0\n" for r in results)
        engines = host.engine_processes()
        assert len(engines) == 1, engines
        assert len(host.status()["mappings"]) == n
        for r in results:
            srv.echo_roundtrip("127.0.0.1", r.port)


def test_engine_killed_under_load_every_mapping_serves_within_a_second(host):
    with srv.EchoServer() as echo, srv.UdpEcho() as uecho:
        tcp = [host.start("tcp", echo.port) for _ in range(4)]
        udp = host.start("udp", uecho.port)
        stop = threading.Event()
        errors: list = []

        def load(port):
            while not stop.is_set():
                try:
                    srv.echo_roundtrip("127.0.0.1", port, b"load", timeout=5.0)
                except (OSError, EOFError) as e:
                    errors.append(e)  # connections open at the kill are cut

        threads = [threading.Thread(target=load, args=(lp.port,), daemon=True) for lp in tcp]
        for t in threads:
            t.start()
        time.sleep(0.3)
        old = host.engine_pid()
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        # New connections wait in the backlog of the stubs' sockets, and are
        # served once a new engine has adopted them.
        pending = {lp.port for lp in tcp}
        while pending and time.monotonic() - t0 < 5.0:
            for port in list(pending):
                with contextlib.suppress(OSError):
                    srv.echo_roundtrip("127.0.0.1", port, b"after", timeout=1.0)
                    pending.discard(port)
        assert srv.udp_roundtrip(udp.port, b"udp after") == b"udp after"
        elapsed = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(10)
        assert not pending
        print("every mapping served again %.3f s after the kill" % elapsed)
        assert elapsed < 1.0, "mappings served again after %.2f s" % elapsed
        new = host.note_engine()
        assert new not in (None, old)
        assert {m["stub_pid"] for m in host.status()["mappings"]} == {lp.pid for lp in tcp + [udp]}
        assert all(lp.proc.poll() is None for lp in tcp + [udp])


# --------------------------------------------------------------------------
# The control socket.


def test_a_socket_directory_not_private_is_refused_and_the_port_served_standalone(host):
    """No control socket possible there: the engine is never started in it,
    and the port is served all the same, by the proxy itself, whose log says
    why."""
    os.chmod(host.dir, 0o755)
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        assert lp.status == b"0\n"
        assert _stub_exe(lp.pid).startswith("python")
        srv.echo_roundtrip("127.0.0.1", lp.port, b"standalone after all")
        assert lp.stop() == 0
    assert not os.path.exists(host.sock) and host.engine_processes() == []
    lines = [line for line in host.log().splitlines() if "engine mode not possible" in line]
    assert len(lines) == 1, host.log()
    assert "refusing the engine socket directory %s" % host.dir in lines[0]
    assert "mode 0755" in lines[0] and "served standalone" in lines[0]


def _not_root():
    """In a user namespace of its own with no uid mapped, the process is not
    root (geteuid() is the overflow uid) yet still reaches root's files as
    their owner: what a user without XDG_RUNTIME_DIR sees."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        os._exit(99)


def test_no_runtime_directory_serves_standalone(host):
    """Not root, no SPLICEPROXY_ENGINE_SOCKET and no XDG_RUNTIME_DIR: no
    control socket is possible, the port is served standalone, and one log
    line says why."""
    env = {k: v for k, v in host.env.items()
           if k not in ("SPLICEPROXY_ENGINE", "SPLICEPROXY_ENGINE_SOCKET", "XDG_RUNTIME_DIR",
                        "SPLICEPROXY_LOG_FILE")}
    # No privilege drop: in the namespace the capabilities are its own, and
    # no uid but the overflow one exists there to become.
    env["SPLICEPROXY_KEEP_PRIVILEGES"] = "true"
    err_path = os.path.join(host.dir, "stderr")
    with srv.EchoServer() as echo, open(err_path, "wb") as err:
        port = srv.free_port()
        lp = spawn(host.argv("tcp", "127.0.0.1", port, "127.0.0.1", echo.port), env=env,
                   stderr=err, preexec_fn=_not_root if os.geteuid() == 0 else None)
        try:
            assert _stub_exe(lp.pid).startswith("python")
            srv.echo_roundtrip("127.0.0.1", port, b"no runtime directory")
        finally:
            assert lp.stop() == 0
    with open(err_path) as f:
        lines = [line for line in f.read().splitlines() if "engine mode not possible" in line]
    assert len(lines) == 1, lines
    assert "no control socket: not root, and XDG_RUNTIME_DIR is not an absolute path" in lines[0]


def test_an_engine_that_cannot_start_is_reported_at_once(host):
    with srv.EchoServer() as echo, pytest.raises(ProxyStartError) as info:
        t0 = time.monotonic()
        host.start("tcp", echo.port, env={"SPLICEPROXY_ENGINE_IDLE_EXIT": "soon"})
    assert time.monotonic() - t0 < 5.0
    assert info.value.returncode == 1
    assert str(info.value).startswith(
        "cannot start the spliceproxy engine for %s: invalid SPLICEPROXY_ENGINE_IDLE_EXIT="
        % host.sock)


def test_invalid_settings_fail_the_mapping_as_standalone(host):
    bad = {"SPLICEPROXY_UDP_TIMEOUT": "forever"}
    with srv.EchoServer() as echo:
        texts = []
        for engine in ("0", "1"):
            with pytest.raises(ProxyStartError) as info:
                host.start("tcp", echo.port, env=dict(bad, SPLICEPROXY_ENGINE=engine))
            assert info.value.returncode == 1
            texts.append(str(info.value))
        assert texts[0] == texts[1]
        assert texts[0].startswith("invalid SPLICEPROXY_UDP_TIMEOUT='forever'")
        # The engine the bad mapping started serves the next one.
        lp = host.start("tcp", echo.port)
        srv.echo_roundtrip("127.0.0.1", lp.port)


def test_socket_and_directory_modes(host):
    with srv.EchoServer() as echo:
        host.start("tcp", echo.port)
    assert os.stat(host.dir).st_mode & 0o777 == 0o700
    assert os.stat(host.sock).st_mode & 0o777 == 0o600


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_another_uid_is_refused_by_peer_credentials(host):
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        # Open the file modes so that only the SO_PEERCRED check stands.
        os.chmod(host.dir, 0o711)
        os.chmod(host.sock, 0o666)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                s = control.connect(host.sock)
                s.send(control.encode("status"))
                os.write(w, s.recv(4096))
            except BaseException as e:  # noqa: BLE001
                os.write(w, repr(e).encode())
            os._exit(0)
        os.close(w)
        got = b""
        while chunk := os.read(r, 4096):
            got += chunk
        os.close(r)
        os.waitpid(pid, 0)
        assert got.startswith(b"error\0permission denied: uid 65534"), got
        srv.echo_roundtrip("127.0.0.1", lp.port)


def test_malformed_requests_leave_other_mappings_serving(host):
    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        bad = [b"", b"no-nul", b"map\0xoops\0", b"map\0eNOT_OURS=1\0", b"\xff\xfe\0",
               b"map\0a-proto\0dnope\0", b"launch\0", b"map\0d3\0", b"remove\0", b"log\0",
               b"log\0dlog\0",
               b"map\0" + b"a" * 70000]
        for msg in bad:
            with control.connect(host.sock) as s:
                try:
                    s.send(msg)
                except OSError:
                    continue  # too long to send at all
                reply = s.recv(4096)
                assert reply.startswith((b"error\0", b"removed\0")), (msg[:20], reply)
        # A map request with nonsense descriptors and arguments.
        with control.connect(host.sock) as s, open(os.devnull) as null:
            control.send(s, control.encode("map", ("a", "x"), ("a", "-host-port"),
                                           ("a", "nope"), ("d", "2")), [null.fileno()])
            assert s.recv(4096) == b"exit\x002\x00"
        srv.echo_roundtrip("127.0.0.1", lp.port)
        assert [m["stub_pid"] for m in host.status()["mappings"]] == [lp.pid]


# --------------------------------------------------------------------------
# Status and privileges.


def test_status_table_json_and_prometheus_during_traffic(host):
    with srv.EchoServer() as echo, srv.UdpEcho() as uecho:
        t = host.start("tcp", echo.port)
        u = host.start("udp", uecho.port)
        held = srv.connect("127.0.0.1", t.port)
        try:
            held.sendall(b"12345")
            assert srv.recv_exact(held, 5) == b"12345"
            for _ in range(3):
                srv.echo_roundtrip("127.0.0.1", t.port, b"abc")
            assert srv.udp_roundtrip(u.port, b"datagram") == b"datagram"
            doc = host.status()
            by = {m["proto"]: m for m in doc["mappings"]}
            assert by["tcp"]["container"] == "127.0.0.1:%d" % echo.port
            ct = by["tcp"]["counters"]
            assert ct["tcp_accepted"] == 4 and ct["tcp_active"] == 1
            assert ct["bytes_c2b"] == 5 + 9 and ct["bytes_b2c"] == 5 + 9
            cu = by["udp"]["counters"]
            assert cu["udp_flows_active"] == 1 and cu["udp_bytes_c2b"] == 8
            assert ct["udp_flows_active"] == 0 and cu["tcp_accepted"] == 0

            table = subprocess.run([host.proxy_path, "status", "--socket", host.sock],
                                   capture_output=True, text=True, env=host.env, timeout=10)
            assert table.returncode == 0
            lines = table.stdout.splitlines()
            assert lines[0].split()[:4] == ["PROTO", "HOST", "CONTAINER", "STUB"]
            row = next(line for line in lines if line.startswith("tcp"))
            assert "127.0.0.1:%d  ->  127.0.0.1:%d" % (t.port, echo.port) in row
            assert row.split()[4:7] == [str(t.pid), "1", "4"]

            prom = subprocess.run([host.proxy_path, "status", "--prometheus", "--socket",
                                   host.sock], capture_output=True, text=True, env=host.env,
                                  timeout=10).stdout
            assert "# TYPE spliceproxy_mapping_tcp_active gauge" in prom
            assert "# HELP spliceproxy_mapping_tcp_accepted_total connections accepted" in prom
            labels = ('proto="tcp",host_ip="127.0.0.1",host_port="%d",container_ip="127.0.0.1",'
                      'container_port="%d"' % (t.port, echo.port))
            assert "spliceproxy_mapping_tcp_accepted_total{%s} 4" % labels in prom
            assert "spliceproxy_mapping_tcp_active{%s} 1" % labels in prom
            assert 'spliceproxy_mapping_info{%s,stub_pid="%d"} 1' % (labels, t.pid) in prom
            assert "spliceproxy_engine_mappings 2" in prom
        finally:
            held.close()


def test_status_without_an_engine(host):
    out = subprocess.run([host.proxy_path, "status", "--socket", host.sock],
                         capture_output=True, text=True, env=host.env, timeout=10)
    assert out.returncode == 1
    assert out.stderr == "spliceproxy status: no engine: %s does not exist\n" % host.sock


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop is only done as root")
def test_engine_drops_privileges_keeping_only_low_port_binding(host):
    from spliceproxy import identity

    with srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        st = srv.proc_status(host.engine_pid())
        uid = int(st["Uid"].split()[0])
        # A uid of its own, as the standalone proxy's default.
        assert identity.UID_RANGE[0] <= uid <= identity.UID_RANGE[1]
        assert st["Uid"].split() == [str(uid)] * 4 and st["Groups"] == ""
        assert int(st["CapEff"], 16) == 1 << 10 and int(st["CapBnd"], 16) == 1 << 10
        assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
        assert st["NoNewPrivs"] == "1"
        srv.echo_roundtrip("127.0.0.1", lp.port)
        # A port below 1024 opened by the engine itself (dockerd before 28).
        low = next((p for p in range(900, 1000) if srv.port_is_free(p)), None)
        assert low is not None
        lp2 = host.start("tcp", echo.port, host_port=low)
        srv.echo_roundtrip("127.0.0.1", lp2.port)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities are only held (and dropped) as root")
def test_a_stub_holds_no_capability_once_its_port_is_served(host):
    """The stub only waits once mapped: root's uid (its socket directory is
    root's) and, with a log file to reopen on SIGHUP, CAP_DAC_OVERRIDE alone;
    an engine it restarts still starts as root."""
    mine = srv.proc_status(os.getpid())
    dac_override = 1 << 1
    with srv.EchoServer() as echo:
        logged = host.start("tcp", echo.port)  # EngineHost sets SPLICEPROXY_LOG_FILE
        lp = host.start("tcp", echo.port, env={"SPLICEPROXY_LOG_FILE": ""})
        for stub, keep in ((lp, 0), (logged, dac_override)):
            st = srv.proc_status(stub.pid)
            assert st["Uid"].split() == ["0"] * 4
            assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == keep, st
            assert int(st["CapInh"], 16) == int(st["CapAmb"], 16) == 0, st
            assert st["CapBnd"] == mine["CapBnd"]
        old = host.engine_pid()
        os.kill(old, signal.SIGKILL)
        assert srv.wait_for(lambda: host.note_engine() not in (None, old), 10.0)
        srv.echo_roundtrip("127.0.0.1", lp.port)
        # The replacement dropped its own privileges, so it had them to drop.
        new = srv.proc_status(host.engine_pid())
        assert int(new["Uid"].split()[0]) != 0 and int(new["CapEff"], 16) == 1 << 10


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop is only done as root")
def test_engine_becomes_the_user_its_environment_names(proxy_path):
    h = EngineHost(proxy_path, extra_env={"SPLICEPROXY_USER": "nobody"})
    try:
        with srv.EchoServer() as echo:
            lp = h.start("tcp", echo.port)
            assert srv.proc_status(h.engine_pid())["Uid"].split() == ["65534"] * 4
            srv.echo_roundtrip("127.0.0.1", lp.port)
    finally:
        h.close()


def test_log_lines_name_their_mapping(host):
    closed = srv.free_port()
    lp = host.start("tcp", closed)
    with srv.connect("127.0.0.1", lp.port) as s:
        s.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError):
            s.recv(1)
    want = "Can't forward traffic to backend tcp/127.0.0.1:%d" % closed
    assert srv.wait_for(lambda: want in host.log(), 5.0), host.log()


# --------------------------------------------------------------------------
# The stub run directly (userland-proxy-path pointing at it): it is the
# installed command itself.


def _stub_path(host) -> str:
    return host.proxy_path


def test_stub_run_directly_serves_through_the_engine(host):
    with srv.EchoServer() as echo:
        port = srv.free_port()
        lp = spawn(proxy_argv(_stub_path(host), "tcp", "127.0.0.1", port, "127.0.0.1",
                              echo.port), env=host.env)
        host.stubs.append(lp)
        host.note_engine()
        srv.echo_roundtrip("127.0.0.1", port, b"direct")
        assert [m["stub_pid"] for m in host.status()["mappings"]] == [lp.pid]


def test_stub_run_directly_with_engine_off_is_the_standalone_proxy(host):
    with srv.EchoServer() as echo:
        for value in ("0", "false"):
            env = dict(host.env, SPLICEPROXY_ENGINE=value)
            port = srv.free_port()
            lp = spawn(proxy_argv(_stub_path(host), "tcp", "127.0.0.1", port, "127.0.0.1",
                                  echo.port), env=env)
            try:
                assert _stub_exe(lp.pid).startswith("python")
                srv.echo_roundtrip("127.0.0.1", port, b"standalone")
            finally:
                assert lp.stop() == 0
    assert not os.path.exists(host.sock)


def test_stub_passes_subcommands_to_the_front_end(host):
    out = subprocess.run([_stub_path(host), "status", "--socket", host.sock],
                         capture_output=True, text=True, env=host.env, timeout=10)
    assert out.returncode == 1
    assert out.stderr == "spliceproxy status: no engine: %s does not exist\n" % host.sock


def test_a_stub_stderr_nobody_reads_never_stalls_the_engine(host):
    """Without a log file a mapping logs to its stub's stderr: a full pipe
    there drops lines, it does not block the loop every port shares."""
    env = {k: v for k, v in host.env.items() if k != "SPLICEPROXY_LOG_FILE"}
    host.env = env
    with srv.EchoServer() as echo:
        good = host.start("tcp", echo.port)
        closed = srv.free_port()
        noisy = host.start("tcp", closed, stderr=subprocess.PIPE)  # never read
        try:
            for _ in range(1500):  # ~150 bytes of log line each: more than a pipe holds
                try:
                    with srv.connect("127.0.0.1", noisy.port, timeout=1.0) as s:
                        s.recv(1)
                except socket.timeout:
                    break  # the engine stopped answering: the check below fails
                except OSError:
                    pass
            srv.echo_roundtrip("127.0.0.1", good.port, b"still serving", timeout=2.0)
        finally:
            noisy.proc.kill()
            noisy.proc.wait()
            noisy.proc.stderr.close()


def test_mappings_coming_and_going_leak_nothing_in_the_engine(host):
    with srv.EchoServer() as echo, srv.UdpEcho() as uecho:
        keep = host.start("tcp", echo.port)
        engine = host.engine_pid()

        def cycle():
            t = host.start("tcp", echo.port)
            u = host.start("udp", uecho.port)
            srv.echo_roundtrip("127.0.0.1", t.port)
            assert srv.udp_roundtrip(u.port) == b"dgram"
            assert t.stop(signal.SIGTERM) == 0 and u.stop(signal.SIGINT) == 0
            host.stubs.remove(t)
            host.stubs.remove(u)

        cycle()  # pools and tables at their working size
        fds = len(os.listdir("/proc/%d/fd" % engine))
        for _ in range(30):
            cycle()
        assert srv.wait_for(lambda: len(os.listdir("/proc/%d/fd" % engine)) <= fds, 3.0), \
            (fds, sorted(os.listdir("/proc/%d/fd" % engine)))
        doc = host.status()
        assert [m["stub_pid"] for m in doc["mappings"]] == [keep.pid]
        assert doc["engine"]["counters"]["tcp_active"] == 0
        assert doc["engine"]["counters"]["udp_flows_active"] == 0
        srv.echo_roundtrip("127.0.0.1", keep.port)


def test_udp_settings_apply_per_mapping(host):
    """One engine, two UDP mappings: each expires its clients after its own
    SPLICEPROXY_UDP_TIMEOUT (the engine's default is the first stub's)."""
    with srv.UdpEcho() as echo:
        slow = host.start("udp", echo.port)  # starts the engine: 90 s
        fast = host.start("udp", echo.port, env={"SPLICEPROXY_UDP_TIMEOUT": "300ms"})
        assert srv.udp_roundtrip(slow.port) == b"dgram"
        assert srv.udp_roundtrip(fast.port) == b"dgram"

        def counters():
            return {m["stub_pid"]: m["counters"] for m in host.status()["mappings"]}

        assert srv.wait_for(lambda: counters()[fast.pid]["udp_flows_expired"] == 1, 5.0)
        got = counters()
        assert got[fast.pid]["udp_flows_active"] == 0
        assert got[slow.pid]["udp_flows_active"] == 1 and got[slow.pid]["udp_flows_expired"] == 0
        assert "the engine's settings apply" not in host.log()


def test_settings_an_engine_cannot_apply_per_mapping_are_logged(host):
    """The busy-poll is the engine's loop, whom it runs as its process's: a
    mapping that asks otherwise is told, and what it can have is applied."""
    with srv.EchoServer() as echo:
        host.start("tcp", echo.port)
        lp = host.start("tcp", echo.port, env={"SPLICEPROXY_IDLE_TIMEOUT": "5s",
                                               "SPLICEPROXY_SPIN": "50us",
                                               "SPLICEPROXY_KEEP_PRIVILEGES": "1"})
        srv.echo_roundtrip("127.0.0.1", lp.port)
        want = ("tcp/127.0.0.1:%d: the engine's settings apply (SPLICEPROXY_KEEP_PRIVILEGES, "
                "SPLICEPROXY_SPIN differ from this mapping's environment)" % lp.port)
        assert srv.wait_for(lambda: want in host.log(), 3.0), host.log()
        mine = [m for m in host.status()["mappings"] if m["stub_pid"] == lp.pid][0]
        assert mine["options"]["idle_timeout_ms"] == 5000


# --------------------------------------------------------------------------
# A mapping's settings in one engine: each mapping behaves by its own.

MIB = 1 << 20


def _mapping(host, lp) -> dict:
    return [m for m in host.status()["mappings"] if m["stub_pid"] == lp.pid][0]


def _engine_delta(host, fn) -> dict:
    """The engine's counters' growth while fn runs (and its connections end)."""
    before = host.status()["engine"]["counters"]
    fn()
    assert srv.wait_for(lambda: host.status()["engine"]["counters"]["tcp_active"] == 0, 5.0)
    after = host.status()["engine"]["counters"]
    return {k: after[k] - before[k] for k in after}


def test_copy_mode_applies_per_mapping(host):
    """A readwrite mapping copies through user space and never takes a pipe,
    while the splice mapping beside it in the same engine splices."""
    size = 8 * MIB
    with srv.AcceptingBackend() as sink:
        spliced = host.start("tcp", sink.port)  # starts the engine: splice
        copied = host.start("tcp", sink.port, env={"SPLICEPROXY_COPY_MODE": "readwrite",
                                                  "SPLICEPROXY_COPY_BUF": "16384"})
        assert _mapping(host, copied)["options"]["copy_mode"] == "readwrite"
        assert _mapping(host, copied)["options"]["copy_buf"] == 16384
        assert _mapping(host, spliced)["options"]["copy_mode"] == "splice"
        rw = _engine_delta(host, lambda: srv.upload(copied.port, sink, size))
        sp = _engine_delta(host, lambda: srv.upload(spliced.port, sink, size))
    print("readwrite mapping: %d splice, %d read, %d pipe2; splice mapping: %d splice, "
          "%d read" % (rw["sys_splice"], rw["sys_read"], rw["sys_pipe"], sp["sys_splice"],
                       sp["sys_read"]))
    assert rw["sys_splice"] == 0 and rw["sys_pipe"] == 0, rw
    # Its own 16 KiB buffer: at least one read per 16 KiB.
    assert rw["sys_read"] >= size // 16384, rw
    assert sp["sys_splice"] > 0 and sp["sys_read"] == 0, sp


def test_idle_timeout_applies_per_mapping(host):
    """Two half-closed pairs in one engine: the one of the mapping with a short
    idle timeout is reclaimed, the other's (SPLICEPROXY_IDLE_TIMEOUT=0: never)
    is kept, though the engine's own value is the short one."""
    with srv.AcceptingBackend() as sink:
        short = host.start("tcp", sink.port, env={"SPLICEPROXY_IDLE_TIMEOUT": "300ms"})
        never = host.start("tcp", sink.port, env={"SPLICEPROXY_IDLE_TIMEOUT": "0"})
        assert _mapping(host, never)["options"]["idle_timeout_ms"] == 0
        # Unset is the default, as standalone, not the engine's value.
        unset = host.start("tcp", sink.port)
        assert _mapping(host, unset)["options"]["idle_timeout_ms"] == 120000
        assert host.status()["engine"]["options"]["idle_timeout_ms"] == 300
        pairs = []
        try:
            for lp in (short, never):
                c = srv.connect("127.0.0.1", lp.port)
                b = sink.accept()
                c.sendall(b"half")
                assert srv.recv_exact(b, 4) == b"half"
                c.shutdown(socket.SHUT_WR)  # the client is done; the backend is not
                b.settimeout(IO_TIMEOUT)
                assert b.recv(10) == b""
                pairs.append((c, b))

            def counters(lp):
                return _mapping(host, lp)["counters"]

            assert srv.wait_for(lambda: counters(short)["idle_reclaimed"] == 1, 5.0)
            time.sleep(1.0)  # three of the short timeouts more
            assert counters(never)["idle_reclaimed"] == 0
            assert counters(never)["tcp_active"] == 1
            # The kept pair still carries the backend's bytes to its client.
            c, b = pairs[1]
            b.sendall(b"late")
            assert srv.recv_exact(c, 4) == b"late"
        finally:
            for c, b in pairs:
                c.close()
                b.close()


def test_connect_timeout_applies_per_mapping(host):
    """A backend that drops SYNs (its accept queue is full): the mapping with
    SPLICEPROXY_CONNECT_TIMEOUT=500ms gives up at its bound, the one beside it
    (the engine's 30 s) is still connecting."""
    with srv.AcceptingBackend(backlog=0) as hole:
        filler = srv.connect("127.0.0.1", hole.port)  # fills the queue, never accepted
        try:
            patient = host.start("tcp", hole.port)
            quick = host.start("tcp", hole.port, env={"SPLICEPROXY_CONNECT_TIMEOUT": "500ms"})
            assert _mapping(host, quick)["options"]["connect_timeout_ms"] == 500
            assert _mapping(host, patient)["options"]["connect_timeout_ms"] == 30000
            a = srv.connect("127.0.0.1", patient.port)
            t0 = time.monotonic()
            b = srv.connect("127.0.0.1", quick.port)
            try:
                b.settimeout(IO_TIMEOUT)
                assert b.recv(10) == b""  # given up: closed as docker-proxy closes
                took = time.monotonic() - t0
                assert 0.4 <= took < 2.5, took
                a.settimeout(1.0)
                with pytest.raises(socket.timeout):
                    a.recv(10)
                got = {lp.pid: _mapping(host, lp)["counters"] for lp in (patient, quick)}
                assert got[quick.pid]["tcp_failed"] == 1, got
                assert got[patient.pid]["tcp_failed"] == 0, got
                assert got[patient.pid]["tcp_active"] == 1, got
            finally:
                a.close()
                b.close()
        finally:
            filler.close()


def test_pipe_size_applies_per_mapping(host):
    """Splice calls per MiB follow each mapping's own pipe size, and the pool
    serves both sizes: a mapping after the other gets pipes of its size again."""
    size = 16 * MIB
    with srv.AcceptingBackend() as sink:
        big = host.start("tcp", sink.port)  # starts the engine: 1 MiB pipes
        small = host.start("tcp", sink.port, env={"SPLICEPROXY_PIPE_SIZE": "16384"})
        assert _mapping(host, small)["options"]["pipe_size"] == 16384
        assert _mapping(host, big)["options"]["pipe_size"] == MIB

        def per_mib(lp):
            d = _engine_delta(host, lambda: srv.upload(lp.port, sink, size))
            return d["sys_splice"] / (size / MIB)

        first = per_mib(big)
        little = per_mib(small)
        again = per_mib(big)
    print("splice calls per MiB: %.1f with 1 MiB pipes, %.1f with 16 KiB pipes, %.1f "
          "with 1 MiB pipes again" % (first, little, again))
    assert little >= 128, little  # 16 KiB pipes: at least 64 in and 64 out per MiB
    assert first < little / 2 and again < little / 2, (first, little, again)


@pytest.mark.slow
def test_a_hung_engine_fails_a_new_mapping_within_dockerds_timeout(host):
    with srv.EchoServer() as echo:
        host.start("tcp", echo.port)
        engine = host.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ProxyStartError) as info:
                host.start("tcp", echo.port)
            took = time.monotonic() - t0
        finally:
            os.kill(engine, signal.SIGCONT)
        assert took < 15.0, (took, str(info.value))  # dockerd gives up after 16 s
        assert info.value.returncode == 1
        assert str(info.value) == ("the spliceproxy engine at %s did not answer within 12 s"
                                   % host.sock)


def test_an_engine_mode_port_needs_no_shell_and_no_interpreter(host, tmp_path):
    """The installed command is the stub and decides by itself: a copy with
    no launcher and no interpreter beside it serves a port through the
    running engine, so no shell or Python started on the way."""
    with srv.EchoServer() as echo:
        first = host.start("tcp", echo.port)  # the engine, started as usual
        assert first.status == b"0\n"
        lone = tmp_path / "spliceproxy"
        shutil.copy2(host.proxy_path, lone)
        port = srv.free_port()
        lp = spawn(proxy_argv(str(lone), "tcp", "127.0.0.1", port, "127.0.0.1", echo.port),
                   env=host.env)
        host.stubs.append(lp)
        assert lp.status == b"0\n"
        assert os.readlink("/proc/%d/exe" % lp.pid) == str(lone)
        srv.echo_roundtrip("127.0.0.1", port, b"no shell on the way")
        assert lp.stop() == 0


@pytest.mark.parametrize("engine", ["0", "1"])
def test_stub_without_its_launcher_says_why_on_fd3(host, tmp_path, engine):
    """A broken install (the stub copied or left without the launcher beside
    it) is reported where dockerd looks, never an empty "Error starting
    userland proxy:"."""
    lone = tmp_path / "spliceproxy"
    shutil.copy2(_stub_path(host), lone)
    env = dict(host.env, SPLICEPROXY_ENGINE=engine,
               SPLICEPROXY_ENGINE_SOCKET=str(tmp_path / "none" / "engine.sock"))
    with srv.EchoServer() as echo, pytest.raises(ProxyStartError) as info:
        spawn(proxy_argv(str(lone), "tcp", "127.0.0.1", srv.free_port(), "127.0.0.1",
                         echo.port), env=env, timeout=20.0)
    assert info.value.returncode == 1
    text = str(info.value)
    assert text.startswith("cannot start"), text
    assert str(tmp_path / "spliceproxy-front") in text, text  # the launcher it looked for
    assert "reinstall spliceproxy" in text and "install-path" in text, text  # and the mend


ENGINE_NOFILE = 128


def _engine_nofile():
    # The engine a stub starts inherits its limits (and raises its soft
    # limit to the hard one, so both are set).
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (ENGINE_NOFILE, ENGINE_NOFILE))


def test_an_engine_out_of_descriptors_pauses_accepting_and_recovers(host):
    """The engine-mode counterpart of the standalone descriptor-exhaustion
    tests: the engine's own RLIMIT_NOFILE runs out under a flood of clients
    of one mapping; it pauses accepting instead of failing, the other
    mapping's established connection keeps relaying, and once the clients
    are gone both mappings serve again and the mapping's log says so."""
    with srv.EchoServer() as echo:
        port = srv.free_port()
        quiet = spawn(host.argv("tcp", "127.0.0.1", port, "127.0.0.1", echo.port),
                      env=host.env, preexec_fn=_engine_nofile, timeout=15.0)
        quiet.port = port
        host.stubs.append(quiet)
        engine = host.note_engine()
        with open("/proc/%d/limits" % engine) as f:
            assert any(line.startswith("Max open files") and str(ENGINE_NOFILE) in line
                       for line in f)
        lp = host.start("tcp", echo.port)
        held = srv.connect("127.0.0.1", quiet.port)
        clients = []
        try:
            held.sendall(b"before")
            assert srv.recv_exact(held, 6) == b"before"
            try:
                for _ in range(ENGINE_NOFILE):  # two sockets each: more than fit
                    clients.append(srv.connect("127.0.0.1", lp.port, timeout=5.0))
                assert srv.wait_for(
                    lambda: host.mapping(lp.pid)["counters"]["accept_pauses"] >= 1, 5.0), \
                    host.mapping(lp.pid)
                assert alive(engine) and len(os.listdir("/proc/%d/fd" % engine)) <= ENGINE_NOFILE
                held.sendall(b"during")
                assert srv.recv_exact(held, 6) == b"during"
            finally:
                for c in clients:
                    c.close()
            assert srv.wait_for(
                lambda: host.mapping(lp.pid)["counters"]["tcp_active"] == 0, 15.0)
            for p in (lp.port, quiet.port):
                srv.echo_roundtrip("127.0.0.1", p, b"after")
            want = "Accepting on tcp/127.0.0.1:%d again" % lp.port
            assert srv.wait_for(lambda: want in host.log(), 5.0), host.log()
            assert host.engine_pid() == engine
        finally:
            held.close()


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["-v"], ["-version"], ["--version=true"],
                                  ["-proto", "tcp", "-h"], ["-proto", "udp", "-v"]])
def test_usage_and_version_start_no_engine(host, args):
    """Engine mode is the default: asking for the usage or the version must
    not start an engine (root's under /run, by default) just to print it."""
    r = subprocess.run([host.proxy_path] + args, capture_output=True, env=host.env, timeout=15)
    assert r.returncode == 0, r.stderr
    assert (b"Usage of " in r.stderr) if "h" in args[-1] else r.stdout.startswith(b"spliceproxy")
    assert not os.path.exists(host.sock) and host.engine_processes() == []


def _faultshim(out_dir) -> str:
    """tests/integration/faultshim.c built (test_faults.py's fault library)."""
    from support import cc as cc_flags

    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("fault injection cannot share a process with a preloaded sanitizer runtime")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("gcc is not installed: the fault injection library cannot be built")
    out = os.path.join(str(out_dir), "faultshim.so")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultshim.c")
    res = subprocess.run([cc, *cc_flags.cflags(), "-O2", "-shared", "-fPIC", "-o", out, src,
                          "-ldl"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, "building faultshim.c failed:\n" + res.stderr
    return out


def test_a_fault_in_the_engine_costs_only_its_connection(proxy_path, tmp_path):
    """The engine-mode counterpart of test_faults.py (whose library is
    preloaded into a standalone proxy): the first stub starts the engine with
    the library preloaded (the stub itself is static; the engine inherits
    its environment), and the engine's first backend connect fails with
    ENOBUFS.  That client is refused and counted in its own mapping's
    err_enobufs; the other mapping and the next connections are served."""
    shim = _faultshim(tmp_path)
    h = EngineHost(proxy_path, extra_env={"LD_PRELOAD": shim, "FAULTSHIM_ARM": "now",
                                          "FAULTSHIM": "connect:ENOBUFS:1:max=1"})
    try:
        with srv.EchoServer() as echo:
            hit = h.start("tcp", echo.port)
            other = h.start("tcp", echo.port)
            with open("/proc/%d/maps" % h.engine_pid()) as f:
                assert shim in f.read(), "the engine does not have the fault library"
            with srv.connect("127.0.0.1", hit.port) as s:
                s.settimeout(IO_TIMEOUT)
                s.sendall(b"x")
                with contextlib.suppress(OSError):
                    assert s.recv(1) == b""  # closed, as for a refused backend connect
            c = h.mapping(hit.pid)["counters"]
            assert c["err_enobufs"] == 1 and c["tcp_failed"] == 1, c
            assert h.mapping(other.pid)["counters"]["err_enobufs"] == 0
            for lp in (hit, other):
                srv.echo_roundtrip("127.0.0.1", lp.port, b"after the fault")
            assert h.mapping(hit.pid)["counters"]["err_enobufs"] == 1
    finally:
        h.close()
