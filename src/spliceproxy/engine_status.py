"""`spliceproxy status`: every mapping the host engine serves, read from its control socket.

A table for people, ``--json`` for programs, ``--prometheus`` in the text
exposition format (for a node-exporter textfile collector or a scrape
through a small wrapper).  Per-mapping figures come from the engine's
per-listener counters; the engine's totals are shown beside them.
"""

from __future__ import annotations

import json
import socket
import sys

from spliceproxy import control

USAGE = """\
usage: spliceproxy status [--socket PATH] [--json | --prometheus]

Print every mapping the host engine serves: protocol, host address:port ->
container address:port, stub pid, active and total connections (UDP: client
entries), bytes each way, UDP clients, errors, uptime, and how many
connections took the kernel fast path (UDP: connects and datagrams; "-" when
the fast path does not serve the mapping).
"""

# Counters that are levels, not running totals (Prometheus gauges).
GAUGES = frozenset(("tcp_active", "udp_flows_active", "pipes_open", "pipes_in_use", "fds_open"))


class StatusError(Exception):
    """No engine to ask, or it answered something unexpected."""


def query(path: str, timeout: float = 5.0) -> dict:
    """The engine's status document (see engine_service.Service.status)."""
    try:
        sock = control.connect(path, timeout)
    except FileNotFoundError:
        raise StatusError("no engine: %s does not exist" % path) from None
    except ConnectionRefusedError:
        raise StatusError("no engine listens on %s" % path) from None
    except PermissionError:
        raise StatusError("permission denied: %s (the engine's owner or root only)" % path
                          ) from None
    except OSError as e:
        raise StatusError("%s: %s" % (path, e.strerror or e)) from None
    chunks = []
    try:
        control.send(sock, control.encode("status"))
        while True:
            data = sock.recv(control.MSG_MAX)
            if not data:
                raise StatusError("the engine closed the connection")
            head, _, rest = data.partition(b"\0")
            if head == b"status":
                chunks.append(rest)
            elif head == b"end":
                break
            elif head == b"error":
                raise StatusError("the engine refused: %s"
                                  % rest.rstrip(b"\0").decode(errors="replace"))
            else:
                raise StatusError("unexpected reply %r" % head[:20])
    except socket.timeout:
        raise StatusError("the engine did not answer within %.0f s" % timeout) from None
    except OSError as e:
        raise StatusError("%s: %s" % (path, e.strerror or e)) from None
    finally:
        sock.close()
    try:
        return json.loads(b"".join(chunks))
    except ValueError as e:
        raise StatusError("the engine's answer is not JSON: %s" % e) from None


def summary(counters: dict | None) -> dict:
    """The table's figures from a mapping's counters (None: not known)."""
    if not counters:
        return dict.fromkeys(("active", "total", "bytes_in", "bytes_out", "udp_clients",
                              "errors"))
    c = counters.get
    return {
        "active": c("tcp_active", 0) + c("udp_flows_active", 0),
        "total": c("tcp_accepted", 0) + c("udp_flows_created", 0),
        "bytes_in": c("bytes_c2b", 0) + c("udp_bytes_c2b", 0),
        "bytes_out": c("bytes_b2c", 0) + c("udp_bytes_b2c", 0),
        "udp_clients": c("udp_flows_active", 0),
        "errors": (c("tcp_failed", 0) + c("udp_drops", 0) + c("err_emfile", 0)
                   + c("err_enobufs", 0) + c("err_reset", 0) + c("err_other", 0)),
    }


def fastpath_count(m: dict) -> int | None:
    """Connections that skipped the relay (UDP: connects and unconnected
    datagrams); None when the fast path does not serve the mapping."""
    fp = m.get("fastpath")
    if not fp:
        return None
    return fp.get("connections", 0) + (fp.get("datagrams", 0) if m["proto"] == "udp" else 0)


