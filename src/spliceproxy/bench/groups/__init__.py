"""The metric groups: which variants each is measured in, in which phase, and how.

Each group is a module here with a run(harness, group, variant) made of the
harness's single measurements; GROUPS is the table the harness runs them
from, importing a group's module when it runs.  A new group (e.g. the host
engine's per-port cost) is one row here and one module.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass

from spliceproxy.bench import procs


@dataclass(frozen=True)
class Group:
    """One row of the group table: how a group of metrics is measured.

    module is the group's module in this package; phase orders the groups
    (0 the throughput and latency groups, then groups that can hurt later
    ones: scale can end a proxy that runs out of descriptors, churn fills
    TIME_WAIT); variants are those it applies to; quick_loopback_only: on
    loopback only when the profile lists it in loopback_groups.
    """

    module: str
    phase: int = 0
    variants: tuple = ("external", "loopback")
    quick_loopback_only: bool = True

    def run(self, h, group: str, variant: str) -> None:
        importlib.import_module("%s.%s" % (__name__, self.module)).run(h, group, variant)


GROUPS = {
    "bulk": Group("bulk"),
    "bulkn": Group("bulk"),
    "rr": Group("rr"),
    "crr": Group("crr"),
    "udp": Group("udp"),
    "strace": Group("strace"),
    "agg": Group("agg", variants=("external",)),
    "scale": Group("scale", phase=1, quick_loopback_only=False),
    "spawn": Group("spawn", phase=2, variants=("process",)),
    "churn": Group("churn", phase=3, variants=("external",)),
    "ports": Group("ports", phase=2, variants=("process",)),
}


def each_path(h, group: str, variant: str, paths: list, measure) -> None:
    """The profile's rounds of group, one path after the other in an order
    shuffled per round: measure(name, runtime, round) records its figures; a
    path that fails a round is a note, the others are still measured."""
    rounds = h.p.rounds
    for r in range(rounds):
        for name, rt in h._order(variant, group, paths):
            h.progress("%s %s round %d/%d: %s" % (variant, group, r + 1, rounds, name))
            try:
                measure(name, rt, r)
            except OSError as exc:
                h.res.notes.append("%s %s via %s failed: %s" % (variant, group, name, exc))


def interleaved(h, group: str, variant: str, paths: list, role: str, measure,
                after=None) -> None:
    """The latency rounds of group, every path at once, exchange by exchange,
    pinned to one CPU: measure(order, round) records the round's figures,
    after(order, round) (unpinned) whatever follows it."""
    rounds = h.p.lat_rounds
    for r in range(rounds):
        order = h._order(variant, group, paths)
        h.progress("%s %s round %d/%d: %s, exchange by exchange"
                   % (variant, group, r + 1, rounds, " ".join(n for n, _ in order)))
        try:
            with pinned(h, order, role):
                measure(order, r)
        except OSError as exc:
            h.res.notes.append("%s %s round %d failed: %s" % (variant, group, r + 1, exc))
        if after is not None:
            after(order, r)


# Latency and connection rate: one CPU for the client thread, the
# container's servers and the proxies, so no hop waits for an idle vCPU
# to wake (tens of microseconds on this kind of VM, halt-polling off).
def _pin_cpu() -> int:
    return max(os.sched_getaffinity(0))


@contextlib.contextmanager
def pinned(h, order, role: str):
    cpu = _pin_cpu()
    saved = {}

    def pin(pid):
        for tid in procs.tasks(pid):
            try:
                saved.setdefault(tid, os.sched_getaffinity(tid))
                os.sched_setaffinity(tid, {cpu})
            except OSError:
                pass  # a thread that just exited

    me = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # this thread only
    try:
        for proc in h.paths.server_procs:
            pin(proc.pid)
        for _name, rt in order:
            pid = rt.pid(role)
            if pid:
                pin(pid)  # socat's per-connection children inherit it
        yield cpu
    finally:
        os.sched_setaffinity(0, me)
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
