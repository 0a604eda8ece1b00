"""The example CI files and .ci/bench-gate run commands the CLI really accepts.

Every `spliceproxy bench ...` and `pytest benchmarks ...` command in them is
extracted and parsed with the real argument parsers (and pytest's own
--help for the suite's options), so a renamed flag breaks this test rather
than someone's pipeline.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spliceproxy.bench import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "ci-examples" / "github-actions.yml", ROOT / "ci-examples" / "gitlab-ci.yml"]
SCRIPTS = EXAMPLES + [ROOT / ".ci" / "bench-gate"]

try:
    import yaml
except ImportError:
    yaml = None

SHELL_STOP = {"||", "&&", ";", "|", ">", "2>"}


def _yaml_shell(path: Path) -> list[str]:
    """The shell text a CI file runs: GitHub steps' run, GitLab script lines."""
    doc = yaml.safe_load(path.read_text())
    out = []
    for job in (doc.get("jobs") or {}).values():  # GitHub
        out += [s["run"] for s in job.get("steps", []) if "run" in s]
    for job in doc.values():  # GitLab
        if isinstance(job, dict) and "script" in job:
            out += job.get("before_script", []) + job["script"]
    return out


def _text_shell(path: Path) -> list[str]:
    """Without a YAML parser: each command line with its continuations joined
    (a trailing backslash, or a deeper-indented line under a `- ` list item)."""
    cmds, cur, base, item, cont = [], None, 0, False, False
    for raw in path.read_text().splitlines():
        text = raw.strip()
        ind = len(raw) - len(raw.lstrip())
        if cur is not None and text and (cont or (item and ind > base
                                                  and not text.startswith("- "))):
            cur += " " + text.rstrip("\\")
            cont = text.endswith("\\")
            continue
        if cur is not None:
            cmds.append(cur)
            cur = None
        if re.search(r"spliceproxy bench|pytest benchmarks", text):
            item, base = text.startswith("- "), ind
            cur = (text[2:] if item else text).rstrip("\\")
            cont = text.endswith("\\")
    if cur is not None:
        cmds.append(cur)
    return cmds


def commands(path: Path, how: str) -> list[list[str]]:
    chunks = _text_shell(path) if how == "text" or path.suffix != ".yml" else _yaml_shell(path)
    found = []
    for chunk in chunks:
        for line in chunk.replace("\\\n", " ").splitlines() if how != "text" else [chunk]:
            for part in re.split(r";|\|\||&&", line):
                try:
                    toks = shlex.split(part, comments=True)
                except ValueError:
                    continue
                for i, t in enumerate(toks):
                    if t.endswith("spliceproxy") and toks[i + 1:i + 2] == ["bench"]:
                        rest = toks[i + 2:]
                    elif t == "pytest" and toks[i + 1:i + 2] == ["benchmarks"]:
                        rest = ["pytest"] + toks[i + 2:]
                    else:
                        continue
                    cut = next((k for k, x in enumerate(rest) if x in SHELL_STOP), len(rest))
                    found.append(rest[:cut])
                    break
    return found


HOWS = ["yaml", "text"] if yaml is not None else ["text"]


@pytest.mark.skipif(yaml is None, reason="no YAML parser (pip install pyyaml)")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_yaml(path):
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    if path.name == "github-actions.yml":
        assert doc["jobs"]["bench"]["steps"]
    else:
        assert doc["bench"]["script"] and doc["bench"]["artifacts"]["reports"]["junit"]


def _pytest_options() -> str:
    cp = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                         str(ROOT / "benchmarks"), "--help"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_commands_are_accepted(path, how):
    cmds = commands(path, how)
    kinds = {c[0] if c and c[0] in ("gate", "pytest") else "bench" for c in cmds}
    assert kinds == {"gate", "pytest", "bench"}, cmds  # suite, gate, and the biting check
    helptext = None
    for c in cmds:
        if c[0] == "gate":
            ns = cli.gate_parser().parse_args(c[1:])
            assert ns.baseline == "benchmarks/baseline.json"
        elif c[0] == "pytest":
            helptext = helptext or _pytest_options()
            for opt in (t.split("=")[0] for t in c[1:] if t.startswith("--")):
                assert re.search(r"\s%s[\s=,]" % re.escape(opt), helptext), opt
        else:
            ns = cli._parser().parse_args(c)
            assert ns.quick
            if ns.groups:
                assert set(ns.groups.split(",")) <= set(cli.harness_groups())
    gates = [c for c in cmds if c[0] == "gate"]
    assert any("--junit" in c for c in gates)
    biting = [c for c in gates if "degraded" in " ".join(c)]
    assert biting and all("--ignore-missing" in c and "--kind" in c for c in biting)