def _human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def table(doc: dict) -> str:
    eng = doc["engine"]
    head = ("PROTO", "HOST", "", "CONTAINER", "STUB", "ACTIVE", "TOTAL", "IN", "OUT",
            "UDP CLIENTS", "ERRORS", "FAST PATH", "UPTIME")
    rows = [head]
    for m in doc["mappings"]:
        s = summary(m.get("counters"))

        def num(v):
            return "-" if v is None else str(v)

        rows.append((m["proto"], m["host"], "->", m["container"], str(m["stub_pid"]),
                     num(s["active"]), num(s["total"]), _human_bytes(s["bytes_in"]),
                     _human_bytes(s["bytes_out"]),
                     num(s["udp_clients"]) if m["proto"] == "udp" else "-",
                     num(s["errors"]), num(fastpath_count(m)), _duration(m["uptime_s"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {5, 6, 7, 8, 9, 10, 11}
    lines = []
    for r in rows:
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i])
                 for i in range(len(head))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append("engine pid %d (uid %d), network namespace %s, %s, up %s, %d mapping%s"
                 % (eng["pid"], eng["uid"], eng.get("netns", "?"), eng["socket"],
                    _duration(eng["uptime_s"]), eng["mappings"],
                    "" if eng["mappings"] == 1 else "s"))
    fp = eng.get("fastpath")
    if fp and fp.get("active"):
        lines.append("fast path active (cgroup %s)" % fp.get("cgroup"))
    elif fp:
        lines.append("fast path not active: %s" % fp.get("reason"))
    tp = eng.get("transparent")
    counters = eng.get("counters") or {}
    if tp and tp.get("on"):
        lines.append("transparent mode on (firewall %s, policy route %s): %d mapping%s; "
                     "%s connections and %s UDP entries from the clients' own addresses, "
                     "%s from the host's (fallbacks)"
                     % (tp.get("firewall"), "in place" if tp.get("rules") else "not in place",
                        tp.get("mappings", 0), "" if tp.get("mappings") == 1 else "s",
                        counters.get("tcp_transparent", "-"),
                        counters.get("udp_flows_transparent", "-"),
                        counters.get("transparent_fallbacks", "-")))
    elif tp and tp.get("reason") and "is not set" not in tp["reason"]:
        lines.append("transparent mode not available: %s" % tp["reason"])
    return "\n".join(lines) + "\n"


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus(doc: dict) -> str:
    """The text exposition format (version 0.0.4)."""
    out = []
    per = [("active", "gauge", "Connections (TCP) or client entries (UDP) open now."),
           ("total", "counter", "Connections accepted (TCP) or client entries created (UDP)."),
           ("bytes_in", "counter", "Bytes relayed client to container."),
           ("bytes_out", "counter", "Bytes relayed container to client."),
           ("udp_clients", "gauge", "UDP client entries now."),
           ("errors", "counter", "Failed connects, dropped datagrams and connection errors."),
           ("uptime_seconds", "gauge", "Seconds since the mapping was registered."),
           ("fastpath_connections", "counter",
            "Connects that went straight to the container (kernel fast path)."),
           ("fastpath_datagrams", "counter",
            "Unconnected UDP datagrams sent straight to the container (kernel fast path).")]
    samples = []
    for m in doc["mappings"]:
        labels = 'proto="%s",host="%s",container="%s",stub_pid="%s"' % (
            _label(m["proto"]), _label(m["host"]), _label(m["container"]),
            _label(m["stub_pid"]))
        s = summary(m.get("counters"))
        s["uptime_seconds"] = m["uptime_s"]
        fp = m.get("fastpath")
        s["fastpath_connections"] = fp.get("connections") if fp else None
        s["fastpath_datagrams"] = fp.get("datagrams") if fp else None
        samples.append((labels, s))
    for name, kind, help_text in per:
        metric = "spliceproxy_mapping_" + name + ("_total" if kind == "counter" else "")
        out.append("# HELP %s %s" % (metric, help_text))
        out.append("# TYPE %s %s" % (metric, kind))
        for labels, s in samples:
            if s.get(name) is not None:
                out.append("%s{%s} %s" % (metric, labels, s[name]))
    out.append("# HELP spliceproxy_engine_mappings Mappings the engine serves.")
    out.append("# TYPE spliceproxy_engine_mappings gauge")
    out.append("spliceproxy_engine_mappings %d" % doc["engine"]["mappings"])
    fp = doc["engine"].get("fastpath")
    if fp is not None:
        out.append("# HELP spliceproxy_engine_fastpath_active Whether the kernel fast path "
                   "is attached (1) or not (0).")
        out.append("# TYPE spliceproxy_engine_fastpath_active gauge")
        out.append("spliceproxy_engine_fastpath_active %d" % bool(fp.get("active")))
    tp = doc["engine"].get("transparent")
    if tp is not None:
        out.append("# HELP spliceproxy_engine_transparent_on Whether SPLICEPROXY_TRANSPARENT "
                   "is on (1) or not (0).")
        out.append("# TYPE spliceproxy_engine_transparent_on gauge")
        out.append("spliceproxy_engine_transparent_on %d" % bool(tp.get("on")))
    for name, value in sorted(doc["engine"].get("counters", {}).items()):
        kind = "gauge" if name in GAUGES else "counter"
        metric = "spliceproxy_engine_" + name + ("_total" if kind == "counter" else "")
        out.append("# TYPE %s %s" % (metric, kind))
        out.append("%s %d" % (metric, value))
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    args = control.parse_args(argv, "spliceproxy status", USAGE,
                              flags=("--json", "--prometheus"))
    if isinstance(args, int):
        return args
    mode = "prometheus" if args.get("prometheus") else "json" if args.get("json") else "table"
    path = args["socket"]
    path = path or control.resolve_socket()
    if not path:
        sys.stderr.write("spliceproxy status: no control socket: set SPLICEPROXY_ENGINE_DIR, "
                         "SPLICEPROXY_ENGINE_SOCKET or XDG_RUNTIME_DIR\n")
        return 1
    try:
        doc = query(path)
    except StatusError as e:
        sys.stderr.write("spliceproxy status: %s\n" % e)
        return 1
    if mode == "json":
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    elif mode == "prometheus":
        sys.stdout.write(prometheus(doc))
    else:
        sys.stdout.write(table(doc))
    return 0
