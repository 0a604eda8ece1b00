"""What crosses the seam comes from engine.h, never from a copy.

The binding's constants (RUN_*, OPT_*, COPY_*, EV_*) are checked against the
values a C compiler gives the header's enums, and the counters' names, kinds
and help lines against SP_STATS_TABLE, so a reordered or added enum member
or counter that the binding does not follow fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spliceproxy import _engine

CSRC = Path(__file__).resolve().parents[2] / "csrc"
HEADER = CSRC / "engine.h"
PKG = Path(__file__).resolve().parents[2] / "src" / "spliceproxy"

# enum in engine.h -> the prefix its members carry in the binding.
ENUMS = {
    "sp_run_result": "RUN_",
    "sp_option": "OPT_",
    "sp_copy_mode": "COPY_",
    "sp_event_kind": "EV_",
}


def _header_text() -> str:
    text = HEADER.read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _members(text: str, enum: str) -> list[str]:
    body = re.search(r"enum %s \{(.*?)\};" % enum, text, re.S)
    assert body, "enum %s not found in %s" % (enum, HEADER)
    names = re.findall(r"\b(SP_[A-Z0-9_]+)\b", body.group(1))
    # SP_OPT_COUNT bounds the enum; it is not an option.
    return [n for n in names if not n.endswith("_COUNT")]


def _compiled_values(tmp_path: Path, names: list[str]) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read engine.h's enum values with")
    src = tmp_path / "enums.c"
    src.write_text(
        '#include <stdio.h>\n#include "engine.h"\nint main(void)\n{\n'
        + "".join('\tprintf("%%s %%d\\n", "%s", (int)%s);\n' % (n, n) for n in names)
        + "\treturn 0;\n}\n"
    )
    exe = tmp_path / "enums"
    subprocess.run([cc, "-std=c11", "-D_GNU_SOURCE", "-I", str(CSRC), "-o", str(exe), str(src)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_every_enum_value_in_the_binding_equals_the_headers(tmp_path):
    text = _header_text()
    members = {enum: _members(text, enum) for enum in ENUMS}
    values = _compiled_values(tmp_path, [n for ms in members.values() for n in ms])
    exposed = set()
    for enum, prefix in ENUMS.items():
        assert members[enum], enum
        for name in members[enum]:
            short = name[len("SP_"):]
            assert short.startswith(prefix), name
            assert hasattr(_engine, short), "%s (%s) is not in the binding" % (short, enum)
            assert getattr(_engine, short) == values[name], name
            exposed.add(short)
    # Nothing in the binding under those prefixes that the header lacks.
    extra = {n for n in dir(_engine) if n.startswith(tuple(ENUMS.values()))} - exposed
    assert not extra


def test_counters_are_defined_once_with_kind_and_help():
    text = HEADER.read_text()
    table = re.findall(r'X\(([A-Z0-9_]+)\)\s*D\((COUNTER|GAUGE),\s*"([^"]+)"\)', text)
    assert len(table) == len(_engine.stat_names()) > 40
    assert [name.lower() for name, _, _ in table] == list(_engine.stat_names())
    kinds = _engine.stat_kinds()
    help_lines = _engine.stat_help()
    for name, kind, line in table:
        assert kinds[name.lower()] == kind.lower()
        assert help_lines[name.lower()] == line
    assert {n for n, k in kinds.items() if k == "gauge"} == {
        "tcp_active", "udp_flows_active", "pipes_open", "pipes_in_use", "fds_open"}


def _functions(text: str) -> set[str]:
    """The names of the functions a C header or a .pxd declares."""
    return set(re.findall(r"^\s*(?:const\s+)?[a-z_0-9]+\s*\**\s*(sp_[a-z_0-9]+)\(", text, re.M))


def _defs(text: str) -> tuple[set[str], set[str]]:
    """(module-level, class Engine's) public def names of a .pyx or a .pyi."""
    module, engine, in_engine = set(), set(), False
    for line in text.splitlines():
        if re.match(r"(cdef )?class Engine\b", line):
            in_engine = True
            continue
        if line and not line[0].isspace():
            in_engine = False
        m = re.match(r"(\s*)def ([a-z_0-9]+)\(", line)
        if m and not m.group(2).startswith("_"):
            (engine if in_engine and m.group(1) else module).add(m.group(2))
    return module, engine


def test_the_binding_declares_what_the_header_does_and_the_stub_what_the_binding_has():
    """Every function of engine.h is in the .pxd (nothing more of it, nothing
    less), and the .pyi has exactly the .pyx's public functions and Engine
    methods, so a function added on one side of the seam is added on all."""
    header = _functions(_header_text())
    pxd = (PKG / "_engine.pxd").read_text()
    start, end = pxd.index('cdef extern from "engine.h"'), pxd.index('cdef extern from "process.h"')
    engine_part = pxd[start:end]
    assert header and _functions(engine_part) == header
    pyx_module, pyx_engine = _defs((PKG / "_engine.pyx").read_text())
    pyi_module, pyi_engine = _defs((PKG / "_engine.pyi").read_text())
    assert "get_option" in pyx_engine and "set_listener_option" in pyx_engine
    assert pyi_engine == pyx_engine
    assert pyi_module == pyx_module
