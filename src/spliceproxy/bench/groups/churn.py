"""churn: sequential short connections in one long run (moby #47537)."""

from __future__ import annotations

import os
import socket
import time

from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod


def run(h, group: str, variant: str) -> None:
    """Run once per path, after everything else: a proxy that leaves its
    backend sockets in TIME_WAIT exhausts the host namespace's ports
    towards its container port (each path has its own, so only its own
    later figures would suffer).  churn_hold compares the rate of the last
    tenth of the run with the first; churn_time_wait counts what it left
    behind.
    """
    if variant != "external" or h.topo is None:
        return
    n = h.p.churn_count
    wanted = ("native", "iptables", "spliceproxy", "docker-proxy")
    if h.p.name == "quick" and "docker-proxy" in h.paths.runtimes:
        # Past ~28k connections docker-proxy falls to a few hundred per
        # second: that alone would take longer than the quick profile.
        wanted = wanted[:3]
        h.res.notes.append("quick profile: docker-proxy's churn is measured in the "
                           "full profile only (it collapses after ~28k connections)")
    for name, rt in h._paths_for(variant, "echo"):
        if name not in wanted or name in h.dead:
            continue
        ep, ns = h._where(rt, variant)
        h.progress("%s churn: %s, %d connections" % (variant, name, n))
        lat = h.ffi.new("double[]", n)
        tw_before = procs.time_wait_count(h.paths.host_ns)
        t0 = time.perf_counter()
        with topo_mod.in_netns(ns):
            done = h.lib.lg_connect_rate(socket.AF_INET, ep.echo[0].encode(), ep.echo[1], n,
                                         lat)
        elapsed = time.perf_counter() - t0
        if done <= 0:
            h.res.notes.append("churn via %s failed at once: %s" % (name, os.strerror(-done)))
            h.res.add(variant, "churn_done_pct", name, 0.0)
            continue
        tenth = max(1, done // 10)
        first = sum(lat[i] for i in range(tenth)) / 1e9
        last = sum(lat[i] for i in range(done - tenth, done)) / 1e9
        h.res.add(variant, "churn_rate", name, done / elapsed)
        h.res.add(variant, "churn_hold", name, first / last if last else 0.0)
        h.res.add(variant, "churn_done_pct", name, 100.0 * done / n)
        if done < n:
            h.res.notes.append("churn via %s stopped after %d of %d connections"
                               % (name, done, n))
        # Only what this run added: earlier groups leave some of their own.
        h.res.add(variant, "churn_time_wait", name,
                  max(0, procs.time_wait_count(h.paths.host_ns) - tw_before))
