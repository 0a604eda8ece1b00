"""The host engine's /metrics endpoint (SPLICEPROXY_METRICS_ADDR), over real sockets.

Each test has an engine of its own (EngineHost) whose environment names the
address, as the first stub's environment names it under dockerd.  Scrapes
are parsed with prometheus_client's text parser; a real Prometheus scrapes
it when the binary is installed (CI installs Debian's package).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from spliceproxy import metrics
from spliceproxy.bench.launch import ProxyStartError

from support import servers as srv
from support.engine import EngineHost, private_dir

prometheus_parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client (the test extra) is not installed")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --------------------------------------------------------------------------
# Scraping by hand.


def _connect(addr: str, timeout: float = 5.0, rcvbuf: int | None = None) -> socket.socket:
    """A connected socket to a SPLICEPROXY_METRICS_ADDR value."""
    if addr.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = addr[len("unix:"):]
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        s = socket.socket(srv.family(host), socket.SOCK_STREAM)
        where = (host, int(port))
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    try:
        s.connect(where)
    except BaseException:
        s.close()
        raise
    return s


def _read_reply(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = bytearray()
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def request(addr: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with _connect(addr) as s:
        s.sendall(raw)
        return _read_reply(s)


def scrape(addr: str) -> dict:
    """GET /metrics: {family name: family} (the parser's names: a counter's
    family has no _total, its samples do)."""
    status, headers, body = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                          b"Accept: text/plain\r\n\r\n")
    assert status == 200, body
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) == len(body)
    return {f.name: f for f in prometheus_parser.text_string_to_metric_families(body.decode())}


def value(fams: dict, family: str, sample: str, **labels) -> float:
    """The one sample of family named sample whose labels include labels."""
    got = [s.value for s in fams[family].samples
           if s.name == sample and all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(got) == 1, (family, sample, labels, fams[family].samples)
    return got[0]


def _labels(lp, proto: str, backend_port: int) -> dict:
    return {"proto": proto, "host_ip": "127.0.0.1", "host_port": lp.port,
            "container_ip": "127.0.0.1", "container_port": backend_port}


def udp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5.0)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recv(65536)


def metrics_port() -> int:
    """A free port below the ephemeral range: no port-0 bind (a server, a
    mapping) and no outgoing connection of the test can take it before the
    engine binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 10000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port below %d" % low)


@pytest.fixture
def tcp_addr() -> str:
    return "127.0.0.1:%d" % metrics_port()


@contextlib.contextmanager
def engine_with(proxy_path, addr: str, prefix: str = "mt-"):
    h = EngineHost(proxy_path, extra_env={"SPLICEPROXY_METRICS_ADDR": addr}, prefix=prefix)
    try:
        yield h
    finally:
        h.close()


# --------------------------------------------------------------------------
# Scrapes.


