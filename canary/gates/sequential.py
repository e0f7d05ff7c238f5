"""The sequential error gate: is the canary's error rate above stable's x tolerance?

Pure and stateful: each evaluation takes the previous state (stored with the rollout,
so a restart loses nothing) and the four raw counters (requests and errors of each
version), and returns a verdict and the new state. docs/verdicts.md explains the maths.

In short: within one interval, given E errors in total, the canary's share of them is
Binomial(E, pi) with pi = n_c*r / (n_c*r + n_s), where n_* are the requests each version
served and r is the ratio of their error rates. "Healthy" is r <= tolerance. For each
ratio r_k on a grid above the tolerance, the likelihood ratio of the interval's split
against the healthy boundary is an e-value (mean <= 1 whenever r <= tolerance, whatever
the traffic split). Products of them from a change point nu onward, mixed over the grid
(weights w_k) and over nu (weights q(nu) = 1/(nu(nu+1)), summing to 1), form a
nonnegative supermartingale with mean <= 1 under "healthy", so by Ville's inequality it
crosses 1/alpha with probability at most alpha, however often it is looked at. Mixing
over the change point (in the manner of the Shiryaev-Roberts statistic) keeps a long
healthy stretch from blunting detection of a failure that starts late.

Two additions:
- Wandering. When each version's error rate wanders on its own from interval to
  interval, pi wanders too, and the binomial likelihood ratio is no longer an e-value;
  when both also burst together, the interval's error count is no guide to how much the
  split can wander. So each interval's bet is linear in the canary's share of its errors,
  f = e_c / E, staked on at most K errors (K fixed before the interval, from stable's
  rate so far): 1 + beta min(E, K) (f - m), nonnegative by construction. Its mean is
  <= 1 whenever the split's mean, weighted by min(E, K), is <= m. A healthy canary's
  split has mean pi_0 only without wandering: a stable wandering on its own makes
  E[pi] > pi_0 (E[1/X] > 1), and a shared burst decides how the intervals are weighted.
  m is the largest such weighted mean over every shared-burst law and each version's own
  shock (gamma or two-point, variance <= WANDER: +-50%), computed once
  (bench/verdicts/split_bound.py) and tabulated in logits (SPLIT_UP): at a 5% share m is
  1.33 pi_0, at 25% 1.2 pi_0. Nothing is estimated, so nothing can be estimated wrong.
  A gate's `wander` (ErrorGate.wander, a relative size w: variance w^2) picks the table
  (SPLIT_TABLES): the default 0.5 is the above; 0 is m = pi_0, valid for steady rates
  and shared bursts of any size (a shared shock does not move the split), but not for
  versions that wander apart.
- Non-inferiority. Before the step to 100%, a second anytime-valid test must show the
  canary is *not* worse than stable x tolerance x final_gross: the same linear bets,
  toward ratios below that margin, against the smallest weighted mean split (SPLIT_DOWN)
  a canary at the margin can show, multiplied over the whole rollout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

GRID = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)  # ratios of error rates, x tolerance
NI_GRID = (0.25, 0.5, 0.75, 0.9)        # ratios, x the non-inferiority margin
AB_GRID = (0.1, 0.25, 0.5)             # error rates, x detect_rate
MAX_COUNTER = 1e15      # a quadrillion requests: anything above is not a counter
MAX_SERIES = 2000       # per-series counters kept in the state (pods x 4 queries)
# The wandering the false-rollback bound allows for: each version's error rate may be
# multiplied, every interval, by its own shock of mean 1 and variance up to WANDER
# (gamma-distributed, or 1 +- sqrt(WANDER) with equal chance): +-50%; on top of a shock
# both share, of any size. See split_bounds.
WANDER = 0.25
# a stage has seen enough traffic only once a gross regression would have shown at least
# this many errors there on average (Poisson: at least 2 in 80% of stages)
MIN_GROSS_ERRORS = 3.0
# The step to all traffic is taken only while the evidence that the canary is worse is
# below where it started: the counts so far must not lean toward "worse" at all. (At the
# earlier stages move_cap's 10 is enough; the last step has no stage after it to catch
# what it let through.)
FINAL_CAP = 1.0
NO_MASS = -1000.0       # the log of a mixture holding nothing yet (exp: 0; JSON has no -inf)
BET_CAP = 0.9           # no interval's bet risks more than this share of the evidence
# logit(bound) - logit(pi_0) at logit(pi_0) = SPLIT_LOGIT0 + SPLIT_STEP x i: the largest
# (UP) and smallest (DOWN) mean split a canary at pi_0 can show a bet under that
# wandering; made by `python -m bench.verdicts.split_bound` (tests/test_verdicts.py
# recomputes some)
SPLIT_LOGIT0, SPLIT_STEP = -9.0, 0.25
SPLIT_UP = (
    0.288, 0.288, 0.288, 0.288, 0.288, 0.288, 0.288, 0.288, 0.288, 0.288, 0.288, 0.288,
    0.287, 0.287, 0.287, 0.286, 0.286, 0.285, 0.285, 0.284, 0.282, 0.281, 0.278, 0.276,
    0.272, 0.268, 0.263, 0.257, 0.249, 0.240, 0.229, 0.217, 0.202, 0.187, 0.170, 0.152,
    0.134, 0.116, 0.100, 0.084, 0.070, 0.058, 0.047, 0.038, 0.031, 0.025, 0.020, 0.016,
    0.012, 0.010, 0.008, 0.006, 0.005, 0.004, 0.003, 0.003, 0.002, 0.002, 0.002, 0.001,
    0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
    0.001)
SPLIT_DOWN = (
    -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001,
    -0.001, -0.001, -0.001, -0.001, -0.002, -0.002, -0.002, -0.003, -0.003, -0.004,
    -0.005, -0.006, -0.008, -0.010, -0.012, -0.016, -0.020, -0.025, -0.031, -0.038,
    -0.047, -0.058, -0.070, -0.084, -0.100, -0.116, -0.134, -0.152, -0.170, -0.187,
    -0.202, -0.217, -0.229, -0.240, -0.249, -0.257, -0.263, -0.268, -0.272, -0.276,
    -0.278, -0.281, -0.282, -0.284, -0.285, -0.285, -0.286, -0.286, -0.287, -0.287,
    -0.287, -0.288, -0.288, -0.288, -0.288, -0.288, -0.288, -0.288, -0.288, -0.288,
    -0.288, -0.288, -0.288)
# the `wander` values tabulated (relative sizes: variance is their square), and for each
# the (UP, DOWN) table; 0: no own shock, so the split's mean is pi_0 exactly
WANDERS = (0.0, 0.1, 0.25, 0.5)
SPLIT_UP_W00 = SPLIT_DOWN_W00 = (0.0,) * len(SPLIT_UP)
SPLIT_UP_W10 = (
    0.011, 0.011, 0.011, 0.011, 0.011, 0.011, 0.011, 0.011, 0.011, 0.011, 0.011, 0.011,
    0.011, 0.011, 0.011, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010,
    0.010, 0.010, 0.010, 0.010, 0.009, 0.009, 0.009, 0.008, 0.008, 0.007, 0.007, 0.006,
    0.006, 0.005, 0.004, 0.004, 0.003, 0.003, 0.002, 0.002, 0.002, 0.001, 0.001, 0.001,
    0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
    0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
    0.001)
SPLIT_DOWN_W10 = (
    -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001,
    -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001,
    -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.002, -0.002,
    -0.002, -0.003, -0.003, -0.004, -0.004, -0.005, -0.006, -0.006, -0.007, -0.007,
    -0.008, -0.008, -0.009, -0.009, -0.009, -0.010, -0.010, -0.010, -0.010, -0.010,
    -0.010, -0.010, -0.010, -0.010, -0.010, -0.010, -0.010, -0.010, -0.011, -0.011,
    -0.011, -0.011, -0.011, -0.011, -0.011, -0.011, -0.011, -0.011, -0.011, -0.011,
    -0.011, -0.011, -0.011)
SPLIT_UP_W25 = (
    0.065, 0.065, 0.065, 0.065, 0.065, 0.065, 0.065, 0.065, 0.065, 0.065, 0.065, 0.065,
    0.065, 0.065, 0.065, 0.065, 0.065, 0.064, 0.064, 0.064, 0.064, 0.064, 0.063, 0.063,
    0.062, 0.061, 0.060, 0.059, 0.057, 0.055, 0.053, 0.050, 0.047, 0.044, 0.040, 0.036,
    0.032, 0.028, 0.024, 0.021, 0.017, 0.015, 0.012, 0.010, 0.008, 0.006, 0.005, 0.004,
    0.003, 0.003, 0.002, 0.002, 0.002, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
    0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
    0.001)
SPLIT_DOWN_W25 = (
    -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001,
    -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001, -0.001,
    -0.002, -0.002, -0.002, -0.003, -0.003, -0.004, -0.005, -0.006, -0.008, -0.010,
    -0.012, -0.015, -0.017, -0.021, -0.024, -0.028, -0.032, -0.036, -0.040, -0.044,
    -0.047, -0.050, -0.053, -0.055, -0.057, -0.059, -0.060, -0.061, -0.062, -0.063,
    -0.063, -0.064, -0.064, -0.064, -0.064, -0.064, -0.065, -0.065, -0.065, -0.065,
    -0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.065,
    -0.065, -0.065, -0.065)
SPLIT_TABLES = {0.0: (SPLIT_UP_W00, SPLIT_DOWN_W00), 0.1: (SPLIT_UP_W10, SPLIT_DOWN_W10),
                0.25: (SPLIT_UP_W25, SPLIT_DOWN_W25), 0.5: (SPLIT_UP, SPLIT_DOWN)}
RATE_PRIOR = 2.0        # stable's rate estimate counts this many errors before any...
RATE_CAP = 2.5          # ...and no interval counted above ~this x the estimate so far


@dataclass(frozen=True)
class ErrorGate:
    tolerance: float = 1.0        # healthy: canary rate <= stable rate x tolerance
    alpha: float = 0.01           # false-rollback budget per rollout
    gross: float = 5.0            # the regression a stage must have been able to catch
    final_gross: float | None = None  # non-inferiority margin before the step to 100%
    detect_rate: float = 0.01     # ...or at least this error rate, when stable has ~none
    guard_share: float = 0.5      # hard guard: this share of canary requests failing...
    guard_min: int = 20           # ...out of at least this many in one interval
    warmup: float = 0.0           # seconds after the first reading whose evidence is ignored
    wander: float = 0.5           # per-version wandering allowed for (relative; WANDERS)


@dataclass
class State:
    last: dict[str, float] = field(default_factory=dict)   # previous raw counters
    t: int = 0                                              # intervals with errors seen
    s: list[float] = field(default_factory=lambda: [0.0] * len(GRID))
    stage: dict[str, float] = field(default_factory=dict)  # this stage's totals
    first_at: float | None = None                          # when counting began
    ni: list[float] = field(default_factory=lambda: [0.0] * len(NI_GRID))  # log products
    # ...and the absolute test's, a mixture over the interval it starts at (logs; ab_t
    # intervals seen): an outage both versions share sets back the tests that begun before
    # it, not those that begin after
    ab: list[float] = field(default_factory=lambda: [NO_MASS] * len(AB_GRID))
    ab_t: int = 0
    disp: dict[str, float] = field(default_factory=dict)   # stable's spread estimate
    disp_c: dict[str, float] = field(default_factory=dict)  # the canary's
    base: dict[str, float] = field(default_factory=dict)   # stable's rate, for the bound
    warm: bool = False     # warm-up over: for good, whatever a stepped clock says later

    def to_json(self) -> dict[str, Any]:
        return {"last": self.last, "t": self.t, "s": self.s, "stage": self.stage,
                "first_at": self.first_at, "ni": self.ni, "ab": self.ab, "ab_t": self.ab_t,
                "disp": self.disp, "disp_c": self.disp_c, "base": self.base,
                "warm": self.warm}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> State:
        if not d:
            return cls()
        ab, ab_t = d.get("ab"), int(d.get("ab_t", 0))
        if ab is not None and "ab_t" not in d:
            # stored before the mixture: a product from the first interval, which the
            # mixture weighs 1/2; that start is taken, so at least one interval is (a
            # state stored before any, t 0, would otherwise keep all of the pending mass
            # 1/(t + 1) beside it: 1.5 in all)
            ab = [x - math.log(2) for x in _fit(ab, AB_GRID)]
            ab_t = max(1, int(d.get("t", 0)))
        return cls(last=dict(d.get("last", {})), t=int(d.get("t", 0)),
                   s=_fit(d.get("s"), GRID, front=True), stage=dict(d.get("stage", {})),
                   first_at=d.get("first_at"), ni=_fit(d.get("ni"), NI_GRID),
                   ab=_fit(ab, AB_GRID, empty=NO_MASS), ab_t=ab_t,
                   disp=dict(d.get("disp", {})), disp_c=dict(d.get("disp_c", {})),
                   base=dict(d.get("base", {})), warm=bool(d.get("warm", False)))


def fold(gate: ErrorGate, state: State, e_c: float, n_c: float, e_s: float,
         n_s: float) -> State:
    """One interval into the test: both versions' totals, then the statistics."""
    state = replace(state, disp=observe(state.disp, e_s, n_s),
                    disp_c=observe(state.disp_c, e_c, n_c))
    return step_absolute(gate, step(gate, state, e_c, n_c, e_s, n_s), e_c, n_c)


