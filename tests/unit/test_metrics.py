"""SPLICEPROXY_METRICS_ADDR's parser, the request parser of /metrics, and the
one exposition renderer (engine_status.prometheus) on status documents."""

from __future__ import annotations

import os

import pytest

from spliceproxy import _engine, engine_status, files, metrics, settings

parser = pytest.importorskip("prometheus_client.parser",
                             reason="prometheus_client (the test extra) is not installed")


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:9465", ("tcp4", "127.0.0.1", 9465)),
    ("0.0.0.0:1", ("tcp4", "0.0.0.0", 1)),
    ("[::1]:65535", ("tcp6", "::1", 65535)),
    ("[fe80::1%lo]:9465", None),
    ("unix:/run/spliceproxy/metrics.sock", ("unix", "/run/spliceproxy/metrics.sock")),
])
def test_metrics_address(text, want):
    if want is None:
        with pytest.raises(settings.SettingError):
            settings.load({b"SPLICEPROXY_METRICS_ADDR": text.encode()})
        return
    conf = settings.load({b"SPLICEPROXY_METRICS_ADDR": text.encode()})
    assert conf.metrics_addr == want
    assert metrics.describe_address(want) == text


def test_metrics_address_is_off_by_default():
    assert settings.load({}).metrics_addr is None
    assert settings.load({b"SPLICEPROXY_METRICS_ADDR": b""}).metrics_addr is None


@pytest.mark.parametrize("line,want", [
    (b"GET /metrics HTTP/1.1", (b"200 OK", False)),
    (b"HEAD /metrics?a=b HTTP/1.0", (b"200 OK", True)),
    (b"GET http://example:1/metrics HTTP/1.1", (b"200 OK", False)),
    (b"GET http://example:1 HTTP/1.1", (b"404 Not Found", False)),
    (b"GET /metrics/ HTTP/1.1", (b"404 Not Found", False)),
    (b"HEAD / HTTP/1.1", (b"404 Not Found", True)),
    (b"PUT /metrics HTTP/1.1", (b"405 Method Not Allowed", False)),
    (b"OPTIONS * HTTP/1.1", (b"405 Method Not Allowed", False)),
    (b"GET /metrics", (b"400 Bad Request", False)),
    (b"GET  /metrics HTTP/1.1", (b"400 Bad Request", False)),
    (b"G3T /metrics HTTP/1.1", (b"400 Bad Request", False)),
    (b"GET /metrics SPDY/3", (b"400 Bad Request", False)),
    (b"", (b"400 Bad Request", False)),
])
def test_parse_request(line, want):
    assert metrics.parse_request(line + b"\r\nHost: x") == want


def _doc(counters, engine_counters, extra_engine=None):
    eng = {"pid": 1, "uid": 0, "socket": "/s", "uptime_s": 1.0, "mappings": 2,
           "counters": engine_counters, "fastpath": {"active": False, "reason": "off",
                                                     "cgroup": None}}
    eng.update(extra_engine or {})
    return {"engine": eng, "mappings": [
        {"id": 0, "proto": "tcp", "host": "[::]:8080", "container": "172.17.0.2:80",
         "stub_pid": 42, "uptime_s": 3.5, "counters": counters, "fastpath": None},
        {"id": 1, "proto": "udp", "host": '1.2.3.4:53', "container": "[fd00::\"x\\]:53",
         "stub_pid": 43, "uptime_s": 1.0, "counters": None,
         "fastpath": {"connections": 1, "datagrams": 7, "addresses": 1}}]}


def test_one_renderer_every_family_with_help_and_type_and_loops_merged():
    per = [n for n in _engine.stat_names() if n in ("tcp_accepted", "tcp_active", "bytes_c2b")]
    loops = [{n: 1 for n in per}, {n: 2 for n in per}]
    totals = [{"syscalls": 10, "fds_open": 3}, {"syscalls": 5, "fds_open": 4}]
    text = engine_status.prometheus(_doc(loops, totals, {"metrics": {
        "address": "127.0.0.1:9465", "listening": True, "error": None, "connections": 1,
        "scrapes": 5, "bad_requests": 0, "refused": 0, "dropped": 1}}))
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    lines = text.splitlines()
    for name, fam in fams.items():
        assert fam.documentation and fam.type in ("counter", "gauge"), name
    helps = _engine.stat_help()
    assert fams["spliceproxy_mapping_tcp_accepted"].documentation == helps["tcp_accepted"]
    assert fams["spliceproxy_mapping_tcp_active"].type == "gauge"
    assert fams["spliceproxy_engine_fds_open"].type == "gauge"
    tcp = {"proto": "tcp", "host_ip": "::", "host_port": "8080",
           "container_ip": "172.17.0.2", "container_port": "80"}
    (s,) = fams["spliceproxy_mapping_tcp_accepted"].samples
    assert (s.name, s.labels, s.value) == ("spliceproxy_mapping_tcp_accepted_total", tcp, 3)
    assert fams["spliceproxy_mapping_tcp_active"].samples[0].value == 3
    assert fams["spliceproxy_engine_syscalls"].samples[0].value == 15
    assert fams["spliceproxy_engine_fds_open"].samples[0].value == 7
    # A label value is escaped, and parses back as it was.
    udp = [s for s in fams["spliceproxy_mapping_info"].samples if s.labels["proto"] == "udp"]
    assert udp[0].labels["container_ip"] == 'fd00::"x\\' and udp[0].labels["stub_pid"] == "43"
    assert fams["spliceproxy_mapping_fastpath_datagrams"].samples[0].value == 7
    assert fams["spliceproxy_metrics_dropped"].samples[0].value == 1
    assert "spliceproxy_metrics_listening 1" in lines
    # Each family once, its HELP and TYPE before its samples.
    heads = [ln.split()[2] for ln in lines if ln.startswith("# TYPE")]
    assert len(heads) == len(set(heads)) == len(fams)


def test_the_table_and_summary_merge_loops_too():
    loops = [{"tcp_accepted": 1, "tcp_active": 1}, {"tcp_accepted": 4, "tcp_active": 0}]
    assert engine_status.summary(loops)["total"] == 5
    out = engine_status.table(_doc(loops, {}, {"metrics": {
        "address": "unix:/run/m.sock", "listening": False, "error": "no such directory"}}))
    assert "metrics not served on unix:/run/m.sock: no such directory" in out


def test_socket_parent_refuses_a_directory_others_may_write(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for mode, ok in ((0o700, True), (0o750, True), (0o2750, True), (0o770, False),
                     (0o702, False), (0o1777, False)):
        os.chmod(d, mode)
        if ok:
            fd, name = files.socket_parent(str(d / "x.sock"))
            os.close(fd)
            assert name == "x.sock"
        else:
            with pytest.raises(files.FileRefused, match="writable by"):
                files.socket_parent(str(d / "x.sock"))
    os.chmod(d, 0o700)
    (tmp_path / "l").symlink_to(d)
    with pytest.raises(files.FileRefused, match="symbolic link"):
        files.socket_parent(str(tmp_path / "l" / "x.sock"))