def test_scrape_over_tcp_loopback_counts_traffic_per_mapping(proxy_path, tcp_addr):
    with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo, \
            srv.UdpEcho() as uecho:
        t = host.start("tcp", echo.port)
        u = host.start("udp", uecho.port)
        tl, ul = _labels(t, "tcp", echo.port), _labels(u, "udp", uecho.port)
        for _ in range(3):
            srv.echo_roundtrip("127.0.0.1", t.port, b"abc")
        assert udp_roundtrip(u.port, b"datagram") == b"datagram"
        first = scrape(tcp_addr)

        # Per-mapping counters, with kind and help from the engine's table.
        fam = first["spliceproxy_mapping_tcp_accepted"]
        assert fam.type == "counter" and fam.documentation == "connections accepted"
        assert first["spliceproxy_mapping_tcp_active"].type == "gauge"
        assert value(first, "spliceproxy_mapping_tcp_accepted",
                     "spliceproxy_mapping_tcp_accepted_total", **tl) == 3
        assert value(first, "spliceproxy_mapping_bytes_c2b",
                     "spliceproxy_mapping_bytes_c2b_total", **tl) == 9
        assert value(first, "spliceproxy_mapping_udp_bytes_c2b",
                     "spliceproxy_mapping_udp_bytes_c2b_total", **ul) == 8
        assert value(first, "spliceproxy_mapping_udp_flows_active",
                     "spliceproxy_mapping_udp_flows_active", **ul) == 1
        assert value(first, "spliceproxy_mapping_info", "spliceproxy_mapping_info",
                     stub_pid=t.pid, **tl) == 1
        assert value(first, "spliceproxy_engine_mappings", "spliceproxy_engine_mappings") == 2
        assert first["spliceproxy_engine_syscalls"].documentation == \
            "every system call the engine made"

        # More traffic: the counters grow by exactly that.
        for _ in range(2):
            srv.echo_roundtrip("127.0.0.1", t.port, b"12345")
        assert udp_roundtrip(u.port, b"more") == b"more"
        second = scrape(tcp_addr)
        assert value(second, "spliceproxy_mapping_tcp_accepted",
                     "spliceproxy_mapping_tcp_accepted_total", **tl) == 5
        assert value(second, "spliceproxy_mapping_bytes_b2c",
                     "spliceproxy_mapping_bytes_b2c_total", **tl) == 9 + 10
        assert value(second, "spliceproxy_mapping_udp_dgrams_c2b",
                     "spliceproxy_mapping_udp_dgrams_c2b_total", **ul) == 2
        assert value(second, "spliceproxy_metrics_scrapes",
                     "spliceproxy_metrics_scrapes_total") == 2

        # The command renders the same families (one renderer).
        out = host.status_output("--prometheus")
        from_cmd = {f.name for f in prometheus_parser.text_string_to_metric_families(out)}
        assert from_cmd == set(second)
        assert "metrics served on %s" % tcp_addr in host.status_output()
        assert host.status()["engine"]["metrics"]["listening"] is True


def test_scrape_over_a_unix_socket(proxy_path):
    base = private_dir("mt-u-")
    try:
        d = os.path.join(base, "m")
        os.mkdir(d, 0o750)
        path = os.path.join(d, "metrics.sock")
        addr = "unix:" + path
        with engine_with(proxy_path, addr) as host, srv.EchoServer() as echo:
            t = host.start("tcp", echo.port)
            srv.echo_roundtrip("127.0.0.1", t.port, b"over unix")
            fams = scrape(addr)
            tl = _labels(t, "tcp", echo.port)
            assert value(fams, "spliceproxy_mapping_bytes_c2b",
                         "spliceproxy_mapping_bytes_c2b_total", **tl) == 9
            st = os.lstat(path)
            assert st.st_mode & 0o170000 == 0o140000 and st.st_mode & 0o777 == 0o660

            # The engine dies: its socket file is left; the next engine
            # replaces it (nobody listens on it) and serves the same path.
            pid = host.engine_pid()
            os.kill(pid, signal.SIGKILL)
            assert srv.wait_for(lambda: host.engine_pid() is None, 5.0)
            assert os.path.exists(path)
            srv.wait_for(lambda: host.engine_pid() is not None, 5.0)
            t2 = host.start("tcp", echo.port)
            srv.echo_roundtrip("127.0.0.1", t2.port, b"again")
            fams = scrape(addr)
            assert value(fams, "spliceproxy_mapping_bytes_c2b",
                         "spliceproxy_mapping_bytes_c2b_total", **_labels(t2, "tcp", echo.port)
                         ) == 5
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("mode,why", [
    (0o770, "writable by its group"), (0o777, "writable by group and others"),
    (0o1733, "writable by group and others")])
