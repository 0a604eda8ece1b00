"""What SPLICEPROXY_TRANSPARENT costs: the transparent relay against the plain
one, as same-run ratios with their spread.

    python benchmarks/transparent_cost.py [--rounds 9] [--subnet 198.18.82.0/23]
                                          [--prefix tpb-]

The benchmark's own topology (spliceproxy.bench.topology: client, host,
container namespaces) and backend servers; two host engines in the host
namespace, each started by its first stub as dockerd starts it (engine mode,
a control socket of its own), one plain and one with
SPLICEPROXY_TRANSPARENT=1, each publishing the echo and the sink.  Every
round measures both in a shuffled order, with the C load generator from the
client namespace:

- bulk: 512 MiB through one connection to the sink, GB/s;
- rr: 20000 one-byte request/responses on one connection, p50 latency;
- conn/s: 2000 rounds of connect, one-byte exchange, close.

Printed: per metric the median of the per-round ratios transparent / plain
and their minimum and maximum (and the medians of each path's figures).
Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--subnet", default="198.18.82.0/23")
    p.add_argument("--prefix", default="tpb-")
    p.add_argument("--bulk-mib", type=int, default=512)
    p.add_argument("--rr", type=int, default=20000)
    p.add_argument("--conns", type=int, default=2000)
    args = p.parse_args(argv)

    from spliceproxy.bench import topology as topo_mod
    from spliceproxy.bench.launch import proxy_argv, spawn_dockerd
    from spliceproxy.bench.loadgen import check, load

    ffi, lib = load()
    exe = os.path.join(sysconfig.get_path("scripts"), "spliceproxy")
    if not os.access(exe, os.X_OK):
        print("spliceproxy is not installed", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="tpb-")
    os.chmod(tmp, 0o700)
    topo = topo_mod.Topology("tc", subnet=args.subnet, prefix=args.prefix).setup()
    servers = None
    stubs = []
    try:
        servers = subprocess.Popen(
            ["ip", "netns", "exec", topo.container, sys.executable, "-m",
             "spliceproxy.bench.servers", topo.addr.container, "7001", "7002", "7003"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        echo, sink, _udp = (int(x) for x in servers.stdout.readline().split())
        host = topo.addr.host_ext
        ports = {}
        for i, name in enumerate(("plain", "transparent")):
            env = {k: v for k, v in os.environ.items() if not k.startswith("SPLICEPROXY_")}
            env.update({"SPLICEPROXY_ENGINE": "1",
                        "SPLICEPROXY_ENGINE_SOCKET": os.path.join(tmp, name, "engine.sock"),
                        "SPLICEPROXY_ENGINE_IDLE_EXIT": "5s",
                        "SPLICEPROXY_LOG_FILE": os.path.join(tmp, name + ".log")})
            os.mkdir(os.path.join(tmp, name), 0o700)
            if name == "transparent":
                env["SPLICEPROXY_TRANSPARENT"] = "1"
            base = 9100 + 100 * i
            for off, backend in ((0, echo), (1, sink)):
                stubs.append(spawn_dockerd(proxy_argv(exe, "tcp", "0.0.0.0", base + off,
                                                      topo.addr.container, backend),
                                           env=env, netns=topo.host))
            ports[name] = (base, base + 1)

        def bulk(port: int) -> float:
            total = args.bulk_mib << 20
            with topo_mod.in_netns(topo.client):
                s = socket.create_connection((host, port))
            with s:
                t0 = time.perf_counter()
                # Sends, half-closes and waits for the sink's close.
                check(lib.lg_bulk_send(s.fileno(), total, 1 << 17), "bulk")
                return total / (time.perf_counter() - t0) / 1e9

        def rr(port: int) -> float:
            lat = ffi.new("double[]", args.rr)
            with topo_mod.in_netns(topo.client):
                s = socket.create_connection((host, port))
            with s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                check(lib.lg_rr(s.fileno(), 200, 1, lat), "rr warmup")
                check(lib.lg_rr(s.fileno(), args.rr, 1, lat), "rr")
            return statistics.median(lat[i] for i in range(args.rr)) / 1e3

        def conns(port: int) -> float:
            lat = ffi.new("double[]", args.conns)
            with topo_mod.in_netns(topo.client):
                t0 = time.perf_counter()
                done = check(lib.lg_connect_rate(socket.AF_INET, host.encode(), port,
                                                 args.conns, lat), "connect rate")
                return done / (time.perf_counter() - t0)

        # Warm-up, and a check that the transparent path is one.
        for name in ports:
            rr(ports[name][0])
        res: dict[str, dict[str, list[float]]] = {m: {"plain": [], "transparent": []}
                                                  for m in ("bulk_GBps", "rr_p50_us", "conn_per_s")}
        for _ in range(args.rounds):
            for metric, fn, which in (("bulk_GBps", bulk, 1), ("rr_p50_us", rr, 0),
                                      ("conn_per_s", conns, 0)):
                order = list(ports)
                random.shuffle(order)
                for name in order:
                    res[metric][name].append(fn(ports[name][which]))
        out = {}
        for metric, per in res.items():
            ratios = [t / p for t, p in zip(per["transparent"], per["plain"])]
            out[metric] = {"plain_median": statistics.median(per["plain"]),
                           "transparent_median": statistics.median(per["transparent"]),
                           "ratio_median": statistics.median(ratios),
                           "ratio_min": min(ratios), "ratio_max": max(ratios),
                           "rounds": len(ratios)}
        def counters(name: str) -> dict:
            st = subprocess.run([exe, "status", "--json", "--socket",
                                 os.path.join(tmp, name, "engine.sock")],
                                capture_output=True, text=True, timeout=10, check=True)
            return json.loads(st.stdout)["engine"]["counters"]

        # Deterministic: the engine's own count of system calls per connection
        # (connect, one-byte exchange, close), over one more connection run.
        for name in ports:
            c0 = counters(name)
            conns(ports[name][0])
            c1 = counters(name)
            n = c1["tcp_accepted"] - c0["tcp_accepted"]
            out.setdefault("syscalls_per_connection", {})[name] = round(
                (c1["syscalls"] - c0["syscalls"]) / max(n, 1), 2)
        c = counters("transparent")
        out["transparent_counters"] = {k: c.get(k) for k in
                                       ("tcp_transparent", "transparent_fallbacks",
                                        "tcp_accepted")}
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for lp in stubs:
            lp.proc.terminate()
        for lp in stubs:
            lp.proc.wait(10)
        if servers is not None:
            servers.stdin.close()
            servers.wait(10)
        time.sleep(6)  # the engines' idle exit (their rules go with them)
        topo.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
