"""Results of a run: values per round, ratios paired by round, quartiles.

Every headline figure is a ratio between paths measured in the same run;
timing figures are medians of per-round ratios, so a neighbour's load that
slows one round slows every path of that round alike.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from spliceproxy.bench import metrics as _m
from spliceproxy.bench.metrics import BARE, COUNTS, METRICS, MIN_TIMING_ROUNDS, PLAIN, REFS


def quartiles(vals: list) -> tuple[float, float, float]:
    """(q1, median, q3) with the inclusive method; one value is its own spread."""
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q1, q2, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return q1, q2, q3


def pct(vals: list, q: float) -> float:
    """The q-quantile of vals, nearest rank below (q=0.99 of 100 values is the 99th)."""
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Ratio:
    """A path's figure over a reference's, round by round.

    value is the median of the per-round ratios (each round measures both
    paths side by side), q1..q3 their interquartile range, of_medians the
    ratio of the two medians shown beside it.  The ratio is conclusive only
    when the whole IQR lies on one side of 1 and the ratio of medians agrees
    in direction: a table never shows a conclusive 0.68x next to medians of
    14.6 and 14.7.
    """

    value: float
    q1: float
    q3: float
    of_medians: float | None
    n: int
    count: bool = False  # a deterministic count: one round is a measurement, not a sample

    @property
    def conclusive(self) -> bool:
        if self.n < MIN_TIMING_ROUNDS and not self.count:
            return False  # a timing figure measured once has no known spread
        if self.q1 <= 1.0 <= self.q3:
            return False
        if self.of_medians is not None and (self.of_medians - 1.0) * (self.value - 1.0) <= 0:
            return False
        return True

    @property
    def direction(self) -> int:
        """+1 above 1, -1 below, 0 when inconclusive."""
        if not self.conclusive:
            return 0
        return 1 if self.value > 1.0 else -1

    def as_dict(self) -> dict:
        return {"value": self.value, "q1": self.q1, "q3": self.q3, "iqr": self.q3 - self.q1,
                "of_medians": self.of_medians, "rounds": self.n,
                "conclusive": self.conclusive}


@dataclass
class Results:
    profile: str
    # variant -> metric -> path -> [values], and the round each value came from
    variants: dict = field(default_factory=dict)
    round_of: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    paths: list = field(default_factory=list)
    started: float = 0.0
    elapsed: float = 0.0
    seed: int = 0
    orders: dict = field(default_factory=dict)  # "variant:group" -> [path order per round]
    method: dict = field(default_factory=dict)

    def add(self, variant: str, metric: str, path: str, value, rnd: int = 0) -> None:
        if value is None:
            return
        self.variants.setdefault(variant, {}).setdefault(metric, {}).setdefault(
            path, []).append(float(value))
        self.round_of.setdefault(variant, {}).setdefault(metric, {}).setdefault(
            path, []).append(rnd)

    def median(self, variant: str, metric: str, path: str):
        vals = self.variants.get(variant, {}).get(metric, {}).get(path)
        return statistics.median(vals) if vals else None

    def ratio_stats(self, variant: str, metric: str, path: str, ref: str) -> Ratio | None:
        """Per-round ratios path/ref, paired by round (rounds measured side by side)."""
        m = self.variants.get(variant, {}).get(metric, {})
        a, b = m.get(path), m.get(ref)
        if not a or not b or path == ref:
            return None
        if "added" in metric and ref not in _m.DOCKER_PROXIES:
            return None  # added latency over native/iptables is ~0: no meaningful ratio
        ro = self.round_of.get(variant, {}).get(metric, {})
        ra = dict(zip(ro.get(path, range(len(a))), a))
        rb = dict(zip(ro.get(ref, range(len(b))), b))
        pairs = [ra[r] / rb[r] for r in sorted(ra) if r in rb and rb[r]]
        mb = statistics.median(b)
        of_medians = statistics.median(a) / mb if mb else None
        if not pairs:
            if of_medians is None:
                return None
            pairs = [of_medians]
        q1, q2, q3 = quartiles(pairs)
        return Ratio(q2, q1, q3, of_medians, len(pairs), metric in COUNTS)

    def ratio(self, variant: str, metric: str, path: str, ref: str):
        """Median of per-round ratios path/ref."""
        r = self.ratio_stats(variant, metric, path, ref)
        return r.value if r is not None else None

    def to_dict(self) -> dict:
        out = {"profile": self.profile, "paths": self.paths, "skipped": self.skipped,
               "notes": self.notes, "elapsed_s": round(self.elapsed, 1), "seed": self.seed,
               "orders": self.orders, "method": self.method, "metrics": {}}
        for variant, metrics in self.variants.items():
            for metric, per_path in metrics.items():
                for path, vals in per_path.items():
                    stats = {ref: self.ratio_stats(variant, metric, path, ref)
                             for ref in REFS + (BARE, PLAIN)}
                    stats = {k: v for k, v in stats.items() if v is not None}
                    q1, _q2, q3 = quartiles(vals)
                    out["metrics"].setdefault(variant, {}).setdefault(metric, {})[path] = {
                        "median": statistics.median(vals), "q1": q1, "q3": q3,
                        "rounds": vals,
                        "round_index": self.round_of.get(variant, {}).get(metric, {}).get(
                            path, []),
                        "unit": METRICS[metric][0], "better": METRICS[metric][1],
                        "ratios": {k: v.value for k, v in stats.items()},
                        "ratio_spread": {k: v.as_dict() for k, v in stats.items()}}
        return out
