#!/usr/bin/env python3
"""A container publishing a 100-port range under a real dockerd: spliceproxy's
engine mode against docker-proxy, in the same run.

    python3 contrib/dockerd-ports-measure.py [--rounds 5] [--ports 100]
        [--subnet 198.18.224.0/20] [--netns-prefix po-] [--docker-proxy PATH]

As root, with what tests/e2e needs (dockerd, containerd, busybox-static).
Starts six private daemons at once (tests/e2e/conftest.py's Daemon: own
data-root, socket, network namespace): docker-proxy, spliceproxy with
SPLICEPROXY_ENGINE=1 ("engine": the installed command, a C stub per port) and
spliceproxy with SPLICEPROXY_ENGINE=0 ("standalone": one Python process per
port, for the per-port isolation some want), each with default iptables and
with --iptables=false
(BENCHMARKING.md: with iptables most of a range's start is dockerd's own
work).  Each round, in an order shuffled per round, every daemon runs
`docker run -d -p 127.0.0.1:A-B:C-D` and then `docker rm -f`; measured:

* accepting: from `docker run` until every host port accepts a connection
  (a client inside the daemon's namespace, started beforehand);
* private memory (USS: Private_Clean + Private_Dirty of smaps_rollup) of all
  proxy processes (docker-proxy's; spliceproxy's stubs and engine);
* rm -f: the wall time of `docker rm -f` (the proxies stop before it returns).

The engine keeps running between rounds (idle exit 60 s), as on a host with
other published ports: the first round's figures for it include its start.
Prints per figure the median over rounds, min and max, and the per-round ratio
spliceproxy / docker-proxy (median and interquartile range).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import conftest as e2e  # noqa: E402


def uss_kib(pid: int) -> int:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def build_rootfs(tmp: Path) -> Path:
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    (root / "tmp").mkdir()
    shutil.copy2(e2e.BUSYBOX, root / "bin" / "busybox")
    for applet in e2e.APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "index.html").write_text("measure\n")
    return root


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def one_round(d: e2e.Daemon, host_first: int, cont_first: int, count: int) -> dict:
    host_last, cont_last = host_first + count - 1, cont_first + count - 1
    ports = list(range(host_first, host_last + 1))
    waiter = subprocess.Popen(
        d.netns.cmd([sys.executable, e2e.CLIENT, "wait-accept", "127.0.0.1", *ports]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert e2e._readline_with_timeout(waiter, 15.0).strip() == "ready"
    script = (f"for p in $(seq {cont_first} {cont_last}); do httpd -p $p -h /www || exit 1;"
              " done; echo started; exec sleep 3600")
    waiter.stdin.write("go\n")
    waiter.stdin.flush()
    t0 = time.monotonic()
    d.docker("run", "-d", "--name", "measure", "-p",
             f"127.0.0.1:{host_first}-{host_last}:{cont_first}-{cont_last}",
             e2e.IMAGE, "/bin/sh", "-c", script, timeout=120)
    run_s = time.monotonic() - t0
    out, _ = waiter.communicate(timeout=90)
    import json

    res = json.loads(out)
    if res["left"]:
        raise RuntimeError(f"ports never accepted: {res['left']}\n{d.diagnostics()}")
    d.wait_log("measure", "started")
    time.sleep(0.3)  # let the last start-up allocations settle
    procs = d.proxies()
    engines = d.engines() if d.proxy.engine else []
    if len(procs) != count:
        raise RuntimeError(f"{len(procs)} proxies for {count} ports\n{d.diagnostics()}")
    per = [uss_kib(p.pid) for p in procs]
    eng = sum(uss_kib(e.pid) for e in engines)
    t0 = time.monotonic()
    d.docker("rm", "-f", "measure", timeout=120)
    rm_s = time.monotonic() - t0
    left = e2e._wait_gone([p.pid for p in procs], 10.0)
    if left:
        raise RuntimeError(f"proxies left after rm -f: {left}")
    return {"accept_s": res["elapsed"], "run_s": run_s, "rm_s": rm_s,
            "uss_per_kib": statistics.median(per), "uss_total_kib": sum(per) + eng,
            "engine_kib": eng}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ports", type=int, default=100)
    ap.add_argument("--subnet", default="198.18.224.0/20")
    ap.add_argument("--netns-prefix", default="spm-")
    ap.add_argument("--docker-proxy", default="/usr/sbin/docker-proxy")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, dockerd)")
    why = e2e._missing_prerequisite()
    if why:
        sys.exit(f"cannot measure: {why}")
    ours, _ = e2e._proxy_path()
    nets = list(ipaddress.ip_network(args.subnet).subnets(prefixlen_diff=3))
    bips = [f"{next(n.hosts())}/{n.prefixlen}" for n in nets]

    tmp = Path(tempfile.mkdtemp(prefix=f"{args.netns_prefix}measure-"))
    daemons: dict[str, e2e.Daemon] = {}
    try:
        rootfs = build_rootfs(tmp)
        kinds = []
        for ipt in ("iptables", "no-iptables"):
            for name, proxy in (
                    ("docker-proxy", e2e.ProxyUnderTest(args.docker_proxy, "docker-proxy")),
                    ("engine", e2e.ProxyUnderTest(ours, "spliceproxy", engine=True)),
                    ("standalone", e2e.ProxyUnderTest(ours, "spliceproxy", engine=False))):
                key = f"{name}/{ipt}"
                i = len(kinds)
                kinds.append(key)
                netns = e2e.Netns(f"{args.netns_prefix}{os.getpid()}-{i}")
                d = e2e.Daemon(netns=netns, workdir=Path(tempfile.mkdtemp(
                    prefix=f"{netns.name}-", dir="/tmp")), proxy=proxy, bip=bips[i],
                    rootfs=rootfs,
                    extra_args=["--iptables=false"] if ipt == "no-iptables" else [],
                    extra_env={"SPLICEPROXY_ENGINE_IDLE_EXIT": "60s"})
                daemons[key] = d
                d.start()
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = kinds[:]
            random.shuffle(order)
            for k in order:
                results[k].append(one_round(daemons[k], 30000, 31000, args.ports))
            print(f"round {r + 1}/{args.rounds} done ({', '.join(order)})", file=sys.stderr)
    finally:
        for d in daemons.values():
            for e in (d.engines() if d.proxy.engine and d.netns.path.exists() else []):
                e2e._signal(e.pid, 15)
            d.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{args.ports}-port range on 127.0.0.1, {args.rounds} rounds; median [min-max];"
          " ratio = per-round spliceproxy / docker-proxy, median (IQR)")
    figures = [("accept_s", "all ports accepting, s", 1.0),
               ("run_s", "docker run returns, s", 1.0),
               ("rm_s", "docker rm -f, s", 1.0),
               ("uss_per_kib", "USS per per-port process, KiB", 1.0),
               ("engine_kib", "USS of the engine, KiB", 1.0),
               ("uss_total_kib", "USS of all proxy processes, KiB", 1.0)]
    for ipt, kind in [(i, k) for i in ("iptables", "no-iptables")
                      for k in ("engine", "standalone")]:
        dp, en = results[f"docker-proxy/{ipt}"], results[f"{kind}/{ipt}"]
        print(f"\n-- {kind}, dockerd "
              f"{'default iptables' if ipt == 'iptables' else '--iptables=false'}")
        for key, label, _ in figures:
            a = [x[key] for x in dp]
            b = [x[key] for x in en]
            line = f"{label:<44} docker-proxy {statistics.median(a):9.3f} " \
                   f"[{min(a):.3f}-{max(a):.3f}]  {kind} {statistics.median(b):9.3f} " \
                   f"[{min(b):.3f}-{max(b):.3f}]"
            if key != "engine_kib":
                ratios = [y / x for x, y in zip(a, b) if x]
                q1, med, q3 = quartiles(ratios)
                line += f"  ratio {med:.3f} ({q1:.3f}-{q3:.3f})"
            print(line)
        if kind == "engine":
            first = en[0]
            print(f"   first round (engine started cold): accepting "
                  f"{first['accept_s']:.3f}s, docker run {first['run_s']:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
