"""Access to the compiled load generator (spliceproxy.bench._loadgen).

It is not part of the product's build (the proxy needs no cffi): the
benchmark compiles it at its first use, with the bench extra's cffi, into a
per-user cache directory, and again only when its source changes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys

_mod = None


def load():
    """Return (ffi, lib) of the load generator, compiling it if needed."""
    global _mod
    if _mod is not None:
        return _mod.ffi, _mod.lib
    try:
        _mod = importlib.import_module("spliceproxy.bench._loadgen")
    except ImportError:
        _mod = _build_into_cache()
    return _mod.ffi, _mod.lib


def _build_into_cache():
    from spliceproxy.bench import _loadgen_build

    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "spliceproxy-bench", "py%d%d" % sys.version_info[:2])
    os.makedirs(cache, exist_ok=True)
    tag = hashlib.sha256((_loadgen_build.SOURCE + _loadgen_build.CDEF).encode()).hexdigest()
    stamp = os.path.join(cache, "stamp")
    built = None
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == tag:
                built = _find_so(cache)
    if built is None:
        built = _loadgen_build.ffibuilder.compile(tmpdir=cache, verbose=False)
        with open(stamp, "w") as f:
            f.write(tag)
    spec = importlib.util.spec_from_file_location("spliceproxy.bench._loadgen", built)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["spliceproxy.bench._loadgen"] = mod
    return mod


def _find_so(cache: str):
    for root, _dirs, files in os.walk(cache):
        for name in files:
            if name.startswith("_loadgen") and name.endswith(".so"):
                return os.path.join(root, name)
    return None


def check(rc: int, what: str) -> int:
    """Turn a -errno result into OSError."""
    if rc < 0:
        raise OSError(-rc, "%s: %s" % (what, os.strerror(-rc)))
    return rc
