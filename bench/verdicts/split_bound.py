"""The bound on a healthy canary's share of an interval's errors that the errors gate
bets against (canary.gates.sequential.SPLIT_LOGIT, SPLIT_UP, SPLIT_DOWN).

Within one interval, given each version's shock and the shared one, the canary's share
of the interval's errors is Binomial(E, pi) with pi = rho X_c / (rho X_c + X_s) (rho: the
odds of the split at the healthy boundary, X_c, X_s: each version's own shock, mean 1).
A bet whose stake grows with the interval's error count (up to a cap) weighs the
intervals by an increasing concave function h of S = rho X_c + X_s (scaled by the shared
shock, whatever its law); every such h is a mixture of min(S, c). So the mean split a
healthy canary can show a bet is at most the largest of E[min(S, c) pi] / E[min(S, c)]
over c (c -> 0: the plain mean E[pi], which wandering raises above pi_0, since
E[1/X_s] > 1), over each version's shock: gamma or two-point 1 +- sqrt(v), each with a
variance v in {0, v/2, v} (either version may be steady), and at most as low as the
smallest (for the non-inferiority test, whose null is a canary at or above the margin).

    .venv/bin/python -m bench.verdicts.split_bound           # prints the table
    .venv/bin/python -m bench.verdicts.split_bound --check   # and the finer checks
    .venv/bin/python -m bench.verdicts.split_bound --wander 0.25  # another gate's `wander`

An `errors` gate's `wander` w (a relative size: +-w) is a variance of w^2; each
tabulated wander (WANDERS) has its own table (sequential.SPLIT_TABLES), SPLIT_UP and
SPLIT_DOWN being the default's (w = 0.5, variance 0.25). With w = 0 there is no own
shock: the split is pi_0 whatever the shared one, and the offsets are 0 exactly.

Printed as logit offsets: logit(bound) - logit(pi_0), at logit(pi_0) on a grid.
"""

from __future__ import annotations

import argparse
import math
import textwrap

import numpy as np

WANDER = 0.25
WANDERS = (0.0, 0.1, 0.25, 0.5)  # the `wander` values tabulated (variance: their square)
LOGITS = tuple(round(-9.0 + 0.25 * i, 2) for i in range(73))  # logit(pi_0), -9 .. 9
CS = np.exp(np.linspace(math.log(1e-3), math.log(50.0), 60))


def gamma_shock(v: float, n: int = 1200, top: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """A gamma shock of mean 1 and variance v as points and weights (a fine midpoint
    grid, renormalised to mean exactly 1)."""
    if v <= 0:
        return np.ones(1), np.ones(1)
    k = 1 / v
    x = (np.arange(n) + 0.5) * top / n
    logd = (k - 1) * np.log(x) - k * x
    w = np.exp(logd - logd.max())
    w /= w.sum()
    return x / float(w @ x), w


def two_point(v: float) -> tuple[np.ndarray, np.ndarray]:
    if v <= 0:
        return np.ones(1), np.ones(1)
    s = math.sqrt(v)
    return np.array([1 - s, 1 + s]), np.array([0.5, 0.5])


def tilted_means(logit: float, fc: tuple[np.ndarray, np.ndarray],
                 fs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """E[h pi] / E[h] for h = min(S, c) over CS, and for h = 1 (the plain mean)."""
    rho = math.exp(logit)
    xc, wc = fc
    xs, ws = fs
    w = wc[:, None] * ws[None, :]
    s = rho * xc[:, None] + xs[None, :]
    pi = rho * xc[:, None] / s
    s = s / (rho + 1)
    out = [float((w * np.minimum(s, c) * pi).sum() / (w * np.minimum(s, c)).sum())
           for c in CS]
    out.append(float((w * pi).sum()))
    return np.array(out)


def offsets(logit: float, v: float = WANDER, n: int = 1200) -> tuple[float, float]:
    """(up, down): logit of the largest and smallest tilted mean, less logit(pi_0)."""
    if v <= 0:  # no own shock: every tilted mean is pi_0
        return 0.0, 0.0
    hi, lo = -math.inf, math.inf
    for fam in (lambda x: gamma_shock(x, n), two_point):
        for vc in (0.0, v / 2, v):
            for vs in (0.0, v / 2, v):
                m = tilted_means(logit, fam(vc), fam(vs))
                hi, lo = max(hi, float(m.max())), min(lo, float(m.min()))
    lg = lambda p: math.log(p / (1 - p))  # noqa: E731
    return lg(hi) - logit, lg(lo) - logit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="also: smaller variances give smaller offsets")
    ap.add_argument("--wander", type=float, default=0.5, choices=WANDERS,
                    help="the gate's `wander` (a relative size; the variance is its square); "
                         "default 0.5, the table SPLIT_UP / SPLIT_DOWN")
    args = ap.parse_args()
    ups, downs = [], []
    for lg in LOGITS:
        u, d = offsets(lg, args.wander ** 2)
        ups.append(round(u + 0.0005, 3) if u > 0 else 0.0)   # rounded outward
        downs.append(round(d - 0.0005, 3) if d < 0 else 0.0)
    tail = "" if args.wander == 0.5 else f"_W{round(args.wander * 100):02d}"
    for name, xs in ((f"SPLIT_UP{tail}", ups), (f"SPLIT_DOWN{tail}", downs)):
        body = textwrap.wrap(", ".join(f"{x:.3f}" for x in xs), 84)
        print(f"{name} = (\n" + "\n".join("    " + ln for ln in body) + ")")
    if args.check:
        for lg in (-6.0, -3.0, -1.0, 0.0, 1.0, 3.0):
            print(lg, [tuple(round(x, 4) for x in offsets(lg, v)) for v in (0.05, 0.1, 0.25)])


if __name__ == "__main__":
    main()
