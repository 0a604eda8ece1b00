"""bulk and bulkn: TCP throughput, proxy CPU and system calls per GB, one path at a time."""

from __future__ import annotations

from spliceproxy.bench.groups import each_path


def run(h, group: str, variant: str) -> None:
    paths = list(h._paths_for(variant, "sink"))
    if not paths:
        return
    add = h.res.add

    def bulk(name, rt, r):
        o = h.bulk_once(rt, variant, 1, h.p.bulk_bytes)
        add(variant, "bulk_1", name, o["gbps"], r)
        add(variant, "cpu_per_gb", name, o.get("cpu_per_gb"), r)
        add(variant, "syscalls_per_gib", name, o.get("syscalls_per_gib"), r)

    def bulkn(name, rt, r):
        o = h.bulk_once(rt, variant, h.p.streams, h.p.stream_bytes)
        add(variant, "bulk_n", name, o["gbps"], r)
        add(variant, "cpu_per_gb_n", name, o.get("cpu_per_gb"), r)

    each_path(h, group, variant, paths, bulkn if group == "bulkn" else bulk)
