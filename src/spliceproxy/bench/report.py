"""The comparison table, the JSON record and the PNG chart."""

from __future__ import annotations

import json
import platform
import time

from spliceproxy.bench.metrics import BARE, METRICS, PLAIN, REFS
from spliceproxy.bench.results import Results

SUBJECT = "spliceproxy"
ORDER = ("native", "iptables", "spliceproxy", "spliceproxy-standalone", "spliceproxy-spin",
         "fastpath", "docker-proxy", "docker-proxy-20.10", "haproxy", "socat", BARE)
# Paths whose ratios get columns of their own beside the subject's.
ALSO = ("fastpath",)


def short(ref: str, width: int = 8) -> str:
    """A reference's column name: cut to width, the second docker-proxy told apart."""
    return "dp-20.10"[:width] if ref == "docker-proxy-20.10" else ref[:width]


def _fmt(v) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 10000:
        return "%.0f" % v
    if a >= 100:
        return "%.0f" % v
    if a >= 10:
        return "%.1f" % v
    return "%.3g" % v


def fmt_ratio(r: dict | None) -> str:
    """'1.28x [1.10-1.40]'; a leading '~' marks a ratio the spread leaves inconclusive."""
    if not r:
        return "-"
    mark = "" if r["conclusive"] else "~"
    if r["rounds"] <= 1 or r["q1"] == r["q3"]:
        return "%s%.2fx" % (mark, r["value"])
    return "%s%.2fx [%.2f-%.2f]" % (mark, r["value"], r["q1"], r["q3"])


LEGEND = ("ratios: median of per-round ratios [interquartile range across rounds]; "
          "~ = inconclusive (the range contains 1, or the medians beside it point the "
          "other way)")


def table(res: Results, subject: str = SUBJECT) -> str:
    """Paths x metrics per variant, with the subject's ratios (and their spread) to the
    references."""
    lines = []
    d = res.to_dict()["metrics"]
    for variant, metrics in d.items():
        paths = [p for p in ORDER if any(p in m for m in metrics.values())]
        paths += sorted({p for m in metrics.values() for p in m} - set(paths))
        cols = []  # (path, reference) ratio columns
        for who in (subject,) + tuple(a for a in ALSO if a != subject):
            cols += [(who, r) for r in REFS + (BARE,) if r != who and any(
                r in m and who in m for m in metrics.values())]
        # The same engine with a setting changed, against the plain relay.
        variants_of = [p for p in paths if p.startswith(PLAIN + "-")] if subject == PLAIN else []
        head = ["%s metric" % variant, "unit"] + paths + [
            "%s/%s" % (w[:6] if w == subject else w, short(r)) for w, r in cols]
        head += ["%s/plain" % p[len(PLAIN) + 1:][:6] for p in variants_of]
        rows = [head]
        for metric in METRICS:
            if metric not in metrics:
                continue
            per = metrics[metric]
            row = [metric, METRICS[metric][0]] + [_fmt(per[p]["median"]) if p in per else "-"
                                                  for p in paths]
            for w, r in cols:
                row.append(fmt_ratio(per.get(w, {}).get("ratio_spread", {}).get(r)))
            for p in variants_of:
                row.append(fmt_ratio(per.get(p, {}).get("ratio_spread", {}).get(PLAIN)))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if j else c.ljust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
    lines.append(LEGEND)
    lines.append("seed %d (path order per round); rerun the same order with --seed %d"
                 % (res.seed, res.seed))
    return "\n".join(lines)


def directions(data: dict, subject: str = SUBJECT) -> dict:
    """{(variant, metric, ref): +1/-1/0} of the subject's ratios in a result JSON."""
    summary = data.get("summary", data)
    out = {}
    for variant, metrics in (summary.get("metrics") or {}).items():
        for metric, per in metrics.items():
            for ref, r in (per.get(subject, {}).get("ratio_spread") or {}).items():
                d = 0 if not r.get("conclusive") else (1 if r["value"] > 1 else -1)
                out[(variant, metric, ref)] = d
    return out


