"""An interrupted run of the dockerd suite does not break the next one.

A run killed part-way (a cancelled CI job, a Ctrl-C that is not waited for)
gets no teardown: its daemons, its namespace ``<prefix><pid>``, its
directories are left.  Its daemons die with it (the parent-death signal);
the next run removes the rest (namespaces of the suite's shape whose creator
is gone, as the bench does) and starts.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import dockerd as dk

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = os.environ.get("SPLICEPROXY_E2E_NETNS_PREFIX") or "spe2e-"
# One scenario, in the one mode and daemon every host has.
SCENARIO = "tests/e2e/test_dockerd.py::test_http_through_ipv4_and_ipv6[standalone-20.10]"


def _names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(dk.NETNS_DIR) if n.startswith(prefix)) \
        if dk.NETNS_DIR.is_dir() else []


def _child_run(prefix: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, SPLICEPROXY_E2E_NETNS_PREFIX=prefix, SPLICEPROXY_E2E_REQUIRE="1")
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                             SCENARIO], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.1)


def test_a_killed_run_does_not_stop_the_next_one():
    dk.require_prerequisites()
    prefix = f"{PREFIX}k-"
    assert not _names(prefix), f"namespaces of {prefix!r} exist before the test"
    run = _child_run(prefix)
    try:
        name = f"{prefix}{run.pid}"
        # Part-way: its daemon up and serving a published port.
        ns = dk.Netns(name)
        _wait(lambda: ns.path.exists() and [p for p in ns.ps() if "-host-port" in p.args],
              120.0, f"proxy in {name}")
        daemons = [p for p in ns.ps() if p.comm in ("dockerd", "containerd")]
        assert len(daemons) == 2, "\n".join(map(str, ns.ps()))
    finally:
        run.kill()
        out = run.communicate(timeout=30)[0]
    # Its daemons go with it; its namespace and directories stay.
    left = dk.wait_gone([p.pid for p in daemons], 30.0)
    assert not left, f"daemons outlived the killed run: {left}\n{out}"
    assert _names(prefix) == [name], _names(prefix)
    assert glob.glob(f"/tmp/{name}-*")

    again = _child_run(prefix)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, f"the next run failed:\n{out}"
    assert f"removed what dead runs left behind: {name}" in out, out
    assert not _names(prefix), _names(prefix)
    assert not glob.glob(f"/tmp/{name}-*"), glob.glob(f"/tmp/{name}-*")


def test_only_a_dead_runs_namespaces_are_removed():
    """<prefix><pid>[-b] of a dead pid goes; a live creator's, another shape's stay."""
    dk.require_prerequisites()
    prefix = f"{PREFIX}s-"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    names = {"dead": f"{prefix}{dead.pid}", "dead_b": f"{prefix}{dead.pid}-b",
             "live": f"{prefix}{live.pid}", "other": f"{prefix}{dead.pid}-x"}
    try:
        for n in names.values():
            subprocess.run(["ip", "netns", "add", n], check=True, capture_output=True, timeout=10)
        removed = dk.clean_stale(prefix)
        assert sorted(removed) == sorted([names["dead"], names["dead_b"]]), removed
        assert _names(prefix) == sorted([names["live"], names["other"]])
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
        for n in names.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)
    assert not _names(prefix)
