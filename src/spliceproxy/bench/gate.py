"""The regression gate: compare the subject's ratio metrics of two result files.

Deterministic counts (system calls per GiB and per connection, fds and threads
per connection, RSS) gate tightly; timing gates only as same-run ratios to a
reference path, with a loose tolerance.  The tolerances come from the spread
measured between repeated unchanged runs on a noisy 2-core machine (see
TOLERANCES) and leave a margin above it; any of them can be overridden from
the command line (--tolerance NAME=REL[:ABS]) or a TOML file (--tolerances).

Outputs besides the text table: a Markdown verdict table (also appended to
$GITHUB_STEP_SUMMARY when set), JUnit XML (one test case per gated figure),
and github-action-benchmark's custom JSON (two files: one for
customSmallerIsBetter, one for customBiggerIsBetter, as the action takes one
tool per file).  Exit codes: 0 pass, 1 regression (or a gated figure
missing), 2 usage or unreadable input.
"""

from __future__ import annotations

import json
import os
import re
from xml.sax.saxutils import escape, quoteattr

SUBJECT = "spliceproxy"

# gate key -> (metric, reference path or None, kind, better, relative tol, absolute tol)
# A lower-is-better figure regresses above baseline * (1 + rel) + abs, a
# higher-is-better one below baseline * (1 - rel) - abs.
#
# Range of each figure over 20 unchanged `spliceproxy bench --quick` runs
# (four series of five) on the shared 2-core machine, rounds shuffled and
# latency alternated exchange by exchange on one CPU (docs/benchmarking.md):
# - counts: syscalls/conn 30.8-31.0, strace's 28.03-28.25; fds/conn 2,
#   threads 1, RSS/conn 0; idle RSS vs a bare interpreter 0.918-0.921.
# - system calls per GiB depend on how much each splice moves, i.e. on
#   scheduling: the engine's counter 4.1k-13.4k external, 3.9k-7.1k
#   loopback; strace's 2.4k-40k (strace slows the proxy; the median of
#   three transfers since the last series), so that one only catches a
#   gross regression (baseline x 2 + 60k; docker-proxy's is ~53k).
# - same-run ratios: bulk vs iptables 0.51-0.72, 4 streams 0.53-0.71; CPU/GB
#   vs docker-proxy 0.48-0.64 once read from schedstat (0.43-0.75 in clock
#   ticks); connections/s vs docker-proxy 1.27-1.72; UDP packets/s
#   1.05-1.58; added RR p50 vs docker-proxy 0.67-0.80 external (one run
#   0.44), 0.79-0.81 loopback; added UDP p50 0.725-0.745 (measured path
#   after path they moved 0.75-3.1x, which is why they were loosely or not
#   gated before); spawn vs bare 0.59-0.83.
# - churn_hold 0.37-8.5 (a slow first tenth makes it large), so its baseline
#   counts as at most 1 (CAPS) and it fails below 0.2; a TIME_WAIT collapse
#   takes it below 0.1.
# Since the relay paths run in engine mode and docker-proxy 28.5 is the
# reference (issue 21), four quick runs here (one whole, three of the agg
# and ports groups) and the suite's baseline: connections/s with four
# clients on four ports 1.21-1.59x docker-proxy (four processes), four
# streams on four ports 0.85-1.09x, their CPU per GB 0.82-1.06x; the first port's start (no
# engine running) 9.4-13.6x docker-proxy's, the warm start 0.30-0.39x.
# Against 28.5, CPU per GB is 0.80-1.02x (0.44-0.50x of 20.10's) and
# connections/s 1.45-1.64x: the tolerances above, set against 20.10, still
# hold them with the same relative margin.
# The read/write copy mode with 4 KiB buffers costs ~2 system calls per
# 4 KiB (~525k/GiB), far outside any of these.
TOLERANCES = {
    "syscalls_per_gib": ("syscalls_per_gib", None, "count", "lower", 3.0, 2000.0),
    "syscalls_per_conn": ("syscalls_per_conn", None, "count", "lower", 0.15, 2.0),
    "strace_syscalls_per_gib": ("strace_syscalls_per_gib", None, "count", "lower", 1.0,
                                60000.0),
    "strace_syscalls_per_conn": ("strace_syscalls_per_conn", None, "count", "lower", 0.15, 2.0),
    "fds_per_conn": ("fds_per_conn", None, "count", "lower", 0.10, 0.25),
    "threads": ("threads", None, "count", "lower", 0.0, 1.0),
    "rss_per_conn_kib": ("rss_per_conn_kib", None, "count", "lower", 0.50, 2.0),
    "idle_rss/python-bare": ("idle_rss_mib", "python-bare", "count", "lower", 0.10, 0.0),
    "bulk_1/iptables": ("bulk_1", "iptables", "timing", "higher", 0.65, 0.0),
    "bulk_n/iptables": ("bulk_n", "iptables", "timing", "higher", 0.5, 0.0),
    "cpu_per_gb/docker-proxy": ("cpu_per_gb", "docker-proxy", "timing", "lower", 0.9, 0.0),
    "rr_added_p50/docker-proxy": ("rr_added_p50", "docker-proxy", "timing", "lower", 0.5, 0.0),
    # Bimodal against docker-proxy over eleven quick runs (external): 0.39-0.44
    # or 0.71-0.74 by the latency mode docker-proxy's own round trips land in,
    # the main branch's code alike; loopback 0.40-0.42.  The tolerance spans
    # both modes.
    "udp_added_p50/docker-proxy": ("udp_added_p50", "docker-proxy", "timing", "lower", 1.0,
                                   0.0),
    "crr_rate/docker-proxy": ("crr_rate", "docker-proxy", "timing", "higher", 0.45, 0.0),
    "udp_pps/docker-proxy": ("udp_pps", "docker-proxy", "timing", "higher", 0.5, 0.0),
    "spawn/python-bare": ("spawn_ms", "python-bare", "timing", "lower", 1.0, 0.0),
    "churn_hold": ("churn_hold", None, "timing", "higher", 0.8, 0.0),
    "churn_done_pct": ("churn_done_pct", None, "count", "higher", 0.0, 0.0),
    # The ports group (engine mode against docker-proxy, issue 12).
    "port_uss/docker-proxy": ("port_uss_kib", "docker-proxy", "count", "lower", 0.25, 0.0),
    "ports100_uss/docker-proxy": ("ports100_uss_mib", "docker-proxy", "count", "lower", 0.25,
                                  0.0),
    "ports1000_uss/docker-proxy": ("ports1000_uss_mib", "docker-proxy", "count", "lower", 0.25,
                                   0.0),
    "port_spawn/docker-proxy": ("port_spawn_ms", "docker-proxy", "timing", "lower", 1.0, 0.0),
    # The first port's start is an interpreter's start (the engine's)
    # against a static Go binary's, so the neighbours' load weighs on one
    # side only: 9.4-13.6x docker-proxy's over five runs, per-round IQRs as
    # wide as 11.2-20.5.  Like a single warm start, it gates a doubling.
    "port_first_spawn/docker-proxy": ("port_first_spawn_ms", "docker-proxy", "timing", "lower",
                                      1.0, 0.0),
    # Four clients on four published ports at once (agg group), not pinned:
    # the spread above with a margin of about twice it.  Connections/s
    # depends on the machine's load, not on the rounds: the engine relays
    # in one thread, which competes with the neighbours as one, while four
    # docker-proxy processes compete with all their threads.  In the suite
    # run of a gate check with the load average at 7 it measured 0.67x
    # [0.59-0.97] (engine 1.4k-4.3k/s per round, docker-proxy 2.6k-4.2k/s),
    # against 1.21-1.59x in five runs at 3-5.  The tolerance spans both, as
    # udp_added_p50's does its two modes: it fails a collapse, not the load.
    "agg_crr_rate/docker-proxy": ("agg_crr_rate", "docker-proxy", "timing", "higher", 0.6,
                                  0.0),
    "agg_bulk/docker-proxy": ("agg_bulk", "docker-proxy", "timing", "higher", 0.35, 0.0),
    "agg_cpu_per_gb/docker-proxy": ("agg_cpu_per_gb", "docker-proxy", "timing", "lower", 0.6,
                                    0.0),
    # 100 starts back to back: 0.57-0.69 over six runs here, 1.15 in one
    # whose ports group met a burst of the neighbours' load (three rounds
    # only; the single start's tolerance).
    "ports100_spawn/docker-proxy": ("ports100_spawn_ms", "docker-proxy", "timing", "lower",
                                    1.0, 0.0),
}


