"""The leak guard (tests/support/guard.py) sees what a test leaves behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import guard

TESTS = Path(__file__).resolve().parents[1]


def test_a_descriptor_left_open_is_reported():
    before = guard.snapshot()
    r, w = os.pipe()
    try:
        problems = guard.check(before, settle=0.2)
        assert any(p.startswith("descriptor %d -> pipe:" % r) for p in problems), problems
        assert any(p.startswith("descriptor %d -> pipe:" % w) for p in problems), problems
    finally:
        os.close(r)
        os.close(w)
    assert guard.check(before, settle=0.2) == []


def test_a_child_left_running_is_reported_and_killed():
    before = guard.snapshot()
    child = subprocess.Popen(["sleep", "60"])
    problems = guard.check(before, settle=0.2)
    assert problems == ["child process %d: sleep 60" % child.pid]
    assert child.wait(5) == -9 or child.returncode is not None
    assert guard.check(before, settle=0.2) == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and ip (network namespaces)")
def test_a_namespace_of_this_run_left_behind_is_reported_and_deleted():
    mine = "ly-guard-%d" % os.getpid()
    other = "ly-guard-other-%d" % (os.getpid() + 4194304)  # no pid of ours
    before = guard.snapshot()
    subprocess.run(["ip", "netns", "add", mine], check=True, timeout=10)
    subprocess.run(["ip", "netns", "add", other], check=True, timeout=10)
    try:
        assert guard.check(before, settle=0.2) == ["network namespace %s" % mine]
        assert mine not in os.listdir(guard.NETNS_DIR)
    finally:
        subprocess.run(["ip", "netns", "delete", other], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "delete", mine], capture_output=True, timeout=10)


def test_the_autouse_fixture_fails_a_leaking_test(tmp_path):
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent("""
        import os

        def test_clean():
            os.close(os.dup(0))

        def test_leaks():
            os.pipe()
    """))
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "conftest", "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    # The leaking test passes its call and errors at teardown: the run fails.
    assert "2 passed, 1 error" in r.stdout, r.stdout
    assert "ERROR at teardown of test_leaks" in r.stdout and "the test leaked" in r.stdout


def test_an_engine_the_test_did_not_choose_is_reported_and_killed():
    """A proxy started with no mode of the test's goes to the default,
    engine mode, on the session's stray socket (never root's): the guard
    reports the engine it started there and ends it."""
    from support import servers as srv
    from support.engine import engine_processes

    stray = guard.stray_socket()
    assert stray and os.environ["SPLICEPROXY_ENGINE_SOCKET"] == stray
    env = {k: v for k, v in os.environ.items() if k != "SPLICEPROXY_ENGINE"}
    before = guard.snapshot()
    with srv.EchoServer() as echo:
        port = srv.free_port()
        lp = srv.spawn(srv.proxy_argv(srv.installed_proxy_path(), "tcp", "127.0.0.1", port,
                                      "127.0.0.1", echo.port), env=env, timeout=15.0)
        srv.echo_roundtrip("127.0.0.1", port, b"by accident")
        assert lp.stop() == 0
    engines = engine_processes(stray)
    assert len(engines) == 1
    problems = guard.check(before, settle=0.2)
    assert len(problems) == 1 and problems[0].startswith(
        "an engine the test did not choose (pid %d, socket %s)" % (engines[0], stray)), problems
    assert srv.wait_for(lambda: engine_processes(stray) == [], 5.0)
    assert guard.check(before, settle=0.2) == []