def test_unsafe_socket_directory_is_refused_and_ports_served(proxy_path, mode, why):
    base = private_dir("mt-d-")
    try:
        d = os.path.join(base, "open")
        os.mkdir(d)
        os.chmod(d, mode)
        path = os.path.join(d, "metrics.sock")
        with engine_with(proxy_path, "unix:" + path) as host, srv.EchoServer() as echo:
            t = host.start("tcp", echo.port)
            srv.echo_roundtrip("127.0.0.1", t.port, b"still relayed")
            assert not os.path.exists(path)
            m = host.status()["engine"]["metrics"]
            assert m["listening"] is False and why in m["error"], m
            assert "metrics not served on unix:%s: directory %s is %s" % (path, d, why) in \
                host.status_output()
            assert "ports are served all the same" in host.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_link_in_the_socket_path_or_a_file_in_its_place_is_refused(proxy_path):
    base = private_dir("mt-l-")
    try:
        real = os.path.join(base, "real")
        os.mkdir(real, 0o700)
        os.symlink(real, os.path.join(base, "link"))
        with engine_with(proxy_path, "unix:%s/link/m.sock" % base) as host, \
                srv.EchoServer() as echo:
            srv.echo_roundtrip("127.0.0.1", host.start("tcp", echo.port).port)
            assert "symbolic link" in host.status()["engine"]["metrics"]["error"]
            assert os.listdir(real) == []
        taken = os.path.join(real, "m.sock")
        with open(taken, "w") as f:
            f.write("not a socket")
        with engine_with(proxy_path, "unix:" + taken) as host, srv.EchoServer() as echo:
            srv.echo_roundtrip("127.0.0.1", host.start("tcp", echo.port).port)
            assert "exists and is not a socket" in host.status()["engine"]["metrics"]["error"]
            with open(taken) as f:
                assert f.read() == "not a socket"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_taken_address_is_logged_and_every_port_served(proxy_path):
    with socket.socket() as taken, srv.EchoServer() as echo:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        addr = "127.0.0.1:%d" % taken.getsockname()[1]
        with engine_with(proxy_path, addr) as host:
            lp = host.start("tcp", echo.port)
            assert lp.status == b"0\n"
            srv.echo_roundtrip("127.0.0.1", lp.port)
            m = host.status()["engine"]["metrics"]
            assert m == dict(m, address=addr, listening=False, error="address already in use")
            assert ("metrics not served on %s (SPLICEPROXY_METRICS_ADDR): address already in "
                    "use; the ports are served all the same" % addr) in host.log()


# --------------------------------------------------------------------------
# Requests other than GET /metrics.


def test_only_get_and_head_of_metrics_are_answered(proxy_path, tcp_addr):
    with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo:
        host.start("tcp", echo.port)
        status, headers, body = request(tcp_addr, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"") and headers["content-type"] == CONTENT_TYPE
        assert int(headers["content-length"]) > 1000
        assert request(tcp_addr, b"GET /metrics?x=1 HTTP/1.0\n\n")[0] == 200
        assert request(tcp_addr, b"GET http://h:1/metrics HTTP/1.1\r\n\r\n")[0] == 200
        assert request(tcp_addr, b"GET / HTTP/1.1\r\n\r\n")[0] == 404
        assert request(tcp_addr, b"GET /metricsx HTTP/1.1\r\n\r\n")[0] == 404
        status, headers, _ = request(tcp_addr, b"POST /metrics HTTP/1.1\r\n"
                                               b"Content-Length: 2\r\n\r\nab")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        for raw in (b"GET /metrics\r\n\r\n", b"\x16\x03\x01\x02\x00\r\n\r\n",
                    b"get /metrics HTTP/1.1\r\n\r\n", b"GET /metrics HTTP/2\r\n\r\n",
                    b"GET metrics HTTP/1.1\r\n\r\n"):
            assert request(tcp_addr, raw)[0] == 400, raw
        # A scraper that asks again as soon as it has its answer is never
        # refused as too many: its closed connections are not counted.
        codes = [request(tcp_addr, b"GET /x HTTP/1.1\r\n\r\n")[0] for _ in range(60)]
        assert codes == [404] * 60, codes
        # A request head longer than the bound.
        status, _, body = request(tcp_addr, b"GET /metrics HTTP/1.1\r\nX: "
                                  + b"a" * metrics.REQUEST_MAX + b"\r\n\r\n")
        assert (status, body) == (400, b"request too long\n")
        fams = scrape(tcp_addr)
        assert value(fams, "spliceproxy_metrics_bad_requests",
                     "spliceproxy_metrics_bad_requests_total") == 9 + 60
        assert value(fams, "spliceproxy_metrics_scrapes", "spliceproxy_metrics_scrapes_total") == 4


# --------------------------------------------------------------------------
# Hostile scrapers.


