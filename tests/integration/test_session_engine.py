"""The test session's engine dies with the session that started it.

support.engine.SharedEngine serves the engine-mode pass of the suites and
never exits idle.  A session that is killed (a cancelled CI job) never
reaches its close(): the engine must go anyway, with the directory of its
socket.  Here a child process plays the session: it starts the engine as the
suites do, reports it, and is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from support import engine as engine_support
from support import servers as srv

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SESSION = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from support.engine import SharedEngine
e = SharedEngine(sys.argv[2])
print(json.dumps({"pid": e.proc.pid, "sock": e.sock, "dir": e.dir,
                  "watcher": e.watcher.pid}), flush=True)
time.sleep(600)
"""


def _session() -> tuple[subprocess.Popen, dict]:
    child = subprocess.Popen([sys.executable, "-c", SESSION, TESTS, srv.installed_proxy_path()],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line = child.stdout.readline()
    assert line, "the session did not start its engine"
    return child, json.loads(line)


def test_engine_goes_when_the_session_is_killed():
    child, info = _session()
    try:
        assert engine_support.alive(info["pid"])
        assert engine_support.engine_processes(info["sock"]) == [info["pid"]]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        gone = srv.wait_for(lambda: not engine_support.engine_processes(info["sock"]), 10.0)
        assert gone, f"the engine outlived its session: {info}"
        assert srv.wait_for(lambda: not os.path.exists(info["dir"]), 5.0), info
        assert srv.wait_for(lambda: not engine_support.alive(info["watcher"]), 5.0), info
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        engine_support.kill_engines(info["sock"], {info["pid"]})


def test_engine_a_stub_restarted_goes_too():
    """An engine started by a stub after the first was killed (the suites'
    kill-the-engine tests) is the socket's too, and goes as well."""
    child, info = _session()
    stub = None
    try:
        os.kill(info["pid"], signal.SIGKILL)
        assert srv.wait_for(lambda: not engine_support.alive(info["pid"]), 5.0)
        env = dict(os.environ, SPLICEPROXY_ENGINE="1", SPLICEPROXY_ENGINE_SOCKET=info["sock"],
                   SPLICEPROXY_ENGINE_IDLE_EXIT="never")
        backend = srv.free_port("127.0.0.1")
        stub = srv.spawn(srv.proxy_argv(srv.installed_proxy_path(), "tcp", "127.0.0.1",
                                        srv.free_port("127.0.0.1"), "127.0.0.1", backend),
                         env=env, timeout=15.0)
        restarted = engine_support.engine_processes(info["sock"])
        assert restarted and info["pid"] not in restarted, restarted
        stub.proc.kill()
        stub.proc.wait(5)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        gone = srv.wait_for(lambda: not engine_support.engine_processes(info["sock"]), 10.0)
        assert gone, f"the restarted engine outlived the session: {restarted}"
    finally:
        if stub is not None and stub.proc.poll() is None:
            stub.proc.kill()
            stub.proc.wait(5)
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        engine_support.kill_engines(info["sock"])