def _fit(xs: list[float] | None, grid: tuple[float, ...], front: bool = False,
         empty: float = 0.0) -> list[float]:
    """A stored statistic, fitted to the grid of this version: one stored by a version
    with one grid point fewer (1.1 was added in front of GRID, 0.9 behind NI_GRID) gets a
    component that starts now (0 mass, or a log product of 0: adding a component that
    starts late keeps the mixture an e-process); anything else starts afresh."""
    xs = list(xs or [])
    if len(xs) == len(grid):
        return xs
    if len(xs) == len(grid) - 1:
        return [empty, *xs] if front else [*xs, empty]
    return [empty] * len(grid)


def _delta(new: float, old: float | None) -> float:
    """Counter increase, handling resets (a counter that went down restarted from 0)."""
    if old is None:
        return 0.0
    return new if new < old else new - old


def _deltas(cur: dict[str, float], last: dict[str, float], first: bool) -> dict[str, float]:
    """Each counter's increase since the last reading. Where the query returned several
    series (one per pod: "canary_requests|pod=web-1", ...) the increase is taken per
    series and summed: a pod that restarts resets its own counter only, and a drop of the
    sum must not be read as all of them restarting (which counts the other pods' whole
    history as new, and loses the restarted pod's). A series new since the last reading
    started from 0 (a new pod): all of it is new."""
    out: dict[str, float] = {}
    for key in ("canary_requests", "canary_errors", "stable_requests", "stable_errors"):
        per = [k for k in cur if k.startswith(key + "|")]
        if not per:
            out[key] = _delta(cur.get(key, 0.0), last.get(key))
            continue
        total = 0.0
        for k in per:
            old = last.get(k)
            if old is None:
                total += 0.0 if first or key not in last else cur[k]
            else:
                total += _delta(cur[k], old)
        out[key] = total
    return out