def _relay_rtts(sock: socket.socket, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(b"x" * 64)
        srv.recv_exact(sock, 64)
        out.append(time.perf_counter() - t0)
    return out


def _dropped(s: socket.socket, limit: float) -> tuple[int, float]:
    """Read s until the engine ends it: (bytes read, seconds waited)."""
    t0 = time.monotonic()
    total = 0
    s.settimeout(limit)
    try:
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total, time.monotonic() - t0


def test_stalled_scrapers_do_not_delay_relaying_and_are_dropped(proxy_path, tcp_addr):
    """A scraper that sends half a request and stalls, and one that asks for
    a large reply and never reads it: relaying goes on as before, and each
    is dropped at its deadline."""
    with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo:
        stubs = [host.start("tcp", echo.port) for _ in range(40)]
        body = request(tcp_addr, b"GET /metrics HTTP/1.1\r\n\r\n")[2]
        assert len(body) > 150_000  # beyond what the two socket buffers hold
        with contextlib.ExitStack() as stack:
            held = stack.enter_context(srv.connect("127.0.0.1", stubs[0].port))
            before = _relay_rtts(held, 200)
            half = stack.enter_context(_connect(tcp_addr))
            half.sendall(b"GET /metr")
            deaf = stack.enter_context(_connect(tcp_addr, rcvbuf=4096))
            deaf.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            asked = time.monotonic()
            during = _relay_rtts(held, 200)
            # Both still held while relaying was measured.
            assert time.monotonic() - asked < metrics.REQUEST_DEADLINE_S
            assert host.status()["engine"]["metrics"]["connections"] == 2
            before.sort()
            during.sort()
            # Generous bounds for a shared machine: a blocked loop would
            # show seconds, not milliseconds.
            assert during[len(during) // 2] < max(0.005, 5 * before[len(before) // 2]), (
                before[100], during[100])
            assert during[-1] < 0.25, during[-5:]

            got, waited = _dropped(half, metrics.REQUEST_DEADLINE_S + 5)
            assert got == 0 and waited < metrics.REQUEST_DEADLINE_S + 2
            # Read nothing until the reply's deadline has passed, then what
            # the kernel held for it: less than the reply, and then the end.
            time.sleep(max(0.0, asked + metrics.REPLY_DEADLINE_S + 1.0 - time.monotonic()))
            assert host.status()["engine"]["metrics"]["connections"] == 0
            got, waited = _dropped(deaf, 5.0)
            assert got < len(body) and waited < 1.0, (got, waited)
            assert host.status()["engine"]["metrics"]["dropped"] == 2
            srv.echo_roundtrip("127.0.0.1", stubs[1].port)
            assert scrape(tcp_addr)["spliceproxy_mapping_tcp_accepted"]


def test_too_many_scrapers_at_once_are_refused(proxy_path, tcp_addr):
    with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo:
        lp = host.start("tcp", echo.port)
        idle = [_connect(tcp_addr) for _ in range(metrics.MAX_CONNECTIONS)]
        try:
            assert srv.wait_for(lambda: host.status()["engine"]["metrics"]["connections"]
                                == metrics.MAX_CONNECTIONS)
            for _ in range(3):
                status, headers, body = request(tcp_addr, b"GET /metrics HTTP/1.1\r\n\r\n")
                assert (status, headers["retry-after"]) == (503, "1"), body
            srv.echo_roundtrip("127.0.0.1", lp.port, b"relayed meanwhile")
            assert host.status()["engine"]["metrics"]["connections"] == metrics.MAX_CONNECTIONS
        finally:
            for s in idle:
                s.close()
        assert srv.wait_for(lambda: host.status()["engine"]["metrics"]["connections"] == 0)
        fams = scrape(tcp_addr)
        assert value(fams, "spliceproxy_metrics_refused", "spliceproxy_metrics_refused_total") == 3


# --------------------------------------------------------------------------
# The setting.


@pytest.mark.parametrize("bad,why", [
    ("localhost:9465", "'localhost' is not an IPv4 address (IPv6 in brackets: [::1]:9465)"),
    ("::1:9465", "'::1' is not an IPv4 address (IPv6 in brackets: [::1]:9465)"),
    ("[127.0.0.1]:9465", "'127.0.0.1' is not an IPv6 address (IPv6 in brackets: [::1]:9465)"),
    ("127.0.0.1", "use host:port (an IPv4 address), [v6]:port or unix:/path"),
    ("127.0.0.1:0", "port must be a number between 1 and 65535"),
    ("127.0.0.1:\u0661\u0662", "port must be a number between 1 and 65535"),
    ("unix:metrics.sock", "unix: needs an absolute path (unix:/run/spliceproxy/metrics.sock)"),
    ("unix:/run/", "unix: the path must name a socket file, not a directory"),
    ("unix:/" + "a" * 120, "unix: the path is longer than 107 bytes"),
])
def test_a_value_that_cannot_be_parsed_is_refused_on_fd3(proxy_path, tcp_addr, bad, why):
    with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo:
        good = host.start("tcp", echo.port)
        with pytest.raises(ProxyStartError) as info:
            host.start("tcp", echo.port, env={"SPLICEPROXY_METRICS_ADDR": bad})
        assert info.value.returncode == 1
        assert str(info.value) == "invalid SPLICEPROXY_METRICS_ADDR=%r: %s" % (bad, why)
        srv.echo_roundtrip("127.0.0.1", good.port)
        assert scrape(tcp_addr)["spliceproxy_engine_mappings"]


def test_standalone_refuses_it(proxy_path, tcp_addr):
    host = EngineHost(proxy_path, prefix="mt-s-")
    try:
        with srv.EchoServer() as echo, pytest.raises(ProxyStartError) as info:
            host.start("tcp", echo.port, env={"SPLICEPROXY_ENGINE": "0",
                                              "SPLICEPROXY_METRICS_ADDR": tcp_addr})
        assert info.value.returncode == 1
        assert str(info.value).startswith("SPLICEPROXY_METRICS_ADDR works in engine mode only: ")
        assert "leave SPLICEPROXY_ENGINE unset" in str(info.value)
        assert host.engine_pid() is None
    finally:
        host.close()


def test_the_engine_serves_the_first_mappings_address_and_logs_the_others(proxy_path, tcp_addr):
    other = "127.0.0.1:%d" % metrics_port()
    with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo:
        host.start("tcp", echo.port)
        second = host.start("tcp", echo.port, env={"SPLICEPROXY_METRICS_ADDR": other})
        srv.echo_roundtrip("127.0.0.1", second.port)
        fams = scrape(tcp_addr)
        assert value(fams, "spliceproxy_engine_mappings", "spliceproxy_engine_mappings") == 2
        with pytest.raises(ConnectionRefusedError):
            _connect(other)
        lines = [ln for ln in host.log().splitlines() if "SPLICEPROXY_METRICS_ADDR differ" in ln]
        assert len(lines) == 1 and ":%d" % second.port in lines[0], host.log()


# --------------------------------------------------------------------------
# A real Prometheus.


def _prom_query(web: str, query: str) -> list:
    url = "http://%s/api/v1/query?%s" % (web, urllib.parse.urlencode({"query": query}))
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary (Debian's prometheus package; CI installs it)")
def test_a_real_prometheus_scrapes_it(proxy_path, tcp_addr):
    base = private_dir("mt-p-")
    web = "127.0.0.1:%d" % metrics_port()
    conf = os.path.join(base, "prometheus.yml")
    with open(conf, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: spliceproxy\n"
                "    static_configs:\n      - targets: ['%s']\n" % tcp_addr)
    log = open(os.path.join(base, "prometheus.log"), "wb")
    prom = None
    try:
        with engine_with(proxy_path, tcp_addr) as host, srv.EchoServer() as echo:
            t = host.start("tcp", echo.port)
            for _ in range(2):
                srv.echo_roundtrip("127.0.0.1", t.port, b"abc")
            prom = subprocess.Popen(
                ["prometheus", "--config.file=" + conf, "--web.listen-address=" + web,
                 "--storage.tsdb.path=" + os.path.join(base, "data")],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                # Not the code under test: no sanitizer runtime preloaded into it.
                env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
            query = ('spliceproxy_mapping_tcp_accepted_total{proto="tcp",host_ip="127.0.0.1",'
                     'host_port="%d",container_ip="127.0.0.1",container_port="%d"}'
                     % (t.port, echo.port))

            def accepted():
                with contextlib.suppress(OSError, ValueError):
                    got = _prom_query(web, query)
                    return got and float(got[0]["value"][1])
                return None

            assert srv.wait_for(lambda: accepted() == 2, 30.0, 0.25), open(log.name).read()
            up = _prom_query(web, 'up{job="spliceproxy"}')
            assert up[0]["value"][1] == "1", up
            for _ in range(3):
                srv.echo_roundtrip("127.0.0.1", t.port, b"abc")
            assert srv.wait_for(lambda: accepted() == 5, 15.0, 0.25)
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)
