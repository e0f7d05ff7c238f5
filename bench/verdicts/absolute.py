"""The absolute test (the canary shown below `detect_rate`) on canaries failing at exactly
`detect_rate`: how often its evidence ever reaches 1/alpha (shown below detect_rate by
this test; the gate promotes on the mean of it and the ratio test, so a false promotion
needs 2/alpha of it where the ratio test is no help) and 10, as a mixture over the
interval it starts at (canary's) and as one product from the first interval (before).
Vectorised over runs; `check` compares it with `canary.gates.sequential.step_absolute`
itself.

    .venv/bin/python -m bench.verdicts.absolute --runs 2000 --intervals 120
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from canary.gates import sequential

GATE = sequential.ErrorGate()
RATIOS = np.array(sequential.AB_GRID)


def _pay(n: np.ndarray, e: np.ndarray) -> np.ndarray:
    """One interval's log likelihood ratio per grid point, less the wander allowance."""
    p0, v = GATE.detect_rate, sequential.tabulated_wander(GATE.wander) ** 2
    x = n * p0 * (1 - RATIOS) / (1 - p0)
    return (e * np.log(RATIOS) + (n - e) * np.log((1 - RATIOS * p0) / (1 - p0))
            - (x - np.log1p(x * v) / v))


def peaks(n: np.ndarray, e: np.ndarray, *, mixture: bool) -> np.ndarray:
    """The highest absolute evidence each run (rows) reaches over its intervals."""
    runs, intervals = n.shape
    logs = np.full((runs, len(RATIOS)), sequential.NO_MASS if mixture else 0.0)
    t = np.zeros(runs)
    best = np.zeros(runs)
    for i in range(intervals):
        ni, ei = n[:, i][:, None], e[:, i][:, None]
        seen = ni[:, 0] > 0
        if mixture:
            start = -np.log((t + 1) * (t + 2))[:, None]
            new = np.minimum(460.0, np.maximum(sequential.NO_MASS, np.logaddexp(logs, start))
                             + _pay(ni, ei))
            t = np.where(seen, t + 1, t)
        else:
            new = logs + _pay(ni, ei)
        logs = np.where(seen[:, None], new, logs)
        ev = np.exp(np.minimum(700.0, logs)).mean(axis=1) + (1 / (t + 1) if mixture else 0.0)
        best = np.maximum(best, ev)
    return best


def rates(model: str, rng: np.random.Generator, runs: int, intervals: int) -> np.ndarray:
    """The canary's error rate per run and interval, its mean exactly detect_rate."""
    p0 = GATE.detect_rate
    if model == "steady":
        return np.full((runs, intervals), p0)
    if model == "wandering":  # fresh each interval: gamma, variance 0.25 (the allowance)
        return p0 * rng.gamma(4.0, 0.25, (runs, intervals))
    if model == "outages":    # ten times the rate in 2% of intervals
        return p0 * np.where(rng.random((runs, intervals)) < 0.02, 10.0, 1.0)
    # "drifting": log-normal, variance ~0.25, that persists (AR(1), 0.98 an interval)
    z = np.zeros((runs, intervals))
    z[:, 0] = rng.standard_normal(runs)
    for i in range(1, intervals):
        z[:, i] = 0.98 * z[:, i - 1] + math.sqrt(1 - 0.98 ** 2) * rng.standard_normal(runs)
    s = 0.47
    return np.minimum(1.0, p0 * np.exp(s * z - s * s / 2))


def check(seed: int = 0) -> float:
    """The largest relative difference between `peaks` and step_absolute's own evidence."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(30, (4, 200)).astype(float)
    e = rng.binomial(n.astype(int), rates("wandering", rng, 4, 200)).astype(float)
    fast = peaks(n, e, mixture=True)
    worst = 0.0
    for r in range(4):
        state, best = sequential.State(), 0.0
        for ni, ei in zip(n[r], e[r], strict=True):
            state = sequential.step_absolute(GATE, state, ei, ni)
            best = max(best, sequential.absolute_evidence(state))
        worst = max(worst, abs(best - fast[r]) / max(1.0, best))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--intervals", type=int, default=120)
    ap.add_argument("--requests", type=float, nargs="+", default=[15, 150, 3000],
                    help="the canary's requests per interval (Poisson mean)")
    args = ap.parse_args()
    print(f"# step_absolute agrees with this replica to {check():.1e}; {args.runs} runs of "
          f"{args.intervals} intervals, the canary failing at detect_rate "
          f"{GATE.detect_rate:g} on average\n")
    print("| model | canary requests per interval | mixture over starts: reached 100 / 10 | "
          "one product: reached 100 / 10 |")
    print("|---|---|---|---|")
    for model in ("steady", "wandering", "outages", "drifting"):
        for lam in args.requests:
            rng = np.random.default_rng([int(lam), len(model)])
            n = rng.poisson(lam, (args.runs, args.intervals)).astype(float)
            e = rng.binomial(n.astype(int), rates(model, rng, args.runs,
                                                  args.intervals)).astype(float)
            cols = []
            for mixture in (True, False):
                b = peaks(n, e, mixture=mixture)
                cols.append(f"{np.mean(b >= 100):.2%} / {np.mean(b >= 10):.2%}")
            print(f"| {model} | {lam:g} | {cols[0]} | {cols[1]} |", flush=True)


if __name__ == "__main__":
    main()