def _pi(n_c: float, n_s: float, r: float) -> float:
    # kept off 0 and 1, where the logarithms below would fail (extreme splits x ratios)
    return min(1 - 1e-12, max(1e-12, n_c * r / (n_c * r + n_s)))


def observe(disp: dict[str, float], e: float, n: float) -> dict[str, float]:
    """Fold one interval of a version into its totals (errors, requests)."""
    if n <= 0:
        return disp
    return {**disp, "se": disp.get("se", 0.0) + e, "sn": disp.get("sn", 0.0) + n}


def tabulated_wander(wander: float) -> float:
    """The smallest tabulated wander (WANDERS) at least `wander`: a table made for more
    wandering covers less (its bound is the larger), so rounding up keeps the guarantee.
    Above the largest (0.5) there is no table: ValueError."""
    for w in WANDERS:
        if wander <= w + 1e-9:
            return w
    raise ValueError(f"wander {wander:g}: tabulated up to {WANDERS[-1]:g}")


def split_bounds(pi_0: float, wander: float = 0.5) -> tuple[float, float]:
    """(largest, smallest) mean of the canary's share of an interval's errors, as a bet
    staked on up to K errors weighs it, for a canary whose steady split would be pi_0,
    when each version's rate is multiplied by its own shock (variance <= wander^2; the
    default WANDER) and both by a shared one (any law): the table SPLIT_UP / SPLIT_DOWN
    (SPLIT_TABLES for another wander, rounded up), read at the two grid points around
    logit(pi_0), the more cautious of the two, plus 0.001."""
    ups, downs = SPLIT_TABLES[tabulated_wander(wander)]
    lg = math.log(pi_0 / (1 - pi_0))
    x = (min(max(lg, SPLIT_LOGIT0), -SPLIT_LOGIT0) - SPLIT_LOGIT0) / SPLIT_STEP
    i = min(int(x), len(ups) - 2)
    up = max(ups[i], ups[i + 1]) + 0.001
    down = min(downs[i], downs[i + 1]) - 0.001
    return 1 / (1 + math.exp(-(lg + up))), 1 / (1 + math.exp(-(lg + down)))


