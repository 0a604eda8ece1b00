"""Shared fixtures: the support package, the leak guard, where the installed
proxy is and in which mode it runs, and the hypothesis profiles."""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

# The tests import their shared code as the package `support` (tests/support/).
# With --import-mode=importlib pytest puts no test directory on sys.path, and
# the package under test must come from the installed copy, so only tests/
# itself is added: it holds no module of the product.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support import engine as engine_support  # noqa: E402 - needs the path set above
from support import guard  # noqa: E402
from support.servers import installed_proxy_path  # noqa: E402

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    settings = None

# The one knob for the expensive run: HYPOTHESIS_PROFILE=long.
if settings is not None:
    settings.register_profile(
        "fast", max_examples=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    settings.register_profile(
        "long", max_examples=2000, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


# --------------------------------------------------------------------------
# The two modes.  Engine mode is the product's default, so every suite that
# starts proxies runs twice: "standalone" (SPLICEPROXY_ENGINE=0, the proxy
# serves its port itself) and "engine" (SPLICEPROXY_ENGINE=1 and the
# session's engine, see _session_engine).  Whatever a test starts inherits
# the mode from os.environ, set for the test by the proxy_path fixture that
# every proxy-starting test takes.
MODES = ("standalone", "engine")

# Modules that are about one mode already, and set it themselves.
_ONE_MODE = re.compile(
    r"^test_(engine_mode|engine_fastpath|engine_metrics|engine_netns|engine_races|fastpath|"
    r"fastpath_setting|launcher|rules_c_python|stub_fuzz|transparent)$")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standalone_only(reason): a property of the standalone proxy process "
        "itself (its uid, capabilities, descriptors, ...): run in that mode only; the reason "
        "names the engine-mode counterpart test")
    # A proxy started with no socket of its own would reach root's engine
    # (/run/spliceproxy): in the tests it reaches this one instead, which
    # nothing serves; the leak guard fails any test that starts an engine
    # here or under root's socket.
    guard.set_stray_socket(os.path.join(engine_support.private_dir("sp-stray-"),
                                        "engine.sock"))
    os.environ["SPLICEPROXY_ENGINE_SOCKET"] = guard.stray_socket()


def pytest_unconfigure(config):
    stray = guard.stray_socket()
    if stray:
        engine_support.kill_engines(stray)
        shutil.rmtree(os.path.dirname(stray), ignore_errors=True)


def pytest_generate_tests(metafunc):
    if "proxy_path" not in metafunc.fixturenames:
        return
    if _ONE_MODE.match(metafunc.module.__name__.rpartition(".")[2]):
        return
    # Module scope: a module's tests run in one mode, then in the other, and
    # a module-scoped fixture that starts a proxy (test_tcp_fuzz's) may take
    # proxy_path.
    metafunc.parametrize("proxy_path", MODES, indirect=True, scope="module")


def pytest_collection_modifyitems(config, items):
    """The engine-mode case of a standalone_only test (the whole test, or one
    of its parameters: pytest.param(..., marks=...)) is not collected."""
    keep, dropped = [], []
    for item in items:
        only = item.get_closest_marker("standalone_only")
        if only is not None and not (only.args or only.kwargs.get("reason")):
            raise pytest.UsageError("%s: standalone_only needs a reason naming the "
                                    "engine-mode counterpart test" % item.nodeid)
        callspec = getattr(item, "callspec", None)
        mode = callspec.params.get("proxy_path") if callspec is not None else None
        (dropped if only is not None and mode == "engine" else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def _session_engine():
    """One host engine for every engine-mode test of the session, as the
    first port of a dockerd starts one and the others share it.  Its socket
    is in a private 0700 directory; at the end it is stopped and checked to
    be gone (support/engine.py)."""
    host = engine_support.SharedEngine(installed_proxy_path())
    yield host
    host.close()


@pytest.fixture(scope="module")
def proxy_path(request) -> str:
    """The installed command, and the mode the module's tests run in (its
    parameter; none for the one-mode modules, which choose themselves)."""
    path = installed_proxy_path()
    mode = getattr(request, "param", None)
    with pytest.MonkeyPatch.context() as mp:
        if mode == "engine":
            shared = request.getfixturevalue("_session_engine")
            for name, value in shared.mode_env().items():
                mp.setenv(name, value)
        elif mode == "standalone":
            mp.setenv("SPLICEPROXY_ENGINE", "0")
        yield path


@pytest.fixture(autouse=True)
def _engine_mode_checks(request):
    """In the engine-mode pass, the leak guard also checks the session's
    engine after the test (no mapping of the test's left in it)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("proxy_path") == "engine":
        guard.expect_engine(request.getfixturevalue("_session_engine"))


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves descriptors, child processes or network
    namespaces behind, or starts an engine it did not choose, or leaves a
    mapping in the session's engine (support/guard.py says what counts)."""
    before = guard.snapshot()
    yield
    problems = guard.check(before)
    if problems:
        pytest.fail("the test leaked:\n  " + "\n  ".join(problems), pytrace=False)
