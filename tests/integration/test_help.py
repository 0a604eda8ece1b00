"""What the installed command says about itself: -h, help, install-path."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spliceproxy
from spliceproxy import goflags, helptext, settings

REPO = Path(__file__).resolve().parents[2]
POINTER = "Run 'spliceproxy help' for the subcommands and the SPLICEPROXY_* variables.\n"


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env=env)


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_dash_h_is_docker_proxys_usage_plus_one_line(proxy_path, flag):
    r = _run(proxy_path, "-proto", "udp", flag)
    assert (r.returncode, r.stdout) == (0, "")
    assert r.stderr == goflags.usage_text(proxy_path) + POINTER


def test_dash_h_names_the_command_as_it_was_run(proxy_path, tmp_path):
    """The stub execs the Python front end, yet usage shows the name the
    command was run by, as when the command was a script: the path given,
    the real path for a symlink (pipx, uv) or a name found on PATH."""
    real = os.path.realpath(proxy_path)
    link = tmp_path / "spliceproxy"
    link.symlink_to(real)
    bindir = os.path.dirname(real)
    for argv, cwd, env, shown in (
            ([str(link), "-h"], None, None, real),
            (["spliceproxy", "-h"], None, dict(os.environ, PATH=bindir + ":/usr/bin:/bin"), real),
            (["./spliceproxy", "-h"], bindir, None, "./spliceproxy")):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd, env=env,
                           stdin=subprocess.DEVNULL)
        assert (r.returncode, r.stdout) == (0, ""), argv
        assert r.stderr == goflags.usage_text(shown) + POINTER, argv


def test_flag_error_usage_is_unchanged(proxy_path):
    r = _run(proxy_path, "-bogus")
    assert r.returncode == 2
    assert r.stderr == ("flag provided but not defined: -bogus\n"
                        + goflags.usage_text(proxy_path))


def test_help_lists_every_subcommand_and_variable(proxy_path):
    r = _run(proxy_path, "help")
    assert (r.returncode, r.stderr) == (0, "")
    for cmd in ("spliceproxy bench [--quick]", "spliceproxy bench gate BASELINE CURRENT",
                "spliceproxy install-path", "spliceproxy help", "spliceproxy -v"):
        assert "\n  " + cmd in r.stdout, cmd
    for var in helptext.ENVIRONMENT:
        assert "\n  %s (default: %s)\n" % (var.name, var.default) in r.stdout, var.name
    # Only what exists is listed: every subcommand named there runs.
    for cmd in helptext.SUBCOMMANDS:
        word = cmd.usage.split()[1]
        if word.startswith("-"):
            continue
        # bench runs benchmarks and engine serves until stopped: their --help.
        args = [word, "--help"] if word in ("bench", "engine", "status") else [word]
        if word == "bench" and "gate" in cmd.usage:
            args = [word, "gate", "--help"]
        done = _run(proxy_path, *args)
        assert done.returncode == 0, (cmd.usage, done.stderr)
        assert "Traceback" not in done.stderr


def test_proxy_variables_are_described_by_the_settings_table():
    # One table: what help says about a proxy variable is what settings.py,
    # which parses it, says; the build and test variables follow.
    rows = [(v.name, v.default, v.meaning) for v in helptext.ENVIRONMENT if v.group == "proxy"]
    assert rows == [(settings.ENV_PREFIX + v.name, v.shown, v.help) for v in settings.VARIABLES]
    assert all(v.shown and v.help for v in settings.VARIABLES)


def _names_read(text: str) -> set[str]:
    names = set(re.findall(r"\bSPLICEPROXY_([A-Z][A-Z0-9_]*[A-Z0-9])\b", text))
    names |= set(re.findall(r'ENV_PREFIX \+ "([A-Z0-9_]+)"', text))
    names |= set(re.findall(r'_env_\w+\(\s*"([A-Z0-9_]+)"', text))
    return {"SPLICEPROXY_" + n for n in names}


def test_every_variable_the_code_reads_is_in_the_table():
    table = {var.name: var for var in helptext.ENVIRONMENT}
    pkg = Path(spliceproxy.__file__).parent
    read = {}
    sources = [*pkg.rglob("*.py"), REPO / "setup.py", *REPO.glob("tests/**/*.py"),
               *REPO.glob(".ci/*"), REPO / "scripts" / "install-venv"]
    for path in sources:
        if path.name == "helptext.py" or path == Path(__file__) or not path.is_file():
            continue
        for name in _names_read(path.read_text(errors="replace")):
            read.setdefault(name, path)
    missing = {name: str(path) for name, path in read.items() if name not in table}
    assert not missing, "add these to spliceproxy.helptext.ENVIRONMENT: %s" % missing
    # Every entry is read somewhere, except those marked as pending.
    unread = [n for n, v in table.items() if n not in read and not v.note]
    assert not unread, unread


def test_install_path_is_this_installed_command(proxy_path):
    r = _run(proxy_path, "install-path", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert (r.returncode, r.stdout) == (0, os.path.realpath(proxy_path) + "\n")


def test_install_path_notes_a_shim_on_path(proxy_path, tmp_path):
    # pyenv's `command -v spliceproxy` is a bash shim; install-path names the
    # real command on stdout and says on stderr that PATH has a wrapper.
    shim = tmp_path / "spliceproxy"
    shim.write_text('#!/usr/bin/env bash\nexec "%s" "$@"\n' % proxy_path)
    shim.chmod(0o755)
    r = _run(str(shim), "install-path", env={"PATH": "%s:/usr/bin:/bin" % tmp_path})
    assert (r.returncode, r.stdout) == (0, os.path.realpath(proxy_path) + "\n")
    assert "%s, a wrapper (shim)" % shim in r.stderr


def test_pytest_header_says_the_e2e_tests_start_daemons(proxy_path):
    # Collecting only: no daemon is started by this.
    env = dict(os.environ, SPLICEPROXY_E2E_PROXY=proxy_path)
    env.pop("SPLICEPROXY_E2E_REQUIRE", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "tests/e2e"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("e2e: ")]
    assert len(lines) == 1, r.stdout
    if os.geteuid() == 0 and shutil.which("dockerd") and os.path.exists("/bin/busybox"):
        assert lines[0].startswith("e2e: starts private dockerd and containerd daemons"), lines
        assert proxy_path in lines[0]
    else:
        assert lines[0].startswith("e2e: skipped, starts no daemon: "), lines