def _prior(t: int) -> float:
    """The change-point prior: weight of a test that starts at the t-th interval (1, 2,
    ...); the starts after the t-th weigh 1/(t + 1) together, so all of them sum to 1."""
    return 1.0 / (t * (t + 1))


def evidence(state: State) -> float:
    """The mixture statistic M_t: >= 1/alpha means the canary is worse than tolerated."""
    pending = 1.0 / (state.t + 1)  # q mass of change points not yet reached
    return sum(state.s) / len(GRID) + pending


def absolute_evidence(state: State) -> float:
    """The absolute test's mixture (over the grid and the interval it starts at): >= 1/alpha
    shows the canary below detect_rate."""
    return (sum(math.exp(min(700.0, x)) for x in state.ab) / len(AB_GRID)
            + 1.0 / (state.ab_t + 1))  # (the mass of start intervals not yet reached)


def ni_evidence(state: State) -> float:
    """Evidence that the canary is no worse than the margin or fails less than
    detect_rate (>= 1/alpha: shown): the mean of the two e-processes, each an average
    over its grid, so it is itself an e-process for a canary that is both at or above the
    margin and at or above detect_rate."""
    ratio = sum(math.exp(min(700.0, x)) for x in state.ni) / len(NI_GRID)
    return (ratio + absolute_evidence(state)) / 2