# A baseline beyond the cap gates as the cap (figures whose lucky runs say
# nothing about the next one).
# ports100_spawn against docker-proxy 28.5 ranged 0.18-0.53 over five quick
# runs here (three rounds each; a range's 100 starts meet the neighbours'
# bursts unevenly), so no baseline predicts the next run: it gates as at
# least 0.5, failing when a range starts no faster than docker-proxy's.
CAPS = {"churn_hold": 1.0, "ports100_spawn/docker-proxy": 0.5}

# Targets: same-run ratios of a path other than the subject that must meet a
# fixed figure whatever the baseline says (the kernel fast path against
# native and iptables DNAT for host-local clients, issue 13).
# key -> (variant, path, metric, reference, better, target, relative tol).
# The verdict uses the ratio's spread the way the table's `~` does with 1:
# - ok: the median of the per-round ratios meets the target;
# - inconclusive (passes, shown): it misses, but the interquartile range of
#   the per-round ratios reaches the target, or the median is within the
#   tolerance of it;
# - MISSED (fails): the whole range lies beyond the target and the median
#   beyond the tolerance.
# Tolerances from the spread of the fast path's ratios over nine quick runs
# here (docs/benchmarking.md): RR p50 0.99-1.00 and UDP p50 0.97-1.05 (pinned);
# p99 0.84-1.16 of native, since each path has its own echo server process
# and p99 falls in the VM's slow wake-up mode (60-90 us); throughput
# 0.87-1.02 (not pinned); connections/s 0.77-1.19.
TARGETS = {
    "fastpath bulk_1/native": ("loopback", "fastpath", "bulk_1", "native", "higher", 0.95, 0.10),
    "fastpath bulk_1/iptables": ("loopback", "fastpath", "bulk_1", "iptables", "higher", 1.0,
                                 0.10),
    "fastpath rr_p50/native": ("loopback", "fastpath", "rr_p50", "native", "lower", 1.05, 0.03),
    "fastpath rr_p50/iptables": ("loopback", "fastpath", "rr_p50", "iptables", "lower", 1.0,
                                 0.03),
    "fastpath rr_p99/native": ("loopback", "fastpath", "rr_p99", "native", "lower", 1.05, 0.15),
    "fastpath rr_p99/iptables": ("loopback", "fastpath", "rr_p99", "iptables", "lower", 1.0,
                                 0.15),
    "fastpath crr_rate/native": ("loopback", "fastpath", "crr_rate", "native", "higher", 0.9,
                                 0.05),
    "fastpath crr_rate/iptables": ("loopback", "fastpath", "crr_rate", "iptables", "higher", 1.0,
                                   0.05),
    "fastpath udp_rr_p50/native": ("loopback", "fastpath", "udp_rr_p50", "native", "lower", 1.05,
                                   0.03),
}


