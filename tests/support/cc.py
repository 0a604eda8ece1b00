"""The project's C dialect and warning flags for the tests that compile C."""

from __future__ import annotations

from pathlib import Path

CFLAGS_FILE = Path(__file__).resolve().parents[2] / "csrc" / "cflags.txt"


def cflags() -> list[str]:
    """csrc/cflags.txt as a list of arguments, with -Werror: test C is held
    to the same warnings as the engine (the C lint compiles it too)."""
    words = [w for line in CFLAGS_FILE.read_text().splitlines()
             if not line.startswith("#") for w in line.split()]
    return words + ["-Werror"]