def absolute_penalty(x: float, v: float = WANDER) -> float:
    """The same for the canary's own errors against detect_rate (step_absolute): with
    x = n_c p0 (1 - r) / (1 - p0), the likelihood ratio's mean under a canary failing at
    p0 x X (X gamma, variance v) is at most exp(x - log(1 + x v) / v); a canary failing
    more often only lowers it."""
    if v <= 0:
        return 0.0
    return x - math.log1p(x * v) / v


def expected_errors(state: State, n_c: float, n_s: float, ratio: float) -> float:
    """K: how many errors the interval about to be judged should hold, at stable's rate
    so far (its errors, plus RATE_PRIOR, per request) with the canary at `ratio` x it; at
    least 1. Fixed before the interval's errors are seen; any such K keeps the bets
    e-values, a good one only makes them grow faster."""
    n, e = state.base.get("n", 0.0), state.base.get("e", 0.0)
    if n < 1:
        return 1.0
    return max(1.0, min(1.0, (e + RATE_PRIOR) / n) * (n_s + ratio * n_c))


def observe_base(base: dict[str, float], e_s: float, n_s: float) -> dict[str, float]:
    """Fold one interval of stable into its rate estimate. An interval counts at most
    RATE_CAP x the errors expected at the rate so far (+ 3 Poisson standard deviations
    + 2): one burst both versions share (an outage) must not raise the estimate - and
    slow the test - for the rest of the rollout (it sizes the bets: expected_errors)."""
    if n_s <= 0:
        return base
    n, e = base.get("n", 0.0), base.get("e", 0.0)
    if n > 0:
        m = (e + RATE_PRIOR) / n * n_s  # this interval's expected errors, at the rate so far
        e_s = min(e_s, RATE_CAP * m + 3 * math.sqrt(m) + 2)
    return {"n": n + n_s, "e": e + e_s, "k": base.get("k", 0.0) + 1}


