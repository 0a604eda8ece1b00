"""The manual cannot drift from the code, nor point at nothing.

* The tables of environment variables in docs/ are the ones
  ``spliceproxy.manual`` makes from ``settings.VARIABLES`` and
  ``helptext.ENVIRONMENT``.
* Every relative link in README.md and docs/*.md leads to a file that exists
  and, with a ``#fragment``, to a heading of that file (GitHub's anchors).
* The README's Quick start still holds the test command .ci/run extracts.
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
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))

# Where each generated table belongs.
EXPECTED_TABLES = {
    "configuration.md": ["variables-proxy", "variables-engine"],
    "development.md": ["variables-build", "variables-tests"],
}


# --------------------------------------------------------------------------
# Markdown, as much of it as links and headings need.

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
# [text](target) and ![alt](target); text may hold `code` and nested [..].
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.split("\n"), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif line.strip().startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text lower-cased,
    every character but letters, digits, '_', '-' and spaces dropped, each
    space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = _CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)                         # inline HTML tags
    text = text.lower()
    text = "".join(c for c in text if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for the headings of a Markdown text,
    repeated headings numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else "%s-%d" % (base, n))
    return out


def relative_links(text: str):
    """(line number, target) of every link that is not to another site; a
    link's text may run over several lines."""
    prose = ["" for _ in text.split("\n")]
    for n, line in _prose_lines(text):
        prose[n - 1] = _CODE_SPAN.sub("", line)
    joined = "\n".join(prose)
    for m in _LINK.finditer(joined):
        target = m.group(1)
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:
        yield joined.count("\n", 0, m.start()) + 1, target


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    text = page.read_text(encoding="utf-8")
    problems = []
    for n, target in relative_links(text):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = "%s:%d: %s" % (page.relative_to(root), n, target)
        if not dest.is_relative_to(root):
            problems.append("%s: outside the repository" % where)
            continue
        if not dest.exists():
            problems.append("%s: no such file" % where)
            continue
        if fragment:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append("%s: an anchor into a file that is not Markdown" % where)
            elif fragment not in anchors(dest.read_text(encoding="utf-8")):
                problems.append("%s: no heading with that anchor in %s"
                                % (where, dest.relative_to(root)))
    return problems


# --------------------------------------------------------------------------
# The link checker itself: it must know GitHub's anchors, and it must fail.

@pytest.mark.parametrize("heading, expected", [
    # Headings this manual links to, with the anchors GitHub gives them.
    ("Kernel fast path for host-local clients (`SPLICEPROXY_FASTPATH`)",
     "kernel-fast-path-for-host-local-clients-spliceproxy_fastpath"),
    ("Busy-poll (`SPLICEPROXY_SPIN`): measured, off by default",
     "busy-poll-spliceproxy_spin-measured-off-by-default"),
    ("Engine mode (the default): one process for every published port",
     "engine-mode-the-default-one-process-for-every-published-port"),
    ("Measuring it: `spliceproxy bench`", "measuring-it-spliceproxy-bench"),
    ("Status pipe (fd 3)", "status-pipe-fd-3"),
    ("3. The relay moves the bytes", "3-the-relay-moves-the-bytes"),
    ("The gate, in any CI", "the-gate-in-any-ci"),
    ("A [linked](x.md) heading", "a-linked-heading"),
])
def test_slug_is_githubs(heading, expected):
    assert slug(heading) == expected


def test_repeated_headings_are_numbered():
    assert anchors("# A\n## A\n### A\n") == {"a", "a-1", "a-2"}


def test_headings_in_code_blocks_are_no_anchors():
    assert anchors("```sh\n# not a heading\n```\n# Real\n") == {"real"}


def test_broken_links_are_found(tmp_path):
    tmp_path = tmp_path.resolve()
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md), [fine too](other.md#a-section), [here](#page),\n"
        "[web](https://example.com/x.md), `[code](nowhere.md)`,\n"
        "[gone](missing.md), [no anchor](other.md#no-such-section), [self](#nope)\n"
        "```\n[in a block](nowhere.md)\n```\n"
        "[over two\nlines](missing-too.md), [up](../../outside.md)\n")
    assert broken_links(page, tmp_path) == [
        "page.md:5: missing.md: no such file",
        "page.md:5: other.md#no-such-section: no heading with that anchor in other.md",
        "page.md:5: #nope: no heading with that anchor in page.md",
        "page.md:9: missing-too.md: no such file",
        "page.md:10: ../../outside.md: outside the repository",
    ]


# --------------------------------------------------------------------------
# The manual.

def test_every_relative_link_resolves():
    assert (DOCS / "README.md").exists()
    problems = [p for page in PAGES for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_every_page_is_reachable_from_the_index():
    index = DOCS / "README.md"
    linked = {(index.parent / target.partition("#")[0]).resolve()
              for _, target in relative_links(index.read_text(encoding="utf-8"))}
    pages = {p.resolve() for p in DOCS.glob("*.md") if p != index}
    assert pages <= linked, sorted(p.name for p in pages - linked)
    readme = ROOT / "README.md"
    from_readme = {(ROOT / target.partition("#")[0]).resolve()
                   for _, target in relative_links(readme.read_text(encoding="utf-8"))}
    assert index.resolve() in from_readme


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
