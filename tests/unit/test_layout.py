"""The product and the benchmark harness are separate: the proxy never
loads the harness, and the harness is only reached through `bench`."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys

import spliceproxy

PRODUCT = sorted(m.name for m in pkgutil.iter_modules(spliceproxy.__path__)
                 if m.name != "bench" and m.name != "__main__")


def test_no_module_of_the_product_loads_the_bench_harness():
    code = ("import sys\n"
            "for name in %r:\n"
            "    __import__('spliceproxy.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('spliceproxy.bench')))\n"
            % PRODUCT)
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert {"process", "proxy", "settings", "goflags", "_engine"} <= set(PRODUCT)


def test_reading_or_gating_a_result_loads_no_measuring_code():
    """report and gate need the metric table and the results only: no harness,
    load generator, topology or process handling behind `bench gate`."""
    code = ("import sys\n"
            "import spliceproxy.bench.gate, spliceproxy.bench.report\n"
            "print(sorted(m for m in sys.modules if m.startswith('spliceproxy.bench')))\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert ast.literal_eval(r.stdout) == ["spliceproxy.bench", "spliceproxy.bench.gate",
                              "spliceproxy.bench.metrics", "spliceproxy.bench.report",
                              "spliceproxy.bench.results"]
