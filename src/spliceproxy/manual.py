"""The manual's tables of environment variables, made from the code.

The proxy's variables come from ``settings.VARIABLES`` (the one table they
are parsed with), the engine's, the build's and the tests' from
``helptext.ENVIRONMENT``.  In the docs each table sits between two markers:

    <!-- generated table: variables-proxy (python -m spliceproxy.manual --update FILE) -->
    ...
    <!-- end of generated table -->

``python -m spliceproxy.manual`` prints every table, ``--update FILE...``
rewrites the tables in those files, ``--check FILE...`` exits 1 when one of
them differs from the code (tests/unit/test_docs.py runs that check).

Not on the proxy's startup path: nothing but this command imports it.
"""

from __future__ import annotations

import re
import sys

BEGIN = "<!-- generated table: %s (python -m spliceproxy.manual --update FILE) -->"
END = "<!-- end of generated table -->"
_BLOCK = re.compile(r"^<!-- generated table: (\S+) .*?-->\n(.*?)^" + re.escape(END) + "$",
                    re.M | re.S)

_HEADER = ["| variable | default | meaning |", "|---|---|---|"]


def _cell(text: str) -> str:
    """Markdown for one cell: no pipe may split it, and `<` does not open a tag."""
    if "|" in text or "\n" in text:
        raise ValueError("a table cell cannot hold %r" % text)
    return text.replace("<", "\\<")


def _row(name: str, default: str, meaning: str) -> str:
    return "| `%s` | %s | %s |" % (name, _cell(default), _cell(meaning))


def proxy_table() -> str:
    """The variables the proxy reads at start-up, one row per ``settings.VARIABLES`` entry."""
    from spliceproxy.settings import ENV_PREFIX, VARIABLES

    rows = [_row(ENV_PREFIX + v.name, v.doc_default or "`%s`" % v.shown, v.doc or v.help)
            for v in VARIABLES]
    return "\n".join(_HEADER + rows)


def _environment_table(group: str) -> str:
    from spliceproxy.helptext import ENVIRONMENT

    rows = [_row(v.name, v.default, v.meaning + (" (%s)" % v.note if v.note else ""))
            for v in ENVIRONMENT if v.group == group]
    if not rows:
        raise ValueError("no variables in group %r" % group)
    return "\n".join(_HEADER + rows)


TABLES = {
    "variables-proxy": proxy_table,
    "variables-engine": lambda: _environment_table("engine"),
    "variables-build": lambda: _environment_table("build"),
    "variables-tests": lambda: _environment_table("tests"),
}


def render(text: str) -> str:
    """``text`` with every generated table in it made anew from the code."""

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name not in TABLES:
            raise ValueError("unknown generated table %r (known: %s)"
                             % (name, ", ".join(TABLES)))
        return "%s\n%s\n%s" % (BEGIN % name, TABLES[name](), END)

    return _BLOCK.sub(fill, text)


def tables_in(text: str) -> list[str]:
    """The names of the generated tables ``text`` holds, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m spliceproxy.manual",
                                 description="The manual's tables of environment variables.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true",
                      help="rewrite the generated tables in FILE...")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 when a generated table in FILE... differs from the code")
    ap.add_argument("files", nargs="*", metavar="FILE")
    args = ap.parse_args(argv)
    if not (args.update or args.check):
        if args.files:
            ap.error("FILE needs --update or --check")
        for name, make in TABLES.items():
            print(BEGIN % name)
            print(make())
            print(END)
            print()
        return 0
    if not args.files:
        ap.error("--update and --check need at least one FILE")
    stale = []
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if not tables_in(text):
                print("%s: no generated table in it" % path, file=sys.stderr)
                return 2
            new = render(text)
        except (OSError, ValueError) as e:
            print("%s: %s" % (path, e), file=sys.stderr)
            return 2
        if new == text:
            continue
        if args.check:
            stale.append(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    for path in stale:
        print("%s: a generated table differs from the code; "
              "run python -m spliceproxy.manual --update %s" % (path, path), file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
