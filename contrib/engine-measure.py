#!/usr/bin/env python3
"""Measure what a published port costs in engine mode, standalone, and with docker-proxy.

    python3 contrib/engine-measure.py [--ports 100] [--docker-proxy PATH]

Every proxy is started as dockerd starts it (status pipe on fd 3, stdio on
/dev/null, default signal dispositions; with posix_spawn, about as light as
Go's os/exec) on 127.0.0.1, with a TCP backend; nothing is relayed.
"engine" is the launcher with SPLICEPROXY_ENGINE=1 (it execs the stub),
"engine-stub" the stub run directly (userland-proxy-path pointing at
spliceproxy-stub).  Prints:

* spawn -> "0\\n": from posix_spawn to the status read, per start, while the
  mappings grow to --ports; the kinds interleaved start by start (engine
  mode with the engine already running); median, quartiles, min and max;
* private memory (USS: Private_Clean + Private_Dirty of smaps_rollup) with
  --ports mappings of each kind alive at once (engine mode: half through the
  launcher, half with the stub run directly, one engine): per process, the
  engine, the sum, and each sum against docker-proxy's.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time

from spliceproxy.bench.launch import proxy_argv


class Spawned:
    """A proxy started with posix_spawn."""

    def __init__(self, pid: int, ready_s: float):
        self.pid = pid
        self.ready_s = ready_s

    def stop(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def spawn_fast(argv: list[str], env: dict) -> Spawned:
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
               (os.POSIX_SPAWN_DUP2, null, 2), (os.POSIX_SPAWN_DUP2, w, 3)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsigmask=(),
                         setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    os.close(w)
    os.close(null)
    try:
        if not select.select([r], [], [], 16.0)[0]:
            raise RuntimeError("no status within 16 s from %s" % argv[0])
        status = os.read(r, 2)
        ready = time.perf_counter() - t0
    finally:
        os.close(r)
    if status != b"0\n":
        raise RuntimeError("%s failed: %r" % (argv[0], status))
    return Spawned(pid, ready)


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
    ap.add_argument("--docker-proxy", default=shutil.which("docker-proxy") or
                    ("/usr/sbin/docker-proxy" if os.path.exists("/usr/sbin/docker-proxy")
                     else None))
    args = ap.parse_args()
    # The command of the environment this runs in, else the one on PATH.
    launcher = os.path.join(os.path.dirname(sys.executable), "spliceproxy")
    if not os.access(launcher, os.X_OK):
        launcher = shutil.which("spliceproxy") or launcher
    stub = os.path.join(os.path.dirname(launcher), "spliceproxy-stub")
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
    kinds = {"engine": (launcher, env_engine), "engine-stub": (stub, env_engine),
             "standalone": (launcher, env_alone)}
    if args.docker_proxy:
        kinds["docker-proxy"] = (args.docker_proxy, base)
    procs: dict[str, list] = {k: [] for k in kinds}
    engine_pid = None
    try:
        # The engine running already: one mapping, counted in the memory.
        procs["engine"].append(spawn_fast(proxy_argv(launcher, "tcp", "127.0.0.1",
                                                     free_port(), "127.0.0.1", bport),
                                          env_engine))
        with open(os.path.join(tmp, "engine.lock")) as f:
            engine_pid = int(f.read())
        # Spawn times while the mappings grow (a container publishing a
        # range), the kinds interleaved start by start.
        # Engine mode gets --ports mappings in all, half through the launcher
        # and half with the stub run directly; the others --ports each.
        limit = {k: args.ports for k in kinds}
        limit["engine-stub"] = args.ports // 2
        limit["engine"] = args.ports - limit["engine-stub"]
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.ports):
            for kind, (path, env) in kinds.items():
                if len(procs[kind]) >= limit[kind]:
                    continue
                lp = spawn_fast(proxy_argv(path, "tcp", "127.0.0.1", free_port(),
                                           "127.0.0.1", bport), env)
                times[kind].append(lp.ready_s * 1000)
                procs[kind].append(lp)
        print("spawn -> 0\\n (ms):")
        for kind, xs in times.items():
            print("  %-13s %s" % (kind, quartiles(xs)))
        if "docker-proxy" in times:
            dp = statistics.median(times["docker-proxy"])
            for kind in times:
                if kind == "docker-proxy":
                    continue
                # Same-round ratios: the starts of one round are back to
                # back, so a busy neighbour slows both alike.
                pairs = [a / b for a, b in zip(times[kind], times["docker-proxy"])]
                q = statistics.quantiles(pairs, n=4)
                print("  %s / docker-proxy: medians %.2fx; same-round ratios median %.2fx "
                      "(q1 %.2f, q3 %.2f)" % (kind, statistics.median(times[kind]) / dp,
                                             q[1], q[0], q[2]))

        time.sleep(0.5)
        print("private memory (USS):")
        per_kind = {k: [uss_kib(lp.pid) for lp in procs[k]] for k in kinds}
        for kind, each in per_kind.items():
            print("  %-13s %d processes, each median %d KiB (min %d, max %d), total %.2f MiB"
                  % (kind, len(each), statistics.median(each), min(each), max(each),
                     sum(each) / 1024))
        eng = uss_kib(engine_pid)
        stubs = per_kind["engine"] + per_kind["engine-stub"]
        n = len(stubs)
        total = sum(stubs) + eng
        print("  engine mode: %d mappings = stubs %.2f MiB + engine %.2f MiB = %.2f MiB, "
              "%.1f KiB per mapping" % (n, sum(stubs) / 1024, eng / 1024, total / 1024,
                                        total / n))
        if "docker-proxy" in per_kind:
            dp = statistics.mean(per_kind["docker-proxy"])
            print("  per mapping against docker-proxy's %.1f KiB: engine mode %.3fx, "
                  "standalone %.3fx" % (dp, total / n / dp,
                                        statistics.mean(per_kind["standalone"]) / dp))
            print("  a stub against a docker-proxy (medians): %.3fx"
                  % (statistics.median(stubs) / statistics.median(per_kind["docker-proxy"])))
    finally:
        for lps in procs.values():
            for lp in lps:
                lp.stop(signal.SIGINT)
        for lps in procs.values():
            for lp in lps:
                lp.wait(5)
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
