"""Long-run null test of the errors gate: a healthy canary (the same error rate as
stable on average) watched for thousands of intervals at a fixed share. The gate's
false-rollback bound (alpha) must hold however long it is watched; this measures how
often it fires under each model of wandering error rates.

    .venv/bin/python -m bench.verdicts.longrun --runs 200 --intervals 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from canary.gates import sequential

MODELS = {  # name -> (shared shock variance, per-version shock variance)
    "steady (binomial)": (0.0, 0.0),
    "shared bursts (variance 1)": (1.0, 0.0),
    "per-version wandering (variance 0.25, +-50%)": (0.0, 0.25),
}


def fires(shared: float, own: float, *, share: float, rps: float, base: float,
          intervals: int, seed: int, alpha: float = 0.01) -> bool:
    """One healthy canary watched for `intervals` 15 s intervals: did the gate fire?"""
    rng = np.random.default_rng(seed)
    gate = sequential.ErrorGate(alpha=alpha)
    state = sequential.State()
    c = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                       "stable_errors"), 0.0)

    def shock(var: float) -> float:
        return float(rng.gamma(1 / var, var)) if var else 1.0

    for i in range(intervals):
        n = int(rng.poisson(rps * 15))
        n_c = int(rng.binomial(n, share))
        both = shock(shared)
        p_c = min(1.0, base * both * shock(own))
        p_s = min(1.0, base * both * shock(own))
        c["canary_requests"] += n_c
        c["stable_requests"] += n - n_c
        c["canary_errors"] += int(rng.binomial(n_c, p_c))
        c["stable_errors"] += int(rng.binomial(n - n_c, p_s))
        out = sequential.update(gate, state, dict(c), now=15.0 * i,
                                weight=round(share * 100))
        state = out.state
        if out.verdict == "fail":
            return True
    return False


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    h = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, mid - h), min(1.0, mid + h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--intervals", type=int, default=2000)
    ap.add_argument("--share", type=float, default=0.05)
    ap.add_argument("--rps", type=float, default=200)
    ap.add_argument("--base", type=float, default=0.005)
    args = ap.parse_args()
    t0 = time.time()
    print(f"# {args.runs} healthy canaries, each watched {args.intervals} intervals of 15 s, "
          f"canary share {args.share:.0%}, {args.rps:g} requests/s, {args.base:.1%} errors; "
          "alpha 0.01\n")
    print("| wandering | fired [95% CI] |")
    print("|---|---|")
    for name, (shared, own) in MODELS.items():
        k = sum(fires(shared, own, share=args.share, rps=args.rps, base=args.base,
                      intervals=args.intervals, seed=s) for s in range(args.runs))
        lo, hi = wilson(k, args.runs)
        print(f"| {name} | {k / args.runs:.1%} [{lo:.1%}, {hi:.1%}] |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
