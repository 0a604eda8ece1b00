"""Shared fixtures: where the installed proxy is, and hypothesis profiles."""

from __future__ import annotations

import os
import shutil
import sysconfig

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    settings = None

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


def installed_proxy_path() -> str:
    """Absolute path of the installed `spliceproxy` script (not a shell shim)."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "spliceproxy")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("spliceproxy")
    if not found:
        pytest.skip("spliceproxy is not installed (pip install .)")
    return os.path.realpath(found)


@pytest.fixture(scope="session")
def proxy_path() -> str:
    return installed_proxy_path()
