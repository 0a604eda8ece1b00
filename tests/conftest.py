"""Shared fixtures: the support package, the leak guard, where the installed
proxy is, and the hypothesis profiles."""

from __future__ import annotations

import os
import sys

import pytest

# The tests import their shared code as the package `support` (tests/support/).
# With --import-mode=importlib pytest puts no test directory on sys.path, and
# the package under test must come from the installed copy, so only tests/
# itself is added: it holds no module of the product.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support import guard  # noqa: E402 - needs the path set above
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


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves descriptors, child processes or network
    namespaces behind (support/guard.py says what counts)."""
    before = guard.snapshot()
    yield
    problems = guard.check(before)
    if problems:
        pytest.fail("the test leaked:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def proxy_path() -> str:
    return installed_proxy_path()
