"""`spliceproxy status`: every mapping the host engine serves, read from its control socket.

A table for people, ``--json`` for programs, ``--prometheus`` in the text
exposition format (for a node-exporter textfile collector; the engine
serves the same text on SPLICEPROXY_METRICS_ADDR, see metrics.py).
Per-mapping figures come from the engine's per-listener counters; the
engine's totals are shown beside them.
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
    counters = merged(counters)
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
    ms = eng.get("metrics")
    if ms and ms.get("listening"):
        lines.append("metrics served on %s" % ms.get("address"))
    elif ms:
        lines.append("metrics not served on %s: %s" % (ms.get("address"), ms.get("error")))
    return "\n".join(lines) + "\n"


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def split_hostport(text: str) -> tuple[str, str]:
    """("ip", "port") of "ip:port" or "[v6]:port" (Go's net.SplitHostPort)."""
    host, _, port = str(text).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def merged(counters) -> dict | None:
    """One {name: value} from a counters entry: a dict, or a list of dicts
    (one per loop), summed: every counter is a total and every gauge a
    count of things each loop holds on its own."""
    if counters is None or isinstance(counters, dict):
        return counters
    out: dict = {}
    for part in counters:
        for name, value in (part or {}).items():
            out[name] = out.get(name, 0) + value
    return out


def _definitions() -> tuple[dict, dict, list]:
    """Kind, help and order of the engine's counters, from their one
    definition (engine.h's SP_STATS_TABLE, through the binding)."""
    try:
        from spliceproxy import _engine
    except ImportError:
        return {}, {}, []
    return _engine.stat_kinds(), _engine.stat_help(), list(_engine.stat_names())


# Per-mapping figures the engine's counters do not hold: (name, kind, help).
_MAPPING_EXTRA = (
    ("uptime_seconds", "gauge", "Seconds since the mapping was registered."),
    ("fastpath_connections", "counter",
     "Connects that went straight to the container (kernel fast path)."),
    ("fastpath_datagrams", "counter",
     "Unconnected UDP datagrams sent straight to the container (kernel fast path)."),
)
# The metrics endpoint's own figures (the engine's "metrics" entry).
_METRICS_SERVER = (
    ("listening", "gauge", "Whether the engine serves /metrics on its address (1) or "
     "could not open it (0)."),
    ("connections", "gauge", "Scrape connections open now."),
    ("scrapes", "counter", "Scrapes answered with the metrics."),
    ("bad_requests", "counter", "Requests answered 400, 404 or 405."),
    ("refused", "counter", "Connections answered 503: too many scrapers at once."),
    ("dropped", "counter", "Connections dropped at a deadline (request or reply too slow)."),
)


def prometheus(doc: dict) -> str:
    """The status document in the text exposition format (version 0.0.4).

    One renderer for `spliceproxy status --prometheus` and the engine's
    /metrics endpoint (metrics.py).  Per mapping, every counter the engine
    keeps per listener, labelled with the protocol and the host's and the
    container's address and port; then the engine's totals.  Counters of
    several loops are summed (``merged``)."""
    kinds, helps, order = _definitions()
    out = []

    def family(metric: str, kind: str, help_text: str) -> None:
        out.append("# HELP %s %s" % (metric, _help(help_text)))
        out.append("# TYPE %s %s" % (metric, kind))

    def name_of(prefix: str, name: str, kind: str) -> str:
        return prefix + name + ("_total" if kind == "counter" else "")

    rows = []
    for m in doc["mappings"]:
        host_ip, host_port = split_hostport(m["host"])
        cont_ip, cont_port = split_hostport(m["container"])
        labels = ('proto="%s",host_ip="%s",host_port="%s",container_ip="%s",'
                  'container_port="%s"' % tuple(_label(v) for v in (
                      m["proto"], host_ip, host_port, cont_ip, cont_port)))
        values = dict(merged(m.get("counters")) or {})
        values["uptime_seconds"] = m["uptime_s"]
        fp = m.get("fastpath")
        if fp:
            values["fastpath_connections"] = fp.get("connections")
            values["fastpath_datagrams"] = fp.get("datagrams")
        rows.append((m, labels, values))

    family("spliceproxy_mapping_info", "gauge",
           "A mapping the engine serves (1), with the pid of its stub.")
    for m, labels, _ in rows:
        out.append('spliceproxy_mapping_info{%s,stub_pid="%s"} 1'
                   % (labels, _label(m["stub_pid"])))
    names = {n for _, _, values in rows for n in values}
    per = [(n, kinds.get(n, "counter"), helps.get(n, n.replace("_", " ")))
           for n in order if n in names]
    per += [(n, "gauge" if k == "gauge" else "counter", h) for n, k, h in _MAPPING_EXTRA]
    for name, kind, help_text in per:
        metric = name_of("spliceproxy_mapping_", name, kind)
        family(metric, kind, help_text)
        head = metric + "{"
        out.extend([head + labels + "} " + str(v) for _, labels, values in rows
                    if (v := values.get(name)) is not None])

    eng = doc["engine"]
    family("spliceproxy_engine_mappings", "gauge", "Mappings the engine serves.")
    out.append("spliceproxy_engine_mappings %d" % eng["mappings"])
    fp = eng.get("fastpath")
    if fp is not None:
        family("spliceproxy_engine_fastpath_active", "gauge",
               "Whether the kernel fast path is attached (1) or not (0).")
        out.append("spliceproxy_engine_fastpath_active %d" % bool(fp.get("active")))
    tp = eng.get("transparent")
    if tp is not None:
        family("spliceproxy_engine_transparent_on", "gauge",
               "Whether SPLICEPROXY_TRANSPARENT is on (1) or not (0).")
        out.append("spliceproxy_engine_transparent_on %d" % bool(tp.get("on")))
    totals = merged(eng.get("counters")) or {}
    for name in order + sorted(set(totals) - set(order)):
        if name not in totals:
            continue
        kind = kinds.get(name, "counter")
        metric = name_of("spliceproxy_engine_", name, kind)
        family(metric, kind, helps.get(name, name.replace("_", " ")))
        out.append("%s %d" % (metric, totals[name]))
    server = eng.get("metrics")
    if server:
        for name, kind, help_text in _METRICS_SERVER:
            if server.get(name) is None:
                continue
            metric = name_of("spliceproxy_metrics_", name, kind)
            family(metric, kind, help_text)
            out.append("%s %d" % (metric, int(server[name])))
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
