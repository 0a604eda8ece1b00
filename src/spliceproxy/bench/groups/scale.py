"""scale: many idle connections at once; served share, RSS, fds and threads per connection."""

from __future__ import annotations

import os
import resource
import socket
import time

from spliceproxy.bench import procs
from spliceproxy.bench import topology as topo_mod


def run(h, group: str, variant: str) -> None:
    # A proxy needs at least two fds per connection; the hard fd limit of
    # the machine caps how many one process can hold.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    n = min(h.p.scale_conns, (limit - 256) // 2)
    if n < h.p.scale_conns:
        h.res.notes.append("scale: %d connections (hard fd limit %d)" % (n, limit))
    for name, rt in h._paths_for(variant, "echo"):
        pid = rt.pid("echo")
        if pid is None or rt.tree or name in h.dead:
            continue
        m = min(n, h.paths.haproxy_maxconn - 50) if name == "haproxy" else n
        h.progress("%s scale: %d connections via %s" % (variant, m, name))
        ep, ns = h._where(rt, variant)
        rss0, fd0 = procs.rss_bytes(pid), procs.fd_count(pid)
        fds = h.ffi.new("int[]", m)
        with topo_mod.in_netns(ns):
            got = h.lib.lg_open_many(socket.AF_INET, ep.echo[0].encode(), ep.echo[1], m, fds)
        try:
            if got < 0:
                h.res.notes.append("scale via %s: %s" % (name, os.strerror(-got)))
                continue
            time.sleep(0.2)
            h.res.add(variant, "scale_served_pct", name, 100.0 * got / m)
            if not procs.alive(pid):
                # docker-proxy needs about six descriptors per connection
                # and exits on EMFILE (moby #6402).
                h.res.notes.append(
                    "scale: %s exited after serving %d of %d connections (descriptor limit?);"
                    " it is not measured further" % (name, got, m))
                h.dead.add(name)
                continue
            rss1, fd1 = procs.rss_bytes(pid), procs.fd_count(pid)
            h.res.add(variant, "rss_per_conn_kib", name, (rss1 - rss0) / 1024 / m)
            h.res.add(variant, "fds_per_conn", name, (fd1 - fd0) / m)
            h.res.add(variant, "threads", name, procs.thread_count(pid))
        finally:
            if got >= 0:  # on -errno the generator already closed them
                h.lib.lg_close_many(fds, m)
        time.sleep(0.3)