def all_tolerances() -> dict:
    """TOLERANCES and TARGETS in one table of (metric, ref, kind, better, rel, abs);
    a target's kind is "target" (its figure is TARGETS[key][5])."""
    out = dict(TOLERANCES)
    for key, (_v, _p, metric, ref, better, _t, rel) in TARGETS.items():
        out[key] = (metric, ref, "target", better, rel, 0.0)
    return out


def gate_entries(res, variant: str, metric: str, path: str) -> dict:
    """The gate values a benchmark record carries: the subject's against the
    baseline, and any path's TARGETS."""
    out = {}
    for key, (v, p, m, ref, better, target, _rel) in TARGETS.items():
        if (v, p, m) != (variant, path, metric):
            continue
        r = res.ratio_stats(variant, metric, path, ref)
        if r is not None:
            out[key] = {"value": r.value, "q1": r.q1, "q3": r.q3, "conclusive": r.conclusive,
                        "kind": "target", "better": better, "metric": metric, "ref": ref,
                        "target": target}
    if path != SUBJECT:
        return out
    for key, (m, ref, kind, better, _rel, _abs) in TOLERANCES.items():
        if m != metric:
            continue
        if ref is None:
            value = res.median(variant, metric, path)
            entry = {"value": value}
        else:
            r = res.ratio_stats(variant, metric, path, ref)
            value = r.value if r is not None else None
            entry = {"value": value, "q1": r.q1, "q3": r.q3,
                     "conclusive": r.conclusive} if r is not None else {}
        if value is not None:
            entry.update(kind=kind, better=better, metric=metric, ref=ref)
            out[key] = entry
    return out


