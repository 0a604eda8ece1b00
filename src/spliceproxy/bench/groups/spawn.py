"""spawn: spawn-to-ready and idle RSS of a fresh proxy, against a bare interpreter."""

from __future__ import annotations

import sys
import time

from spliceproxy.bench import procs
from spliceproxy.bench.metrics import BARE

# The bare interpreter: binds, reports ready on the status pipe, waits.
BARE_SRC = ("import os,socket\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\n"
            "os.write(3,b'0\\n')\nimport select\nselect.select([], [], [])\n")


def run(h, group: str, variant: str) -> None:
    cands = []
    if h.sp_exe and "spliceproxy" in h.paths.runtimes:
        cands.append(("spliceproxy", h.sp_exe))
    if h.dp_exe and "docker-proxy" in h.paths.runtimes:
        cands.append(("docker-proxy", h.dp_exe))
    if not cands:
        return
    cands.append((BARE, None))
    port = 9000
    for i in range(h.p.spawns):
        order = list(cands)
        h.rng.shuffle(order)
        h.res.orders.setdefault("process:spawn", []).append([n for n, _e in order])
        for name, exe in order:
            h.progress("spawn %d/%d: %s" % (i + 1, h.p.spawns, name))
            port += 1
            if exe is None:
                argv = [sys.executable, "-I", "-S", "-c", BARE_SRC]
            else:
                argv = h.paths._argv(exe, port)
            lp = h._spawn_measured(argv)
            try:
                time.sleep(0.05)
                h.res.add("process", "spawn_ms", name, lp.ready_s * 1e3, i)
                h.res.add("process", "idle_rss_mib", name, procs.rss_bytes(lp.pid) / 2**20, i)
            finally:
                lp.stop()
