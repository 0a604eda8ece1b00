"""`spliceproxy bench`: compare the paths on this machine; `spliceproxy bench gate`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from spliceproxy.bench import topology


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spliceproxy bench",
        description="Measure native, iptables DNAT, spliceproxy, docker-proxy and optional "
                    "peers (haproxy, socat) on this machine.  "
                    "`spliceproxy bench gate BASELINE CURRENT` gates a result against a "
                    "baseline.")
    p.add_argument("--quick", action="store_true", help="short profile (about two minutes)")
    p.add_argument("--rounds", type=int,
                   help="rounds per metric, latency groups included (default: the profile's)")
    p.add_argument("--json", default="spliceproxy-bench.json", metavar="FILE",
                   help="write results here (pytest-benchmark-shaped JSON; default %(default)s)")
    p.add_argument("--png", default="spliceproxy-bench.png", metavar="FILE",
                   help="write the chart here (default %(default)s; '' for none)")
    p.add_argument("--spliceproxy", metavar="PATH", help="spliceproxy executable")
    p.add_argument("--docker-proxy", metavar="PATH",
                   help="reference docker-proxy executable (default: 28.5 as "
                        "scripts/fetch-docker-sid unpacks it, in $SPLICEPROXY_DOCKER_SID or "
                        "/var/cache/spliceproxy/docker-sid; else PATH's or /usr/sbin's)")
    p.add_argument("--no-peers", action="store_true", help="skip haproxy and socat")
    p.add_argument("--paths", metavar="LIST",
                   help="comma-separated subset of %s" % ",".join(harness_paths()))
    p.add_argument("--groups", metavar="LIST",
                   help="comma-separated subset of the metric groups (default all: %s)"
                        % ",".join(harness_groups()))
    p.add_argument("--variants", default="external,loopback", metavar="LIST",
                   help="external and/or loopback (default %(default)s)")
    p.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the proxies (repeatable)")
    p.add_argument("--spin", default="50us", metavar="DURATION",
                   help="SPLICEPROXY_SPIN of the spliceproxy-spin path (default %(default)s)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed of the per-round path order (default: random, recorded in the "
                        "JSON and printed)")
    p.add_argument("--subnet", default=topology.SUBNET, metavar="CIDR",
                   help="IPv4 range for the two veth links, split in halves (default "
                        "%(default)s); refused when an address or route of the host is in it")
    p.add_argument("--netns-prefix", default=topology.PREFIX, metavar="PREFIX",
                   help="name prefix of the network namespaces (default %(default)s); refused "
                        "when a namespace with it already exists")
    return p


def harness_paths() -> tuple:
    from spliceproxy.bench.paths import ALL_PATHS

    return ALL_PATHS


def harness_groups() -> tuple:
    from spliceproxy.bench.groups import GROUPS

    return tuple(GROUPS)


def _progress(stream=sys.stderr):
    tty = stream.isatty()
    t0 = time.monotonic()

    def show(msg: str) -> None:
        line = "[%5.1fs] %s" % (time.monotonic() - t0, msg)
        if tty:
            stream.write("\r\033[K" + line[:120])
        else:
            stream.write(line + "\n")
        stream.flush()

    def done() -> None:
        if tty:
            stream.write("\r\033[K")
            stream.flush()

    return show, done


def main(argv: list[str]) -> int:
    if argv[:1] == ["gate"]:
        return gate_main(argv[1:])
    if argv[:1] == ["agree"]:
        return agree_main(argv[1:])
    args = _parser().parse_args(argv)
    from spliceproxy.bench import harness, report
    from spliceproxy.bench.groups import GROUPS
    from spliceproxy.bench.paths import ALL_PATHS

    only = None
    if args.paths:
        only = tuple(p.strip() for p in args.paths.split(",") if p.strip())
        bad = [p for p in only if p not in ALL_PATHS]
        if bad:
            print("spliceproxy bench: unknown path(s): %s (choose from %s)"
                  % (", ".join(bad), ", ".join(ALL_PATHS)), file=sys.stderr)
            return 2
    groups = None
    if args.groups:
        groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
        bad = [g for g in groups if g not in GROUPS]
        if bad or not groups:
            print("spliceproxy bench: unknown group(s): %s (choose from %s)"
                  % (", ".join(bad) or "none given", ", ".join(GROUPS)),
                  file=sys.stderr)
            return 2
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or any(v not in ("external", "loopback") for v in variants):
        print("spliceproxy bench: --variants takes external and/or loopback", file=sys.stderr)
        return 2
    env = {}
    for item in args.proxy_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print("spliceproxy bench: --proxy-env wants NAME=VALUE, got %r" % item,
                  file=sys.stderr)
            return 2
        env[name] = value
    if args.rounds is not None and args.rounds < 1:
        print("spliceproxy bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    try:
        topology.plan(args.subnet)
        topology.check_prefix(args.netns_prefix)
        if os.geteuid() == 0 and "external" in variants:
            topology.clean_stale(args.netns_prefix)
            topology.check_free(args.subnet, args.netns_prefix)
    except topology.ConfigError as exc:
        print("spliceproxy bench: %s" % exc, file=sys.stderr)
        return 2
    from spliceproxy.settings import duration_us

    try:
        duration_us(0, 10_000)(args.spin)
    except ValueError as exc:
        print("spliceproxy bench: --spin %s: %s" % (args.spin, exc), file=sys.stderr)
        return 2
    show, done = _progress()
    h = harness.Harness("quick" if args.quick else "full", spliceproxy=args.spliceproxy,
                        docker_proxy=args.docker_proxy, peers=not args.no_peers,
                        proxy_env=env, only=only, variants=variants, progress=show,
                        seed=args.seed, subnet=args.subnet, netns_prefix=args.netns_prefix,
                        spin=args.spin)
    if args.rounds:
        h.p.rounds = h.p.lat_rounds = args.rounds
    if os.geteuid() != 0:
        print("not root: cannot build network namespaces or iptables DNAT rules, so the "
              "external-client and iptables paths are not measured; running the loopback "
              "paths", file=sys.stderr)
    try:
        with h:
            res = h.run_all(groups)
    except KeyboardInterrupt:
        done()
        print("interrupted; namespaces and proxies torn down", file=sys.stderr)
        return 130
    except topology.ConfigError as exc:
        done()
        print("spliceproxy bench: %s" % exc, file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        done()
        print("spliceproxy bench: %s" % exc, file=sys.stderr)
        return 1
    done()
    print(report.table(res))
    for name, why in res.skipped.items():
        print("skipped %s: %s" % (name, why))
    for note in res.notes:
        print("note: %s" % note)
    if args.json:
        report.write_json(res, args.json)
        print("wrote %s" % args.json)
    if args.png and report.write_png(res, args.png):
        print("wrote %s" % args.png)
    print("took %.0f s" % res.elapsed)
    return 0


def gate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spliceproxy bench gate",
        description="Compare the gated ratio and count figures of two pytest-benchmark JSON "
                    "files.  Exit 0 pass, 1 regression (or a gated figure missing), 2 usage "
                    "or unreadable input.")
    p.add_argument("baseline", help="baseline result (pytest-benchmark JSON)")
    p.add_argument("current", help="current result (pytest-benchmark JSON)")
    p.add_argument("--tolerance", action="append", default=[], metavar="NAME=REL[:ABS]",
                   help="override one figure's relative (and absolute) tolerance, e.g. "
                        "bulk_1/iptables=0.5 (repeatable; after --tolerances)")
    p.add_argument("--tolerances", metavar="FILE",
                   help="TOML file: [tolerances] NAME = REL or NAME = { rel = R, abs = A }")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the verdict table as Markdown (also appended to "
                        "$GITHUB_STEP_SUMMARY when that is set)")
    p.add_argument("--junit", metavar="FILE",
                   help="write JUnit XML: one test case per gated figure")
    p.add_argument("--github-benchmark", metavar="FILE",
                   help="write github-action-benchmark custom JSON of the current figures: "
                        "FILE-smaller.json (tool customSmallerIsBetter) and FILE-bigger.json "
                        "(customBiggerIsBetter)")
    p.add_argument("--kind", choices=("count", "timing"),
                   help="gate only deterministic counts or only timing ratios")
    p.add_argument("--ignore-missing", action="store_true",
                   help="a figure absent from the current run is skipped, not a failure "
                        "(for partial runs)")
    p.add_argument("--list", action="store_true",
                   help="print the gated figures and their tolerances, and exit")
    return p


def gate_main(argv: list[str]) -> int:
    from spliceproxy.bench import gate

    if "--list" in argv:
        for key, (m, ref, kind, better, rel, absol) in gate.TOLERANCES.items():
            print("%-28s %-6s %s is better, rel %g, abs %g  (%s%s)"
                  % (key, kind, better, rel, absol, m, "/" + ref if ref else ""))
        for key, (variant, _path, m, ref, better, target, rel) in gate.TARGETS.items():
            print("%-28s target %s %g, inconclusive within rel %g or the IQR  (%s %s/%s)"
                  % (key, ">=" if better == "higher" else "<=", target, rel, variant, m, ref))
        return 0
    args = gate_parser().parse_args(argv)
    return gate.main(args.baseline, args.current, overrides=args.tolerance,
                     tolerances_file=args.tolerances, markdown_path=args.markdown,
                     junit_path=args.junit, github_benchmark_path=args.github_benchmark,
                     ignore_missing=args.ignore_missing, only_kind=args.kind)


def agree_main(argv: list[str]) -> int:
    """`spliceproxy bench agree RUN.json RUN.json ...`: do repeated runs agree?"""
    p = argparse.ArgumentParser(
        prog="spliceproxy bench agree",
        description="Count the ratios each run calls conclusive and the pairs of runs that "
                    "call one in opposite directions; exit 1 on any disagreement.")
    p.add_argument("runs", nargs="+", metavar="RUN.json")
    args = p.parse_args(argv)
    from spliceproxy.bench import report

    runs = []
    for path in args.runs:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as exc:
            print("spliceproxy bench agree: cannot read %s: %s" % (path, exc), file=sys.stderr)
            return 2
    a = report.agreement(runs)
    for path, c, n in zip(args.runs, a["conclusive_per_run"], a["ratios_per_run"]):
        print("%s: %d of %d ratios conclusive" % (path, c, n))
    for i, j, variant, metric, ref in a["flips"]:
        print("disagree: %s %s vs %s between %s and %s"
              % (variant, metric, ref, args.runs[i], args.runs[j]))
    print("%d pairs of conclusive calls across %d runs, %d in opposite directions"
          % (a["conclusive_pairs"], a["runs"], a["disagreements"]))
    return 1 if a["disagreements"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