class GateError(Exception):
    """A result file (or option) that cannot be gated: exit 2."""


def load(path: str) -> dict:
    """{(variant, key): entry} from a pytest-benchmark (or `spliceproxy bench`) JSON file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise GateError("cannot read %s: %s" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise GateError("%s is not JSON: %s" % (path, exc)) from None
    return load_data(data, path)


def load_data(data, path: str = "input") -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise GateError("%s has no 'benchmarks' list (not pytest-benchmark JSON)" % path)
    out = {}
    for b in data["benchmarks"]:
        info = (b.get("extra_info") if isinstance(b, dict) else None) or {}
        gate = info.get("gate") if isinstance(info, dict) else None
        for key, entry in (gate if isinstance(gate, dict) else {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)) \
                    and not isinstance(entry.get("value"), bool):
                out[(str(info.get("variant", "?")), key)] = entry
    return out


# -- tolerances ---------------------------------------------------------------

def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise GateError("%s: %r is not a number" % (what, text)) from None
    if v != v or v < 0 or v == float("inf"):
        raise GateError("%s: %r must be a finite number >= 0" % (what, text))
    return v


def _check_name(name: str, what: str) -> str:
    if name not in TOLERANCES and name not in TARGETS:
        raise GateError("%s: unknown gated figure %r (known: %s)"
                        % (what, name, ", ".join(all_tolerances())))
    return name


def parse_tolerance(item: str) -> tuple[str, float, float | None]:
    """NAME=REL or NAME=REL:ABS -> (name, rel, abs or None)."""
    name, sep, value = item.partition("=")
    what = "--tolerance %s" % item
    if not sep or not name or not value:
        raise GateError("%s: want NAME=REL or NAME=REL:ABS" % what)
    _check_name(name.strip(), what)
    rel, _sep, absol = value.partition(":")
    return (name.strip(), _number(rel.strip(), what),
            _number(absol.strip(), what) if absol.strip() else None)


_TOML_LINE = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_./-]+))\s*=\s*(.+?)\s*$""")
_TOML_TABLE = re.compile(r"""^\s*\{(.*)\}\s*$""")


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for ch in line:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out)


def parse_toml_subset(text: str) -> dict:
    """The TOML this gate reads, for Pythons without tomllib or tomli.

    Tables ([name]), keys bare or quoted, values numbers or inline tables of
    numbers ({ rel = 0.2, abs = 1 }); anything else is an error.
    """
    data: dict = {}
    cur = data
    for n, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip().strip("\"'")
            if not name or line.startswith("[["):
                raise ValueError("line %d: unsupported table header %r" % (n, raw))
            cur = data.setdefault(name, {})
            continue
        m = _TOML_LINE.match(line)
        if not m:
            raise ValueError("line %d: cannot parse %r" % (n, raw))
        key = m.group(1) or m.group(2) or m.group(3)
        val = m.group(4)
        t = _TOML_TABLE.match(val)
        if t:
            inner = {}
            for part in filter(None, (p.strip() for p in t.group(1).split(","))):
                k, sep, v = part.partition("=")
                if not sep:
                    raise ValueError("line %d: cannot parse %r" % (n, part))
                inner[k.strip().strip("\"'")] = _toml_number(v.strip(), n)
            cur[key] = inner
        else:
            cur[key] = _toml_number(val, n)
    return data


