"""The comparison table, the JSON record and the PNG chart."""

from __future__ import annotations

import json
import platform
import time

from spliceproxy.bench.harness import BARE, METRICS, REFS, Results

SUBJECT = "spliceproxy"
ORDER = ("native", "iptables", "spliceproxy", "docker-proxy", "haproxy", "socat", BARE)


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


def table(res: Results, subject: str = SUBJECT) -> str:
    """Paths x metrics per variant, with the subject's ratios to the references."""
    lines = []
    d = res.to_dict()["metrics"]
    for variant, metrics in d.items():
        paths = [p for p in ORDER if any(p in m for m in metrics.values())]
        refs = [r for r in REFS + (BARE,) if r != subject and any(
            r in m and subject in m for m in metrics.values())]
        head = ["%s metric" % variant, "unit"] + paths + ["%s/%s" % (subject[:6], r[:8])
                                                          for r in refs]
        rows = [head]
        for metric in METRICS:
            if metric not in metrics:
                continue
            per = metrics[metric]
            row = [metric, METRICS[metric][0]] + [_fmt(per[p]["median"]) if p in per else "-"
                                                  for p in paths]
            for r in refs:
                ratio = per.get(subject, {}).get("ratios", {}).get(r)
                row.append("%.2fx" % ratio if ratio is not None else "-")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if j else c.ljust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
    return "\n".join(lines)


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


CHART = (("bulk_1", "one TCP stream (Gbit/s)"), ("cpu_per_gb", "proxy CPU (s/GB)"),
         ("rr_added_p50", "added RR p50 (us)"), ("crr_rate", "connections/s"),
         ("udp_added_p50", "added UDP p50 (us)"), ("syscalls_per_gib", "syscalls / GiB"))


def write_png(res: Results, path: str, variant: str = "external") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    d = res.to_dict()["metrics"]
    metrics = d.get(variant) or next(iter(d.values()), {})
    if variant == "external" and "syscalls_per_gib" not in metrics:
        metrics = dict(metrics)
    per_gib = dict(metrics.get("strace_syscalls_per_gib", {}))
    per_gib.update(metrics.get("syscalls_per_gib", {}))
    panels = [(k, t) for k, t in CHART if k in metrics or (k == "syscalls_per_gib" and per_gib)]
    if not panels:
        return False
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(4 * ((len(panels) + 1) // 2), 7))
    axes = list(getattr(axes, "flat", [axes]))
    colors = {"native": "#888888", "iptables": "#bbbbbb", "spliceproxy": "#1f77b4",
              "docker-proxy": "#d62728", "haproxy": "#2ca02c", "socat": "#9467bd"}
    for ax, (key, title) in zip(axes, panels):
        per = per_gib if key == "syscalls_per_gib" else metrics[key]
        names = [p for p in ORDER if p in per]
        vals = [per[p]["median"] for p in names]
        ax.bar(names, vals, color=[colors.get(n, "#444444") for n in names])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if key == "syscalls_per_gib":
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle("spliceproxy bench (%s client, %s profile, medians)" % (variant, res.profile))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
