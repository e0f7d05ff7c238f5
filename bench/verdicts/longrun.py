"""Long-run null test of the errors gate: a healthy canary (the same error rate as
stable on average) watched for thousands of intervals at a fixed share. The gate's
false-rollback bound (alpha) must hold however long it is watched; this measures how
often the sequential test crosses 1/alpha under each model of wandering error rates.

    .venv/bin/python -m bench.verdicts.longrun --runs 200 --intervals 2000
    .venv/bin/python -m bench.verdicts.longrun --blip
    .venv/bin/python -m bench.verdicts.longrun --bare ...   # without the allowance
    .venv/bin/python -m bench.verdicts.longrun --wander 0 ...  # a gate's `wander` (--bare: 0)

Each run's counts are drawn at once with numpy; the test itself is canary's own
`sequential.fold` and `sequential.evidence`, fed interval by interval (the hard guard and
the stage rules of `update` are not part of the bound).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from canary.gates import sequential

MODELS = {  # name -> (shared shock variance, per-version shock variance, canary-only,
    #                  stable-only)
    "steady (binomial)": (0.0, 0.0, 0.0, 0.0),
    "shared bursts (variance 1)": (1.0, 0.0, 0.0, 0.0),
    "per-version wandering (variance 0.25, +-50%)": (0.0, 0.25, 0.0, 0.0),
    "canary-only wandering (variance 0.25)": (0.0, 0.0, 0.25, 0.0),
    "per-version 0.25 and shared bursts 1 together": (1.0, 0.25, 0.0, 0.0),
    "stable-only 0.25 and shared bursts 4 together": (4.0, 0.0, 0.0, 0.25),
}


def counts(shared: float, own: float, *, share: float, rps: float, base: float,
           intervals: int, seed: int, canary_only: float = 0.0,
           ratio: float = 1.0, stable_only: float = 0.0) -> np.ndarray:
    """(intervals, 4) array of e_c, n_c, e_s, n_s: Poisson requests split by the share,
    binomial errors at each version's rate x its gamma shocks (mean 1)."""
    rng = np.random.default_rng(seed)

    def shock(var: float) -> np.ndarray:
        return rng.gamma(1 / var, var, intervals) if var else np.ones(intervals)

    n = rng.poisson(rps * 15, intervals)
    n_c = rng.binomial(n, share)
    both = shock(shared)
    p_c = np.minimum(1.0, base * ratio * both * shock(own) * shock(canary_only))
    p_s = np.minimum(1.0, base * both * shock(own) * shock(stable_only))
    return np.stack([rng.binomial(n_c, p_c), n_c, rng.binomial(n - n_c, p_s), n - n_c],
                    axis=1).astype(float)


def peak(c: np.ndarray, gate: sequential.ErrorGate) -> tuple[int, float]:
    """The first interval at which the sequential test reaches 1/alpha (-1: never), and
    the highest evidence it reached before (Ville: P(ever >= x) <= 1/x for any x >= 1)."""
    state = sequential.State()
    top = 1.0
    for i, (e_c, n_c, e_s, n_s) in enumerate(c.tolist()):
        state = sequential.fold(gate, state, e_c, n_c, e_s, n_s)
        m = sequential.evidence(state)
        top = max(top, m)
        if m >= 1 / gate.alpha:
            return i, top
    return -1, top


def first_crossing(c: np.ndarray, gate: sequential.ErrorGate) -> int:
    """The first interval at which the sequential test reaches 1/alpha, or -1."""
    return peak(c, gate)[0]


def highest(shared: float, own: float, *, share: float, rps: float, base: float,
            intervals: int, seed: int, alpha: float = 0.01, canary_only: float = 0.0,
            stable_only: float = 0.0, wander: float = 0.5) -> float:
    """One healthy canary watched for `intervals` 15 s intervals: the highest evidence
    the test (a gate with this `wander`) reached (>= 1/alpha: it fired)."""
    c = counts(shared, own, share=share, rps=rps, base=base, intervals=intervals, seed=seed,
               canary_only=canary_only, stable_only=stable_only)
    return peak(c, sequential.ErrorGate(alpha=alpha, wander=wander))[1]