def _toml_number(text: str, n: int) -> float:
    try:
        return float(text.replace("_", ""))
    except ValueError:
        raise ValueError("line %d: %r is not a number" % (n, text)) from None


def _load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise GateError("cannot read %s: %s" % (path, exc.strerror)) from None
    try:
        import tomllib as toml  # Python 3.11+
    except ImportError:
        try:
            import tomli as toml  # type: ignore[no-redef]
        except ImportError:
            toml = None
    try:
        if toml is not None:
            return toml.loads(raw.decode("utf-8"))
        return parse_toml_subset(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError
        raise GateError("%s is not valid TOML: %s" % (path, exc)) from None


def load_tolerances(path: str) -> list[tuple[str, float, float | None]]:
    """[tolerances] NAME = REL, or NAME = { rel = REL, abs = ABS }."""
    data = _load_toml(path)
    table = data.get("tolerances", data)
    if not isinstance(table, dict):
        raise GateError("%s: [tolerances] must be a table" % path)
    out = []
    for name, value in table.items():
        what = "%s: %s" % (path, name)
        _check_name(name, what)
        if isinstance(value, dict):
            unknown = set(value) - {"rel", "abs"}
            if unknown or "rel" not in value:
                raise GateError("%s: want { rel = N[, abs = N] }" % what)
            out.append((name, _number(str(value["rel"]), what),
                        _number(str(value["abs"]), what) if "abs" in value else None))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, _number(str(value), what), None))
        else:
            raise GateError("%s: want a number or { rel = N, abs = N }" % what)
    return out


def tolerances(overrides=()) -> dict:
    """TOLERANCES and TARGETS with (name, rel, abs|None) overrides applied, in order."""
    tol = all_tolerances()
    for name, rel, absol in overrides:
        m, ref, kind, better, _rel, old_abs = tol[name]
        tol[name] = (m, ref, kind, better, rel, old_abs if absol is None else absol)
    return tol


# -- comparison ---------------------------------------------------------------

def compare(baseline: dict, current: dict, tol: dict | None = None,
            ignore_missing: bool = False, only_kind: str | None = None) -> list[dict]:
    tol = all_tolerances() if tol is None else tol
    rows = []
    for (variant, key), base in sorted(baseline.items()):
        if key not in tol:
            continue
        _m, _ref, kind, better, rel, absol = tol[key]
        # A target is a timing ratio: --kind timing selects it too.
        if only_kind and kind != only_kind and not (kind == "target" and only_kind == "timing"):
            continue
        cur = current.get((variant, key))
        if kind == "target":
            rows.append(_target_row(variant, key, base, cur, better, rel, absol,
                                    ignore_missing))
            continue
        b = base["value"]
        if key in CAPS:
            b = min(b, CAPS[key]) if better == "higher" else max(b, CAPS[key])
        if better == "lower":
            limit = b * (1 + rel) + absol
        else:
            limit = b * (1 - rel) - absol
        row = {"variant": variant, "key": key, "kind": kind, "better": better,
               "baseline": b, "limit": limit, "rel": rel, "abs": absol, "current": None,
               "current_q1": None, "current_q3": None, "conclusive": None,
               "verdict": "skipped" if ignore_missing else "missing"}
        if cur is not None:
            c = cur["value"]
            row.update(current=c, current_q1=cur.get("q1"), current_q3=cur.get("q3"),
                       conclusive=cur.get("conclusive"))
            bad = c > limit if better == "lower" else c < limit
            row["verdict"] = "REGRESSION" if bad else "ok"
        rows.append(row)
    return rows


def _target_row(variant, key, base, cur, better, rel, absol, ignore_missing) -> dict:
    """A TARGETS figure: judged against its fixed target, with its spread (see TARGETS)."""
    t = TARGETS[key][5]
    limit = t * (1 - rel) - absol if better == "higher" else t * (1 + rel) + absol
    row = {"variant": variant, "key": key, "kind": "target", "better": better,
           "baseline": base["value"], "target": t, "limit": limit, "rel": rel, "abs": absol,
           "current": None, "current_q1": None, "current_q3": None, "conclusive": None,
           "verdict": "skipped" if ignore_missing else "missing"}
    if cur is None:
        return row
    c = cur["value"]
    q1, q3 = cur.get("q1", c), cur.get("q3", c)
    row.update(current=c, current_q1=cur.get("q1"), current_q3=cur.get("q3"),
               conclusive=cur.get("conclusive"))
    if better == "higher":
        meets, reaches, near = c >= t, q3 >= t, c >= limit
    else:
        meets, reaches, near = c <= t, q1 <= t, c <= limit
    row["verdict"] = "ok" if meets else "inconclusive" if (reaches or near) else "MISSED"
    return row


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["verdict"] in ("REGRESSION", "missing", "MISSED")]


