"""The manual cannot drift from the code.

* The tables of environment variables in docs/ are the ones
  ``spliceproxy.manual`` makes from ``settings.VARIABLES`` and
  ``helptext.ENVIRONMENT``.
* The README is the front door, and its Quick start still holds the test
  command .ci/run extracts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from spliceproxy import manual, settings

ROOT = Path(__file__).resolve().parents[2]


DOCS = ROOT / "docs"


EXPECTED_TABLES = {
    "configuration.md": ["variables-proxy", "variables-engine"],
    "development.md": ["variables-build", "variables-tests"],
}


def test_readme_is_the_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.split("\n")) <= 300
    headings = [line for line in text.split("\n") if line.startswith("## ")]
    for needed in ("## Quick start", "## Install", "## Use with Docker"):
        assert needed in headings


@pytest.mark.parametrize("page, names", sorted(EXPECTED_TABLES.items()))
def test_generated_tables_match_the_code(page, names):
    text = (DOCS / page).read_text(encoding="utf-8")
    assert manual.tables_in(text) == names
    assert manual.render(text) == text, (
        "docs/%s differs from the code: python -m spliceproxy.manual --update docs/%s"
        % (page, page))


def test_every_table_has_a_page():
    placed = [n for names in EXPECTED_TABLES.values() for n in names]
    assert sorted(placed) == sorted(manual.TABLES)


def test_every_variable_has_a_row():
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for v in settings.VARIABLES:
        assert "| `SPLICEPROXY_%s` |" % v.name in text, v.name


def test_manual_check_and_update(tmp_path):
    page = tmp_path / "page.md"
    stale = ("# Page\n\n%s\n| variable | default | meaning |\n|---|---|---|\n"
             "| `SPLICEPROXY_UDP_TIMEOUT` | `1s` | a stale meaning |\n%s\n\nAfter.\n"
             % (manual.BEGIN % "variables-proxy", manual.END))
    page.write_text(stale)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "spliceproxy.manual", *args],
                              capture_output=True, text=True, timeout=60)

    cp = run("--check", str(page))
    assert cp.returncode == 1 and "differs from the code" in cp.stderr, cp
    assert page.read_text() == stale
    cp = run("--update", str(page))
    assert cp.returncode == 0, cp
    text = page.read_text()
    assert "a stale meaning" not in text and "| `SPLICEPROXY_UDP_TIMEOUT` | `90s` |" in text
    assert text.startswith("# Page\n\n") and text.endswith("\n\nAfter.\n")
    assert run("--check", str(page)).returncode == 0
    page.write_text(stale.replace("variables-proxy", "variables-nothing"))
    cp = run("--check", str(page))
    assert cp.returncode == 2 and "unknown generated table" in cp.stderr, cp
    page.write_text("# No table\n")
    assert run("--check", str(page)).returncode == 2


def test_a_cell_cannot_break_the_table():
    with pytest.raises(ValueError):
        manual._cell("a | b")
    assert manual._cell("bt-l<pid>-") == "bt-l\\<pid>-"


# --------------------------------------------------------------------------
# What .ci/run takes from the README.


def test_quick_start_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"quickstart_test=\$\(awk '(.*?)' README\.md\)", ci, re.S)
    assert m, ".ci/run no longer extracts the Quick start command as this test expects"
    out = subprocess.run(["awk", m.group(1), str(ROOT / "README.md")], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out == "sh scripts/install-venv test && /opt/spliceproxy/bin/python -m pytest\n"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert section.count("```sh\n") == 2