def step_absolute(gate: ErrorGate, state: State, e_c: float, n_c: float) -> State:
    """Fold one interval of the canary's own counts into the test that its error rate is
    below detect_rate: for rates p1 below it (1/4, 1/2, 3/4 of it) the likelihood ratio
    of e_c errors in n_c requests, p1 against detect_rate, has mean <= 1 for any canary
    failing at detect_rate or more. Where stable has almost no errors the ratio test
    cannot build evidence; this one can, from the canary's own (absent) errors. Each
    interval pays absolute_penalty, for the canary's rate wandering by up to WANDER (the
    gate's wander, squared: none at wander 0)."""
    if n_c <= 0:
        return state
    p0 = gate.detect_rate
    v = tabulated_wander(gate.wander) ** 2
    t = state.ab_t + 1
    start = math.log(_prior(t))  # the weight of a test starting at this interval
    ab = [min(460.0, max(NO_MASS, _log_add(x, start)) + e_c * math.log(r)
              + (n_c - e_c) * math.log((1 - r * p0) / (1 - p0))
              - absolute_penalty(n_c * p0 * (1 - r) / (1 - p0), v))
          for x, r in zip(state.ab, AB_GRID, strict=True)]
    return replace(state, ab=ab, ab_t=t)


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b), without overflow."""
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _margin(gate: ErrorGate) -> float:
    return gate.tolerance * (gate.final_gross or gate.gross)


def _stake(m: float, pi_k: float, k: float, sign: float) -> float:
    """beta of the bet "the split's mean is pi_k, not m", per error, for an interval
    expected to hold k errors: with X = e_c - m E (mean mu = k (pi_k - m), variance
    s2 = k pi_k (1 - pi_k) if the split is pi_k), the beta that maximises
    log(1 + beta mu) - beta^2 s2 / (2 (1 + beta mu)^2), a second-order reading of
    E log(1 + beta X), or the one-error likelihood ratio's stake shrunk for k errors
    (d / (m (1 - m) + k d^2)) where that is larger; capped so that the bet can lose at
    most BET_CAP of the evidence (where s2 < 4 mu^2 the cap is the best). Only bets in
    the test's direction (sign +1: canary worse; -1: better) are placed; others are 0.
    Any beta fixed before the interval keeps the bet an e-value; this one only makes it
    grow."""
    d = pi_k - m
    if d * sign <= 0:
        return 0.0
    most = BET_CAP / (k * (m if d > 0 else 1 - m))
    mu, s2 = k * abs(d), k * pi_k * (1 - pi_k)
    beta = most
    if s2 > 4 * mu * mu:  # (the smaller root of mu^3 b^2 + (2 mu^2 - s2) b + mu = 0)
        beta = 2 * mu / (s2 - 2 * mu * mu + math.sqrt(s2 * s2 - 4 * mu * mu * s2))
        # ...or, where few errors are expected, the likelihood ratio's for one error
        beta = max(beta, abs(d) / (m * (1 - m) + k * d * d))
    return math.copysign(min(most, beta), d)


def _log_pay(e_c: float, e_s: float, m: float, beta: float, k: float) -> float:
    """log of one interval's bet 1 + beta min(E, K) (f - m): f the canary's share of the
    E errors, the stake counting at most K of them (a shared burst cannot raise it)."""
    total = e_c + e_s
    if total <= 0 or beta == 0:
        return 0.0
    return math.log1p(beta * min(total, k) * (e_c / total - m))


def step(gate: ErrorGate, state: State, e_c: float, n_c: float, e_s: float,
         n_s: float) -> State:
    """Fold one interval's counts into the statistics: every interval in which both
    versions served requests (one without errors pays and earns nothing)."""
    if n_c <= 0 or n_s <= 0:
        return state  # one side idle: the split says nothing
    t = state.t + 1
    q = _prior(t)
    stage = dict(state.stage)
    m, _ = split_bounds(_pi(n_c, n_s, gate.tolerance), gate.wander)
    k = expected_errors(state, n_c, n_s, gate.tolerance)
    # what a canary failing at the gross ratio (or detect_rate) would have earned here
    g_c = n_c * min(0.99, max(gate.gross * gate.tolerance * e_s / n_s, gate.detect_rate))
    s = []
    for i, r in enumerate(GRID):
        beta = _stake(m, _pi(n_c, n_s, gate.tolerance * r), k, 1.0)
        # (in logs, and kept below 1e200: far past any 1/alpha, and finite for the store)
        s.append(math.exp(min(460.0, math.log(state.s[i] + q)
                              + _log_pay(e_c, e_s, m, beta, k))))
        stage[f"g{i}"] = stage.get(f"g{i}", 0.0) + _log_pay(g_c, e_s, m, beta, k)
    margin = _margin(gate)
    _, low = split_bounds(_pi(n_c, n_s, margin), gate.wander)
    ni = [x + _log_pay(e_c, e_s, low, _stake(low, _pi(n_c, n_s, margin * r), k, -1.0), k)
          for x, r in zip(state.ni, NI_GRID, strict=True)]
    stage["k"] = stage.get("k", 0.0) + 1
    stage["gx"] = stage.get("gx", 0.0) + g_c
    return replace(state, t=t, s=s, stage=stage, ni=ni,
                   base=observe_base(state.base, e_s, n_s))


def could_detect(gate: ErrorGate, stage: dict[str, float]) -> bool:
    """Would a gross regression have fired on the traffic this stage has seen? Each
    interval also played its bets on the counts a canary failing at `gross` x stable's
    rate that interval (at least detect_rate) would have made; the best ratio's total,
    less what the mixture pays for its grid and change point, must reach 1/alpha."""
    if stage.get("n_c", 0.0) <= 0 or stage.get("n_s", 0.0) <= 0:
        return False
    if stage.get("gx", MIN_GROSS_ERRORS) < MIN_GROSS_ERRORS:
        return False  # so few errors that no bet could count on catching it
    best = max(stage.get(f"g{i}", 0.0) for i in range(len(GRID)))
    # the full mixture pays log(#grid) and the change-point prior; be as strict
    return best - math.log(len(GRID)) - math.log(2) >= math.log(1 / gate.alpha)


def shown_not_worse(gate: ErrorGate, state: State) -> bool:
    """May the canary take all traffic? Only when the non-inferiority evidence (of this
    canary's own counts: below the margin x stable's rate, or below detect_rate) reaches
    1/alpha. A check of how much traffic a stage saw says nothing about this canary; where
    errors are too rare for either test the step waits, inconclusive (progress_deadline
    bounds the wait)."""
    return ni_evidence(state) >= 1 / gate.alpha


def move_cap(gate: ErrorGate) -> float:
    """A stage moves on only while the evidence that the canary is worse stays below
    this: 10 at alpha 0.01 (sqrt(1/alpha), never above 10). Evidence between the cap and
    1/alpha holds the stage - it is not yet enough to roll back, but too much to hand the
    canary more traffic on; more intervals either push it over 1/alpha or let it fall
    back (the statistic decays under a healthy canary)."""
    return min(10.0, math.sqrt(1 / gate.alpha))


def share_mismatch(stage: dict[str, float], weight: int | None) -> str | None:
    """Does the canary get the share of requests its weight promises? Over the stage's
    totals, observed share against weight/100: a disagreement by more than a factor of 2
    (either way) and beyond 4 binomial standard deviations says the routing is not doing
    what canary asked (a subset without pods, a broken route, sticky sessions), and
    nothing the gates measured at this weight means what it should."""
    if weight is None or not 0 < weight < 100:
        return None
    n_c, n_s = stage.get("n_c", 0.0), stage.get("n_s", 0.0)
    n = n_c + n_s
    w = weight / 100
    mu = n * w
    if n <= 0 or abs(n_c - mu) <= 4 * math.sqrt(n * w * (1 - w)):
        return None
    share = n_c / n
    if share < w / 2:
        why = "missing canary pods, a broken route?"
    elif share > 2 * w or (1 - share) < (1 - w) / 2:
        why = "a route that ignores the weight, sticky sessions?"
    else:
        return None
    return (f"the canary served {share:.1%} of requests this stage at weight {weight}% "
            f"({n_c:.0f} of {n:.0f}): routing does not give it its weight ({why}); holding")


def _rarity(state: State) -> str:
    """How many canary errors the whole rollout would hold at stable's rate: the
    expected count (not the canary's observed one) is what says whether the test can
    decide yet - a ratio of two rates means little over a handful of errors."""
    se, sn = state.disp.get("se", 0.0), state.disp.get("sn", 0.0)
    n_c = state.disp_c.get("sn", 0.0)
    if sn <= 0 or n_c <= 0:
        return ""
    expected = n_c * se / sn
    if expected >= 20:
        return ""
    return (f"; at stable's rate the canary would have made {expected:.1f} errors so far: "
            "too few to tell yet")


@dataclass(frozen=True)
class Outcome:
    verdict: str          # "fail" | "pass" | "inconclusive" | "no_data"
    value: float | None   # log10 of the evidence (>= log10(1/alpha) fires)
    detail: str
    state: State


def update(gate: ErrorGate, state: State, raw: dict[str, float | None],
           *, new_stage: bool = False, before_full: bool = False, now: float = 0.0,
           weight: int | None = None) -> Outcome:
    """One evaluation: raw holds the counters `canary_requests`, `canary_errors`,
    `stable_requests`, `stable_errors` (None where the query had no sample). `weight`,
    when given, is the canary weight in force: the canary's observed share of requests
    is checked against it, and at 100 stable's counters may be gone."""
    if new_stage:
        state = replace(state, stage={})
    if weight == 100 and raw.get("stable_requests") is None and raw.get(
            "canary_requests") is not None:
        # at 100% stable serves nothing, and its series may be gone (scaled to zero after
        # hand-over, or by an autoscaler): nothing to compare with, not "no data"
        raw = {**raw, "stable_requests": state.last.get("stable_requests", 0.0),
               "stable_errors": state.last.get("stable_errors", 0.0)}
    if any(raw.get(k) is None for k in ("canary_requests", "stable_requests")):
        return Outcome("no_data", None, "no request counters yet", state)
    odd = [k for k, v in raw.items() if v is not None and not (math.isfinite(v) and
                                                               0 <= v <= MAX_COUNTER)]
    if odd:  # a query that is not a plain counter (a division, a negative offset...)
        return Outcome("no_data", None, f"{', '.join(sorted(odd))} read "
                                        f"{', '.join(str(raw[k]) for k in sorted(odd))}: "
                                        f"a counter is a number from 0 to {MAX_COUNTER:.0e}; "
                                        "check the query",
                       state)
    cur = {k: float(v or 0.0) for k, v in raw.items()}
    first = not state.last
    d = _deltas(cur, state.last, first)
    last = {**{k: v for k, v in state.last.items()  # series gone quiet: kept, so one that
               if "|" in k and k not in cur}, **cur}  # reappears is not counted from 0
    if len(last) > MAX_SERIES:
        last = cur
    state = replace(state, last=last, stage=dict(state.stage),
                    first_at=now if first else state.first_at)
    if first:
        return Outcome("inconclusive", None, "first reading; counting from here", state)
    warming = (not state.warm and state.first_at is not None
               and now - state.first_at < gate.warmup)
    if not warming and not state.warm:
        state = replace(state, warm=True)
    n_c, e_c = d["canary_requests"], min(d["canary_errors"], d["canary_requests"])
    n_s, e_s = d["stable_requests"], min(d["stable_errors"], d["stable_requests"])
    for k, v in (("n_c", n_c), ("e_c", e_c), ("n_s", n_s), ("e_s", e_s)):
        state.stage[k] = state.stage.get(k, 0.0) + v
    if warming:
        state.disp = observe(state.disp, e_s, n_s)  # stable's spread, warm or not
        # a canary warming up (cold caches, JIT) is slow or flaky for a while: this gate
        # does not judge it until `warmup` has passed (give crash-catching gates none)
        return Outcome("inconclusive", None, f"warming up for {gate.warmup:g}s", state)
    if (n_c >= gate.guard_min and e_c >= gate.guard_share * n_c
            and e_s < gate.guard_share * n_s):  # (both failing is an outage, not the canary)
        return Outcome("fail", None, f"hard guard: canary failed {e_c:.0f} of {n_c:.0f} "
                                     "requests in one interval", state)
    state = fold(gate, state, e_c, n_c, e_s, n_s)
    m = evidence(state)
    value = math.log10(m) if m > 0 else None
    st = state.stage
    rates = (f"canary {st.get('e_c', 0):.0f}/{st.get('n_c', 0):.0f} errors, stable "
             f"{st.get('e_s', 0):.0f}/{st.get('n_s', 0):.0f} this stage")
    if m >= 1 / gate.alpha:
        return Outcome("fail", value, f"canary's error rate is above stable's x "
                                      f"{gate.tolerance:g} (evidence {m:.3g} >= "
                                      f"{1 / gate.alpha:g}); {rates}", state)
    if n_s == 0 and n_c > 0 and weight in (None, 100):
        # at 100% there is nothing to compare with: the stages before judged the canary
        # (and the hard guard still watches it)
        return Outcome("pass", value, f"stable serves no traffic at this weight; nothing "
                                      f"to compare with; judged by the stages before; "
                                      f"{rates}", state)
    cap = FINAL_CAP if before_full else move_cap(gate)
    if m >= cap:
        step = "the step to 100% is taken" if before_full else "a stage moves on"
        return Outcome("inconclusive", value, f"evidence that the canary is worse is {m:.3g} "
                                              f"({step} only below {cap:g}; it rolls back "
                                              f"at {1 / gate.alpha:g}): holding; {rates}",
                       state)
    mismatch = share_mismatch(st, weight)
    if mismatch:
        return Outcome("inconclusive", value, f"{mismatch}; {rates}", state)
    if before_full:
        if shown_not_worse(gate, state):
            return Outcome("pass", value, f"shown no worse than stable x {_margin(gate):g} "
                                          f"or below {gate.detect_rate:g} errors (evidence "
                                          f"{ni_evidence(state):.3g}); {rates}", state)
        return Outcome("inconclusive", value, f"not yet shown no worse than stable x "
                                              f"{_margin(gate):g} or below "
                                              f"{gate.detect_rate:g} errors (evidence "
                                              f"{ni_evidence(state):.3g} of "
                                              f"{1 / gate.alpha:g} needed{_rarity(state)}); "
                                              f"{rates}", state)
    if could_detect(gate, state.stage):
        return Outcome("pass", value, rates, state)
    few = st.get("gx", MIN_GROSS_ERRORS)
    shown = (f" (it would have shown {few:.2g} errors so far, fewer than "
             f"{MIN_GROSS_ERRORS:g})" if few < MIN_GROSS_ERRORS else "")
    return Outcome("inconclusive", value, f"not enough canary traffic yet to rule out a "
                                          f"{gate.gross:g}x regression{shown}; {rates}", state)
