"""The shipped policies (policies/*.yaml), each run whole through the controller's state
machine on simulated traffic: every gate of every stage, threshold, compare and `errors`
alike, read from one simulated service the way Prometheus would answer their queries.

The service: Poisson requests split by the weight in force (or a fraction of it, when
routing is broken), 5xx errors at each version's rate, latency from a lognormal body
(median 50 ms) with a 1% slow tail (median 150 ms) counted into Prometheus' default
buckets, scraped every 15 s. Approval stages are approved at once.

    .venv/bin/python -m bench.verdicts.policies --runs 400
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.verdicts.simulate import BUCKETS, quantile
from canary.engine.dryrun import DryRun, Shape, Values, gate_shapes
from canary.policy import Policy, load_file

ROOT = Path(__file__).resolve().parent.parent.parent
SCRAPE = 15.0
BASE = 0.005


def _lognorm_cdf(x: float, median: float, sigma: float) -> float:
    if math.isinf(x):
        return 1.0
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


def latency_probs(shift: float = 0.0) -> np.ndarray:
    """P(a request's latency falls in each bucket), the whole distribution + shift s."""
    cdf = np.array([0.99 * _lognorm_cdf(max(b - shift, 1e-9), 0.05, 0.5)
                    + 0.01 * _lognorm_cdf(max(b - shift, 1e-9), 0.15, 0.5) for b in BUCKETS])
    return np.diff(np.concatenate([[0.0], cdf]))


@dataclass(frozen=True)
class Case:
    name: str
    p_canary: float = BASE
    p_stable: float = BASE
    share: float = 1.0          # the canary gets this fraction of its weight's traffic
    stable_gone: bool = False   # at 100% stable's series vanish (scaled to zero)
    bad: bool = False


CASES = (
    Case("healthy"),
    Case("healthy, stable's series gone at 100%", stable_gone=True),
    Case("errors x5", p_canary=BASE * 5, bad=True),
    Case("errors x2", p_canary=BASE * 2, bad=True),
    Case("canary gets 1/10 of its weight", share=0.1, bad=True),
)


@dataclass
class Series:
    """One version's cumulative counters, one snapshot per scrape."""

    req: list[float] = field(default_factory=lambda: [0.0])
    err: list[float] = field(default_factory=lambda: [0.0])
    hist: list[np.ndarray] = field(default_factory=lambda: [np.zeros(len(BUCKETS))])

    def add(self, n: int, e: int, b: np.ndarray) -> None:
        self.req.append(self.req[-1] + n)
        self.err.append(self.err[-1] + e)
        self.hist.append(self.hist[-1] + b)

    def read(self, s: Shape) -> float | None:
        if s.measure == "requests":
            return self.req[-1]
        if s.measure == "errors":
            return self.err[-1]
        if s.measure == "slow":
            i = BUCKETS.index(s.le)
            return float(self.hist[-1].sum() - self.hist[-1][: i + 1].sum())
        back = max(0, len(self.req) - 1 - round(s.window / SCRAPE))
        dn = self.req[-1] - self.req[back]
        if s.measure == "request_rate":  # (a series younger than the window: its age)
            return dn / min(s.window, (len(self.req) - 1) * SCRAPE)
        if s.measure == "request_count":
            return dn
        if dn <= 0 or dn < s.min_count:
            return None  # a ratio or quantile of nothing: NaN in Prometheus
        if s.measure == "error_ratio":
            return (self.err[-1] - self.err[back]) / max(dn, s.floor)
        return quantile(s.q, self.hist[-1] - self.hist[back])


def readings(policy: Policy, stage: int, canary: Series, stable: Series,
             stable_gone: bool) -> tuple[dict[str, dict[str, float | None]], dict[str, Values]]:
    raws: dict[str, dict[str, float | None]] = {}
    values: dict[str, Values] = {}

    def st(s: Shape | None) -> float | None:
        assert s is not None
        return None if stable_gone else stable.read(s)

    for g in policy.gates_for(stage):
        shapes = gate_shapes(g)
        if any(s is None for s in shapes):
            raise ValueError(f"gate {g.name}: query shape not modelled")
        if g.kind == "errors":
            rq, er = shapes
            assert rq is not None and er is not None
            raws[g.name] = {"canary_requests": canary.read(rq), "canary_errors": canary.read(er),
                            "stable_requests": st(rq), "stable_errors": st(er)}
        elif g.kind == "compare":
            base = shapes[-1]
            values[g.name] = (canary.read(shapes[0]) if shapes[0] else None, st(base))
        else:
            values[g.name] = (canary.read(shapes[0]) if shapes[0] else None, None)
    return raws, values


@dataclass
class Result:
    outcome: str
    time: float
    max_weight: int


def run(policy: Policy, case: Case, rps: float, seed: int) -> Result:
    rng = np.random.default_rng(seed)
    dry = DryRun(policy)
    canary, stable = Series(), Series()
    probs = latency_probs()
    t, top = 0.0, dry.weight
    horizon = (sum(s.hold for s in policy.stages)
               + len(policy.stages) * (policy.progress_deadline + policy.interval))
    while t < horizon:
        w = dry.weight / 100 * (case.share if dry.weight < 100 else 1.0)
        n = int(rng.poisson(rps * SCRAPE))
        n_c = int(rng.binomial(n, w))
        n_s = n - n_c
        canary.add(n_c, int(rng.binomial(n_c, case.p_canary)), rng.multinomial(n_c, probs))
        stable.add(n_s, int(rng.binomial(n_s, case.p_stable)), rng.multinomial(n_s, probs))
        t += SCRAPE
        if round(t / SCRAPE) % max(1, round(policy.interval / SCRAPE)):
            continue
        raws, values = readings(policy, dry.r.stage, canary, stable,
                                case.stable_gone and dry.weight == 100)
        end = dry.step(t, raws, values)
        top = max(top, dry.weight)
        if end:
            return Result(end, t, top)
    return Result("inconclusive", t, top)


def shipped() -> list[Policy]:
    return [load_file(p) for p in sorted((ROOT / "policies").glob("*.yaml"))]


def summary(results: Iterable[Result]) -> dict[str, float]:
    rs = list(results)
    n = len(rs)
    promoted = [r.time for r in rs if r.outcome == "promoted"]
    return {"n": n, "promoted": len(promoted) / n,
            "rolled_back": sum(r.outcome == "rolled_back" for r in rs) / n,
            "inconclusive": sum(r.outcome == "inconclusive" for r in rs) / n,
            "promote_min": float(np.median(promoted)) / 60 if promoted else math.nan,
            "reached_50": sum(r.max_weight >= 50 for r in rs) / n}


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--rps", type=float, nargs="*", default=[20, 200])
    ap.add_argument("--only", default="", help="policies whose name contains this")
    ap.add_argument("--case", default="", help="cases whose name contains this")
    args = ap.parse_args()
    t0 = time.time()
    print(f"# {args.runs} runs per row\n")
    print("| policy | case | rps | promoted [95% CI] | rolled back | inconclusive | reached 50% "
          "| promote median min |")
    print("|---|---|---|---|---|---|---|---|")
    for pol in shipped():
        if args.only not in pol.name:
            continue
        for rps in args.rps:
            for case in CASES:
                if args.case not in case.name:
                    continue
                s = summary(run(pol, case, rps, seed) for seed in range(args.runs))
                lo, hi = wilson(s["promoted"] * s["n"], int(s["n"]))
                print(f"| {pol.name} | {case.name} | {rps:g} | {s['promoted']:.1%} "
                      f"[{lo:.1%}, {hi:.1%}] | {s['rolled_back']:.1%} | "
                      f"{s['inconclusive']:.1%} | {s['reached_50']:.1%} | "
                      f"{s['promote_min']:.1f} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
