#!/usr/bin/env python3
"""Measure what a published port costs in engine mode, standalone, and with docker-proxy.

    python3 contrib/engine-measure.py [--ports 100] [--rounds 30] [--docker-proxy PATH]

Every proxy is started as dockerd starts it (spliceproxy.bench.launch.spawn:
status pipe on fd 3, stdio on /dev/null) on 127.0.0.1, with a TCP echo
backend; nothing is relayed.  Prints:

* spawn -> "0\\n": from Popen to the status read, per start; the three kinds
  interleaved round by round (engine mode with the engine already running);
  median, quartiles, min and max;
* private memory (USS: Private_Clean + Private_Dirty of smaps_rollup) with
  --ports mappings of each kind alive at once: per stub, the engine, the
  sum; per standalone proxy and the sum; per docker-proxy and the sum.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from spliceproxy.bench.launch import proxy_argv, spawn


def uss_kib(pid: int) -> int:
    total = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quartiles(xs: list[float]) -> str:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return "median %.2f  q1 %.2f  q3 %.2f  min %.2f  max %.2f  (n=%d)" % (
        q[1], q[0], q[2], xs[0], xs[-1], len(xs))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--docker-proxy", default=shutil.which("docker-proxy") or
                    ("/usr/sbin/docker-proxy" if os.path.exists("/usr/sbin/docker-proxy")
                     else None))
    args = ap.parse_args()
    launcher = shutil.which("spliceproxy") or os.path.join(os.path.dirname(sys.executable),
                                                           "spliceproxy")
    tmp = tempfile.mkdtemp(prefix="en-m-")
    os.chmod(tmp, 0o700)
    sock_path = os.path.join(tmp, "engine.sock")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPLICEPROXY_")}
    env_engine = dict(base, SPLICEPROXY_ENGINE="1", SPLICEPROXY_ENGINE_SOCKET=sock_path)
    env_alone = dict(base, SPLICEPROXY_ENGINE="0")
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(16)
    bport = backend.getsockname()[1]
    kinds = {"engine": (launcher, env_engine), "standalone": (launcher, env_alone)}
    if args.docker_proxy:
        kinds["docker-proxy"] = (args.docker_proxy, base)
    procs: dict[str, list] = {k: [] for k in kinds}
    engine_pid = None
    try:
        # The engine running already: one mapping that stays.
        procs["engine"].append(spawn(proxy_argv(launcher, "tcp", "127.0.0.1", free_port(),
                                                "127.0.0.1", bport), env=env_engine))
        with open(os.path.join(tmp, "engine.lock")) as f:
            engine_pid = int(f.read())
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, (path, env) in kinds.items():
                lp = spawn(proxy_argv(path, "tcp", "127.0.0.1", free_port(), "127.0.0.1",
                                      bport), env=env)
                times[kind].append(lp.ready_s * 1000)
                lp.stop(signal.SIGINT if kind != "engine" else signal.SIGTERM)
        print("spawn -> 0\\n (ms):")
        for kind, xs in times.items():
            print("  %-13s %s" % (kind, quartiles(xs)))
        for kind in times:
            if kind != "docker-proxy" and "docker-proxy" in times:
                print("  %s / docker-proxy (medians): %.2fx" % (
                    kind, statistics.median(times[kind]) / statistics.median(
                        times["docker-proxy"])))

        for kind, (path, env) in kinds.items():
            while len(procs[kind]) < args.ports:
                procs[kind].append(spawn(proxy_argv(path, "tcp", "127.0.0.1", free_port(),
                                                    "127.0.0.1", bport), env=env))
        time.sleep(0.5)
        print("private memory (USS) with %d mappings of each kind alive:" % args.ports)
        sums = {}
        for kind in kinds:
            each = [uss_kib(lp.pid) for lp in procs[kind]]
            total = sum(each)
            extra = ""
            if kind == "engine":
                eng = uss_kib(engine_pid)
                total += eng
                extra = "  + engine %d KiB" % eng
            sums[kind] = total
            print("  %-13s per process median %d KiB (min %d, max %d)%s  total %.2f MiB"
                  % (kind, statistics.median(each), min(each), max(each), extra,
                     total / 1024))
        if "docker-proxy" in sums:
            for kind in ("engine", "standalone"):
                print("  %s total / docker-proxy total: %.3fx"
                      % (kind, sums[kind] / sums["docker-proxy"]))
    finally:
        for kind, lps in procs.items():
            for lp in lps:
                if lp.proc.poll() is None:
                    lp.proc.send_signal(signal.SIGTERM if kind == "engine" else signal.SIGINT)
            for lp in lps:
                try:
                    lp.proc.wait(5)
                except subprocess.TimeoutExpired:
                    lp.proc.kill()
                    lp.proc.wait()
        if engine_pid:
            try:
                os.kill(engine_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        backend.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