def _f(v) -> str:
    return "-" if v is None else ("%.4g" % v)


def _limit(r) -> str:
    if r["kind"] == "target":
        # The target itself, and how far the median may miss it with the
        # spread reaching it.
        return ("<= " if r["better"] == "lower" else ">= ") + "%s (%s)" % (
            _f(r["target"]), _f(r["limit"]))
    return ("<= " if r["better"] == "lower" else ">= ") + _f(r["limit"])


def _spread(r) -> str:
    if r["current_q1"] is None or r["current_q3"] is None:
        return ""
    return " [%s-%s]" % (_f(r["current_q1"]), _f(r["current_q3"]))


def render(rows: list[dict]) -> str:
    head = ("variant", "gate", "kind", "baseline", "current", "limit", "verdict")
    table = [head] + [(r["variant"], r["key"], r["kind"], _f(r["baseline"]),
                       _f(r["current"]) + _spread(r), _limit(r), r["verdict"]) for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_line(rows: list[dict]) -> str:
    bad = failed(rows)
    skipped = sum(1 for r in rows if r["verdict"] == "skipped")
    gated = len(rows) - skipped
    tail = " (%d not in the current run, skipped)" % skipped if skipped else ""
    unsure = sum(1 for r in rows if r["verdict"] == "inconclusive")
    if unsure:
        tail += " (%d target%s inconclusive: missed by the median within the spread)" % (
            unsure, "" if unsure == 1 else "s")
    if bad:
        return "FAIL: %d of %d gated figures regressed or are missing%s" % (len(bad), gated,
                                                                             tail)
    return "PASS: %d gated figures within tolerance%s" % (gated, tail)


def markdown(rows: list[dict], baseline_path: str = "", current_path: str = "") -> str:
    bad = failed(rows)
    icon = {"ok": "ok", "REGRESSION": "**REGRESSION**", "missing": "**missing**",
            "skipped": "skipped", "MISSED": "**MISSED**", "inconclusive": "inconclusive"}
    out = ["### spliceproxy benchmark gate: %s" % ("FAIL" if bad else "PASS"), ""]
    if baseline_path or current_path:
        out += ["Baseline `%s`, current `%s`." % (baseline_path, current_path), ""]
    out += ["| variant | figure | kind | baseline | current [IQR] | limit | verdict |",
            "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        out.append("| %s | `%s` | %s | %s | %s%s | %s | %s |" % (
            r["variant"], r["key"], r["kind"], _f(r["baseline"]), _f(r["current"]),
            _spread(r), _limit(r).replace("<", "&lt;").replace(">", "&gt;"),
            icon[r["verdict"]]))
    out += ["", summary_line(rows), ""]
    return "\n".join(out)