def agreement(runs: list[dict], subject: str = SUBJECT) -> dict:
    """How often pairs of runs call a ratio conclusive in opposite directions."""
    dirs = [directions(r, subject) for r in runs]
    pairs = disagree = 0
    flips = []
    for i in range(len(dirs)):
        for j in range(i + 1, len(dirs)):
            for key in sorted(set(dirs[i]) & set(dirs[j])):
                a, b = dirs[i][key], dirs[j][key]
                if a and b:
                    pairs += 1
                    if a != b:
                        disagree += 1
                        flips.append((i, j) + key)
    return {"runs": len(runs),
            "conclusive_per_run": [sum(1 for v in d.values() if v) for d in dirs],
            "ratios_per_run": [len(d) for d in dirs],
            "conclusive_pairs": pairs, "disagreements": disagree, "flips": flips}


def machine_info() -> dict:
    import os

    return {"node": platform.node(), "machine": platform.machine(),
            "release": platform.release(), "cpu_count": os.cpu_count(),
            "python_version": platform.python_version()}


def to_json(res: Results) -> dict:
    """A pytest-benchmark-shaped record: one entry per metric x path, ratios in extra_info."""
    from spliceproxy.bench.gate import gate_entries

    d = res.to_dict()
    benchmarks = []
    for variant, metrics in d["metrics"].items():
        for metric, per in metrics.items():
            for path, info in per.items():
                name = "test_%s[%s-%s]" % (metric, variant, path)
                vals = info["rounds"]
                benchmarks.append({
                    "name": name, "fullname": "spliceproxy-bench::" + name,
                    "group": "%s:%s" % (variant, metric),
                    "stats": {"min": min(vals), "max": max(vals), "median": info["median"],
                              "rounds": len(vals), "data": vals},
                    "extra_info": dict(info, metric=metric, variant=variant, path=path,
                                       gate=gate_entries(res, variant, metric, path)),
                })
    return {"machine_info": machine_info(), "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "version": "spliceproxy-bench", "summary": d, "benchmarks": benchmarks}


def write_json(res: Results, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(res), f, indent=1, sort_keys=True)


COLORS = {"native": "#888888", "iptables": "#bbbbbb", "spliceproxy": "#1f77b4",
          "docker-proxy": "#d62728", "haproxy": "#2ca02c", "socat": "#9467bd",
          "spliceproxy-spin": "#17becf", BARE: "#8c564b", "spliceproxy-standalone": "#aec7e8",
          "docker-proxy-20.10": "#ff9896"}


def chart_panels(res: Results) -> list[tuple[str, str, dict]]:
    """(variant, metric, per-path summary) for every metric the run measured, in table
    order: winners and losers alike, each panel one kind of measurement for every path."""
    d = res.to_dict()["metrics"]
    out = []
    for variant, metrics in d.items():
        for metric in METRICS:
            if metric in metrics:
                out.append((variant, metric, metrics[metric]))
    return out


def _ratio_caption(per: dict, subject: str = SUBJECT) -> str:
    spread = per.get(subject, {}).get("ratio_spread", {})
    parts = []
    for ref in REFS + (BARE,):
        if ref in spread:
            parts.append("/%s %s" % (short(ref, 6), fmt_ratio(spread[ref])))
    return "\n".join(parts)


def write_png(res: Results, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = chart_panels(res)
    if not panels:
        return False
    cols = 6
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.1 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax, (variant, metric, per) in zip(axes, panels):
        names = [p for p in ORDER if p in per] + sorted(set(per) - set(ORDER))
        med = [per[p]["median"] for p in names]
        lo = [max(0.0, per[p]["median"] - per[p]["q1"]) for p in names]
        hi = [max(0.0, per[p]["q3"] - per[p]["median"]) for p in names]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3,
               color=[COLORS.get(n, "#444444") for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("python-bare", "py-bare") for n in names],
                           rotation=45, ha="right", fontsize=7)
        unit, better, _desc = METRICS[metric]
        ax.set_title("%s %s (%s, %s better)" % (variant, metric, unit, better), fontsize=8)
        cap = _ratio_caption(per)
        if cap:
            ax.text(0.02, 0.97, "splice" + cap.replace("\n", "\nsplice"),
                    transform=ax.transAxes, fontsize=6.5, va="top",
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle("spliceproxy bench, %s profile: medians with interquartile range across "
                 "rounds; ratios are medians of per-round ratios [IQR], ~ inconclusive "
                 "(seed %d)" % (res.profile, res.seed), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