def fires(shared: float, own: float, *, share: float, rps: float, base: float,
          intervals: int, seed: int, alpha: float = 0.01, canary_only: float = 0.0) -> bool:
    """One healthy canary watched for `intervals` 15 s intervals: did the test fire?"""
    return highest(shared, own, share=share, rps=rps, base=base, intervals=intervals,
                   seed=seed, alpha=alpha, canary_only=canary_only) >= 1 / alpha


def blip_catch(*, share: float = 0.25, rps: float = 200, base: float = 0.005,
               runs: int = 60, intervals: int = 300, blip: bool = True) -> float:
    """Median seconds to catch a canary at 2x stable's errors, with (or without) one
    shared 30 s blip - both versions failing 10% of requests in the 5th and 6th
    intervals - to show how much a blip both versions share slows the test after it."""
    gate = sequential.ErrorGate(alpha=0.01)
    caught = []
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        n = rng.poisson(rps * 15, intervals)
        n_c = rng.binomial(n, share)
        p_c, p_s = np.full(intervals, 2 * base), np.full(intervals, base)
        if blip:
            p_c[4:6] = p_s[4:6] = 0.1
        c = np.stack([rng.binomial(n_c, p_c), n_c, rng.binomial(n - n_c, p_s), n - n_c],
                     axis=1).astype(float)
        i = first_crossing(c, gate)
        caught.append(15.0 * i if i >= 0 else math.inf)
    return float(np.median(caught))


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
    ap.add_argument("--share", type=float, nargs="+", default=[0.05])
    ap.add_argument("--rps", type=float, default=200)
    ap.add_argument("--base", type=float, default=0.005)
    ap.add_argument("--only", nargs="*", default=None, help="models whose name contains this")
    ap.add_argument("--bare", action="store_true", help="bet against the steady split "
                    "pi_0 itself (no allowance for wandering): what the allowance is for")
    ap.add_argument("--wander", type=float, default=0.5, help="the gate's `wander` (default "
                    "0.5; --bare is 0)")
    ap.add_argument("--blip", action="store_true", help="instead: how much one shared 30 s "
                    "blip slows the catch of a 2x canary (25%% share, 60 seeds)")
    args = ap.parse_args()
    if args.bare:  # (the same as the table of wander 0: m = pi_0)
        args.wander = 0.0
    if args.blip:
        print(f"2x canary at a 25% share, {args.rps:g} requests/s, median seconds to catch "
              f"over 60 seeds: no blip {blip_catch(rps=args.rps, blip=False):.0f}, one shared "
              f"30 s blip at the 5th interval {blip_catch(rps=args.rps):.0f}")
        return
    t0 = time.time()
    print(("# without the allowance for wandering (--bare)\n" if args.bare else
           f"# wander {args.wander:g}\n" if args.wander != 0.5 else "")
          + f"# {args.runs} healthy canaries, each watched {args.intervals} intervals of 15 s, "
          f"{args.rps:g} requests/s, {args.base:.1%} errors; alpha 0.01\n")
    print("| wandering | canary share | fired [95% CI] | reached 10 (Ville: <= 10%) |")
    print("|---|---|---|---|")
    for name, (shared, own, alone, stable_alone) in MODELS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        for share in args.share:
            top = [highest(shared, own, share=share, rps=args.rps, base=args.base,
                           intervals=args.intervals, seed=s, canary_only=alone,
                           stable_only=stable_alone, wander=args.wander)
                   for s in range(args.runs)]
            k = sum(m >= 100 for m in top)
            lo, hi = wilson(k, args.runs)
            ten = sum(m >= 10 for m in top) / args.runs
            print(f"| {name} | {share:.0%} | {k / args.runs:.1%} [{lo:.1%}, {hi:.1%}] | "
                  f"{ten:.1%} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
