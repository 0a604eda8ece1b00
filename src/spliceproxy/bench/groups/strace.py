"""strace: system calls per GiB and per connection counted from outside (strace -c)."""

from __future__ import annotations

import shutil

from spliceproxy.bench import procs
from spliceproxy.bench.metrics import GIB


def run(h, group: str, variant: str) -> None:
    """External syscall counts (strace -c -f -p) per userland path, in shuffled rounds.

    Per connection the count is fixed (28.03 for spliceproxy in every
    run); per GiB it depends on how much each call moves, which strace's
    own slowdown changes: one transfer per run ranged 2.7k-40k for
    spliceproxy, so it is a sample, measured in rounds like a timing.
    """
    if not shutil.which("strace"):
        h.res.notes.append("strace not installed: no external syscall counts")
        return
    paths = [(name, rt) for name, rt in h._paths_for(variant, "sink")
             if rt.pid("sink") is not None and not rt.tree]
    for r in range(h.p.strace_rounds):
        for name, rt in h._order(variant, "strace", paths):
            h.progress("%s strace round %d/%d: %s" % (variant, r + 1, h.p.strace_rounds, name))
            try:
                with procs.StraceCount(rt.pid("sink")) as sc:
                    h.bulk_once(rt, variant, 1, h.p.strace_bytes)
                if sc.total is not None:
                    h.res.add(variant, "strace_syscalls_per_gib", name,
                              sc.total / (h.p.strace_bytes / GIB), r)
                with procs.StraceCount(rt.pid("echo")) as sc:
                    o = h.crr_once(rt, variant, h.p.strace_conns)
                if sc.total is not None and o["rate"]:
                    h.res.add(variant, "strace_syscalls_per_conn", name,
                              sc.total / h.p.strace_conns, r)
            except (OSError, RuntimeError) as exc:
                h.res.notes.append("strace via %s failed: %s" % (name, exc))