def junit(rows: list[dict]) -> str:
    bad = failed(rows)
    skipped = [r for r in rows if r["verdict"] == "skipped"]
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<testsuites name="spliceproxy-bench-gate" tests="%d" failures="%d">'
             % (len(rows), len(bad)),
             '  <testsuite name="spliceproxy-bench-gate" tests="%d" failures="%d" errors="0" '
             'skipped="%d">' % (len(rows), len(bad), len(skipped))]
    for r in rows:
        name = "%s %s" % (r["variant"], r["key"])
        desc = "baseline %s, current %s%s, limit %s (%s, rel %.3g, abs %.3g)" % (
            _f(r["baseline"]), _f(r["current"]), _spread(r), _limit(r), r["kind"], r["rel"],
            r["abs"])
        parts.append('    <testcase classname=%s name=%s time="0">'
                     % (quoteattr("bench.gate.%s" % r["variant"]), quoteattr(name)))
        if r["verdict"] == "MISSED":
            parts.append('      <failure type="target" message=%s>%s</failure>'
                         % (quoteattr("target missed: " + desc), escape(desc)))
        elif r["verdict"] == "REGRESSION":
            parts.append('      <failure type="regression" message=%s>%s</failure>'
                         % (quoteattr("regression: " + desc), escape(desc)))
        elif r["verdict"] == "missing":
            parts.append('      <failure type="missing" message=%s>%s</failure>'
                         % (quoteattr("missing from the current run"), escape(desc)))
        elif r["verdict"] == "skipped":
            parts.append('      <skipped message=%s/>' % quoteattr("not in the current run"))
        parts.append('      <system-out>%s</system-out>' % escape(desc))
        parts.append("    </testcase>")
    parts += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(parts)


def github_benchmark(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(customSmallerIsBetter entries, customBiggerIsBetter entries) of the current run."""
    smaller, bigger = [], []
    for r in rows:
        if r["current"] is None:
            continue
        _m, ref, _kind, _better, _rel, _abs = all_tolerances().get(r["key"], (None,) * 6)
        entry = {"name": "%s %s" % (r["variant"], r["key"]),
                 "unit": ("x %s" % ref) if ref else _unit(r["key"]),
                 "value": r["current"],
                 "extra": "baseline %s, limit %s, %s" % (_f(r["baseline"]), _limit(r),
                                                         r["verdict"])}
        if r["current_q1"] is not None and r["current_q3"] is not None:
            entry["range"] = "IQR %s-%s" % (_f(r["current_q1"]), _f(r["current_q3"]))
        (smaller if r["better"] == "lower" else bigger).append(entry)
    return smaller, bigger


def _unit(key: str) -> str:
    from spliceproxy.bench.metrics import METRICS

    m = all_tolerances()[key][0]
    return METRICS.get(m, ("",))[0]


def github_benchmark_paths(path: str) -> tuple[str, str]:
    """FILE.json -> (FILE-smaller.json, FILE-bigger.json)."""
    stem, ext = os.path.splitext(path)
    return stem + "-smaller" + (ext or ".json"), stem + "-bigger" + (ext or ".json")


def _write(path: str, text: str, mode: str = "w") -> None:
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as exc:
        raise GateError("cannot write %s: %s" % (path, exc.strerror)) from None


def main(baseline_path: str, current_path: str, out=print, *, overrides=(),
         tolerances_file: str | None = None, markdown_path: str | None = None,
         junit_path: str | None = None, github_benchmark_path: str | None = None,
         ignore_missing: bool = False, only_kind: str | None = None, env=None) -> int:
    env = os.environ if env is None else env
    try:
        over = list(load_tolerances(tolerances_file)) if tolerances_file else []
        over += [parse_tolerance(o) if isinstance(o, str) else o for o in overrides]
        tol = tolerances(over)
        base = load(baseline_path)
        cur = load(current_path)
        if not base:
            raise GateError("%s holds no gated %s figures" % (baseline_path, SUBJECT))
        rows = compare(base, cur, tol, ignore_missing=ignore_missing, only_kind=only_kind)
        if not rows:
            raise GateError("no gated figures selected (kind %s)" % only_kind)
        if markdown_path:
            _write(markdown_path, markdown(rows, baseline_path, current_path))
        summary = env.get("GITHUB_STEP_SUMMARY")
        if summary:
            _write(summary, markdown(rows, baseline_path, current_path), "a")
        if junit_path:
            _write(junit_path, junit(rows))
        if github_benchmark_path:
            smaller, bigger = github_benchmark(rows)
            ps, pb = github_benchmark_paths(github_benchmark_path)
            _write(ps, json.dumps(smaller, indent=1) + "\n")
            _write(pb, json.dumps(bigger, indent=1) + "\n")
    except GateError as exc:
        out("spliceproxy bench gate: %s" % exc)
        return 2
    out(render(rows))
    out("\n" + summary_line(rows))
    return 1 if failed(rows) else 0
