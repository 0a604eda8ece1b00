"""`spliceproxy bench gate`: comparison logic, tolerances, every output format, exit codes.

The gate runs as the installed command in a subprocess wherever an exit code
or a message is asserted, so what CI sees is what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET

import pytest

from spliceproxy.bench import gate


def _record(variant: str, metric: str, path: str, gates: dict) -> dict:
    name = "test_metric[%s-%s-%s]" % (variant, metric, path)
    return {"name": name, "fullname": "benchmarks/test_paths.py::" + name,
            "stats": {"median": 1.0, "data": [1.0]},
            "extra_info": {"variant": variant, "metric": metric, "path": path, "gate": gates}}


def result(**figures) -> dict:
    """A pytest-benchmark JSON with the given gated figures (key=value, '__' for '/')."""
    benches = []
    for key, value in figures.items():
        key = key.replace("__", "/")
        variant = "process" if key in ("idle_rss/python-bare", "spawn/python-bare") \
            else "external"
        m, ref, kind, better, _rel, _abs = gate.TOLERANCES[key]
        entry = {"value": value, "kind": kind, "better": better, "metric": m, "ref": ref}
        if ref:
            entry.update(q1=value * 0.9, q3=value * 1.1, conclusive=True)
        benches.append(_record(variant, m, "spliceproxy", {key: entry}))
    benches.append(_record("external", "bulk_1", "native", {}))
    return {"machine_info": {}, "benchmarks": benches}


BASE = dict(syscalls_per_gib=5000.0, syscalls_per_conn=28.0, fds_per_conn=2.0, threads=1.0,
            bulk_1__iptables=0.6, cpu_per_gb__docker_proxy=0.5)
BASE["cpu_per_gb/docker-proxy"] = BASE.pop("cpu_per_gb__docker_proxy")


def _kw(d: dict) -> dict:
    return {k.replace("/", "__"): v for k, v in d.items()}


@pytest.fixture
def files(tmp_path):
    def write(name: str, data) -> str:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else json.dumps(data))
        return str(p)

    return write


def run_gate(*args: str, env=None) -> subprocess.CompletedProcess:
    """The installed `spliceproxy` command, as CI calls it."""
    exe = os.path.join(sysconfig.get_path("scripts"), "spliceproxy")
    if not os.access(exe, os.X_OK):
        exe = None
    argv = ([exe] if exe else [sys.executable, "-m", "spliceproxy"]) + ["bench", "gate",
                                                                        *args]
    e = dict(os.environ)
    e.pop("GITHUB_STEP_SUMMARY", None)
    e.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=e)


# -- comparison ---------------------------------------------------------------

def test_lower_and_higher_limits():
    base = gate.load_data(result(**_kw(BASE)))
    rows = {r["key"]: r for r in gate.compare(base, base)}
    assert rows["syscalls_per_gib"]["limit"] == pytest.approx(5000 * 4.0 + 2000)
    assert rows["bulk_1/iptables"]["limit"] == pytest.approx(0.6 * (1 - 0.65))
    assert rows["threads"]["limit"] == pytest.approx(2.0)
    assert all(r["verdict"] == "ok" for r in rows.values())


def test_regression_each_direction():
    base = gate.load_data(result(**_kw(BASE)))
    worse = dict(BASE)
    worse["syscalls_per_gib"] = 525000.0  # lower is better: above the limit
    worse["bulk_1/iptables"] = 0.1  # higher is better: below the limit
    worse["threads"] = 2.0  # exactly at the limit: still ok
    rows = {r["key"]: r for r in gate.compare(base, gate.load_data(result(**_kw(worse))))}
    assert rows["syscalls_per_gib"]["verdict"] == "REGRESSION"
    assert rows["bulk_1/iptables"]["verdict"] == "REGRESSION"
    assert rows["threads"]["verdict"] == "ok"
    assert rows["fds_per_conn"]["verdict"] == "ok"


def test_capped_baseline():
    base = gate.load_data(result(churn_hold=7.5))
    ok = gate.load_data(result(churn_hold=0.8))
    bad = gate.load_data(result(churn_hold=0.05))
    assert gate.compare(base, ok)[0]["limit"] == pytest.approx(0.2)
    assert gate.compare(base, ok)[0]["verdict"] == "ok"
    assert gate.compare(base, bad)[0]["verdict"] == "REGRESSION"


def test_missing_fails_unless_ignored_and_kind_filter():
    base = gate.load_data(result(**_kw(BASE)))
    part = gate.load_data(result(syscalls_per_gib=5000.0))
    rows = gate.compare(base, part)
    assert {r["verdict"] for r in rows} == {"ok", "missing"}
    assert len(gate.failed(rows)) == len(BASE) - 1
    rows = gate.compare(base, part, ignore_missing=True)
    assert not gate.failed(rows)
    rows = gate.compare(base, base, only_kind="count")
    assert {r["kind"] for r in rows} == {"count"}


def test_tolerance_overrides():
    base = gate.load_data(result(**_kw(BASE)))
    cur = dict(BASE, **{"bulk_1/iptables": 0.5})
    curd = gate.load_data(result(**_kw(cur)))
    tol = gate.tolerances([gate.parse_tolerance("bulk_1/iptables=0.1")])
    rows = {r["key"]: r for r in gate.compare(base, curd, tol)}
    assert rows["bulk_1/iptables"]["verdict"] == "REGRESSION"
    tol = gate.tolerances([gate.parse_tolerance("syscalls_per_conn=0:0.5")])
    assert tol["syscalls_per_conn"][4:] == (0.0, 0.5)
    for bad in ("nosuch=0.1", "bulk_1/iptables", "bulk_1/iptables=x", "threads=-1",
                "threads=nan"):
        with pytest.raises(gate.GateError):
            gate.parse_tolerance(bad)


TOML = """
# tolerances for a noisier runner
[tolerances]
"bulk_1/iptables" = 0.8   # one stream swings most
syscalls_per_conn = { rel = 0.3, abs = 4 }
threads = 1
"""


@pytest.mark.parametrize("parser", ["native", "subset"])
def test_tolerances_toml(files, monkeypatch, parser):
    if parser == "subset":
        monkeypatch.setattr(gate, "_load_toml",
                            lambda p: gate.parse_toml_subset(open(p).read()))
    got = dict((n, (r, a)) for n, r, a in gate.load_tolerances(files("t.toml", TOML)))
    assert got == {"bulk_1/iptables": (0.8, None), "syscalls_per_conn": (0.3, 4.0),
                   "threads": (1.0, None)}


def test_toml_subset_rejects_what_it_cannot_read():
    for bad in ("[[array]]\n", "x = [1, 2]\n", "x = 'text'\n", "just words\n"):
        with pytest.raises(ValueError):
            gate.parse_toml_subset(bad)


# -- output formats -------------------------------------------------------------

def _rows():
    base = gate.load_data(result(**_kw(BASE)))
    cur = dict(BASE, syscalls_per_gib=525000.0)
    del cur["threads"]
    return gate.compare(base, gate.load_data(result(**_kw(cur))))


def test_junit_parses_one_case_per_figure():
    rows = _rows()
    root = ET.fromstring(gate.junit(rows))
    cases = root.findall(".//testcase")
    assert len(cases) == len(rows) == len(BASE)
    fails = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(fails) == {"external syscalls_per_gib", "external threads"}
    assert fails["external syscalls_per_gib"].get("type") == "regression"
    assert fails["external threads"].get("type") == "missing"
    suite = root.find("testsuite")
    assert suite.get("tests") == str(len(BASE)) and suite.get("failures") == "2"


def test_markdown_table():
    md = gate.markdown(_rows(), "base.json", "cur.json")
    lines = md.splitlines()
    assert lines[0] == "### spliceproxy benchmark gate: FAIL"
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(BASE)
    assert all(ln.count("|") == 8 for ln in table)
    assert any("`syscalls_per_gib`" in ln and "**REGRESSION**" in ln for ln in table)


def test_github_benchmark_shape():
    smaller, bigger = gate.github_benchmark(_rows())
    for entry in smaller + bigger:
        assert set(entry) <= {"name", "unit", "value", "range", "extra"}
        assert isinstance(entry["name"], str) and isinstance(entry["unit"], str)
        assert isinstance(entry["value"], float)
    assert {e["name"] for e in bigger} == {"external bulk_1/iptables"}
    assert "external syscalls_per_gib" in {e["name"] for e in smaller}
    assert "external threads" not in {e["name"] for e in smaller}  # not measured
    ratio = next(e for e in bigger if e["name"] == "external bulk_1/iptables")
    assert ratio["unit"] == "x iptables" and ratio["range"].startswith("IQR ")


# -- the command ------------------------------------------------------------------

def test_cli_pass_writes_every_format(files, tmp_path):
    b = files("base.json", result(**_kw(BASE)))
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    cp = run_gate(b, b, "--markdown", str(tmp_path / "g.md"), "--junit",
                  str(tmp_path / "g.xml"), "--github-benchmark", str(tmp_path / "gh.json"),
                  env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "PASS: %d gated figures" % len(BASE) in cp.stdout
    assert (tmp_path / "g.md").read_text().startswith("### spliceproxy benchmark gate: PASS")
    assert summary.read_text().startswith("earlier step\n### spliceproxy benchmark gate: PASS")
    ET.parse(str(tmp_path / "g.xml"))
    assert isinstance(json.loads((tmp_path / "gh-smaller.json").read_text()), list)
    assert isinstance(json.loads((tmp_path / "gh-bigger.json").read_text()), list)


def test_cli_regression_exit_1(files):
    b = files("base.json", result(**_kw(BASE)))
    c = files("cur.json", result(**_kw(dict(BASE, syscalls_per_gib=525000.0))))
    cp = run_gate(b, c)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "REGRESSION" in cp.stdout and "FAIL: 1 of" in cp.stdout
    cp = run_gate(b, c, "--tolerance", "syscalls_per_gib=200")
    assert cp.returncode == 0, cp.stdout


@pytest.mark.parametrize("case", ["missing-file", "not-json", "no-benchmarks", "empty-base",
                                  "bad-tolerance", "bad-toml", "unknown-flag", "no-args",
                                  "unwritable"])
def test_cli_bad_input_exit_2_without_traceback(files, tmp_path, case):
    good = files("good.json", result(**_kw(BASE)))
    args = {
        "missing-file": [str(tmp_path / "nope.json"), good],
        "not-json": [files("x.json", "{not json"), good],
        "no-benchmarks": [files("x.json", {"benchmarks": 3}), good],
        "empty-base": [files("x.json", {"benchmarks": []}), good],
        "bad-tolerance": [good, good, "--tolerance", "nosuch=1"],
        "bad-toml": [good, good, "--tolerances", files("t.toml", "[tolerances]\nx = = 1\n")],
        "unknown-flag": [good, good, "--frobnicate"],
        "no-args": [],
        "unwritable": [good, good, "--junit", str(tmp_path / "no" / "such" / "dir.xml")],
    }[case]
    cp = run_gate(*args)
    assert cp.returncode == 2, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stdout + cp.stderr
    assert (cp.stdout + cp.stderr).strip()


def test_cli_list_names_every_figure():
    cp = run_gate("--list")
    assert cp.returncode == 0
    for key in gate.TOLERANCES:
        assert key in cp.stdout


def _target_result(**figures) -> dict:
    """A result with fast path TARGETS figures: key -> (median, q1, q3)."""
    benches = []
    for key, (value, q1, q3) in figures.items():
        variant, path, m, ref, better, target, _rel = gate.TARGETS[key]
        entry = {"value": value, "q1": q1, "q3": q3, "conclusive": True, "kind": "target",
                 "better": better, "metric": m, "ref": ref, "target": target}
        benches.append(_record(variant, m, path, {key: entry}))
    return {"machine_info": {}, "benchmarks": benches}


def test_target_met_inconclusive_and_missed():
    """A fast path target is judged against its fixed figure, not the baseline:
    met by the median, inconclusive (passing) when the spread reaches it, failing
    only when the whole interquartile range misses it beyond the tolerance."""
    base = gate.load_data(_target_result(**{
        "fastpath bulk_1/native": (1.0, 0.98, 1.02),
        "fastpath rr_p50/native": (1.0, 0.99, 1.01)}))

    def verdicts(bulk, rr):
        cur = gate.load_data(_target_result(**{"fastpath bulk_1/native": bulk,
                                                "fastpath rr_p50/native": rr}))
        return {r["key"]: r["verdict"] for r in gate.compare(base, cur)}

    assert verdicts((0.96, 0.90, 1.0), (1.04, 1.0, 1.1)) == {
        "fastpath bulk_1/native": "ok", "fastpath rr_p50/native": "ok"}
    # Missed by the median, reached by the spread (or within the tolerance).
    v = verdicts((0.90, 0.80, 0.96), (1.07, 1.06, 1.09))
    assert v == {"fastpath bulk_1/native": "inconclusive",
                 "fastpath rr_p50/native": "inconclusive"}
    # Whole range beyond: a failure, whatever the baseline said.
    v = verdicts((0.70, 0.65, 0.75), (1.30, 1.25, 1.40))
    assert v == {"fastpath bulk_1/native": "MISSED", "fastpath rr_p50/native": "MISSED"}
    rows = gate.compare(base, gate.load_data(_target_result(**{
        "fastpath bulk_1/native": (0.70, 0.65, 0.75)})))
    assert [r["verdict"] for r in gate.failed(rows)] == ["MISSED", "missing"]
    assert "FAIL" in gate.summary_line(rows) and ">= 0.95" in gate.render(rows)


def test_target_cli_exit_codes_and_overrides(files):
    base = files("base.json", _target_result(**{"fastpath crr_rate/iptables": (1.1, 1.0, 1.2)}))
    bad = files("bad.json", _target_result(**{"fastpath crr_rate/iptables": (0.8, 0.78, 0.82)}))
    cp = run_gate(base, bad)
    assert cp.returncode == 1 and "MISSED" in cp.stdout, cp.stdout
    # A tolerance wide enough turns the miss into an inconclusive pass.
    cp = run_gate(base, bad, "--tolerance", "fastpath crr_rate/iptables=0.25")
    assert cp.returncode == 0 and "inconclusive" in cp.stdout, cp.stdout
    # Targets are timing figures: gating counts only leaves them out.
    cp = run_gate(base, bad, "--kind", "timing")
    assert cp.returncode == 1
    cp = run_gate("--list")
    assert all(k in cp.stdout for k in gate.TARGETS)


def test_target_entries_come_from_the_fast_path_records():
    from spliceproxy.bench.results import Results

    res = Results("quick")
    for r, (fp, nat) in enumerate([(17.0, 17.5), (16.0, 16.2), (18.0, 17.9)]):
        res.add("loopback", "bulk_1", "fastpath", fp, r)
        res.add("loopback", "bulk_1", "native", nat, r)
    entries = gate.gate_entries(res, "loopback", "bulk_1", "fastpath")
    e = entries["fastpath bulk_1/native"]
    assert e["kind"] == "target" and e["target"] == 0.95 and e["q1"] <= e["value"] <= e["q3"]
    assert gate.gate_entries(res, "loopback", "bulk_1", "native") == {}
