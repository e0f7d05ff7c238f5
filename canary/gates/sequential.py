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
  interval, pi wanders too, and the binomial likelihood ratio is no longer an e-value.
  Read without conditioning, each interval's ratio is a bet on the two counts whose mean
  under a healthy canary is at most exp(-log(1 - s^2 v^2) / v) for independent gamma
  shocks of variance v (s: the bet's size in expected errors; shared shocks cancel).
  Each interval's ratio is divided by that (wander_penalty), with v the smaller of
  WANDER (0.25: +-50%) and the larger of the two versions' spread bounds from past
  intervals (wander_bound), and stable's rate bounded from past intervals only
  (stable_rate_bound), so the product is an e-value again; bets are kept to a size the
  penalty lets them earn at (_bet). (The earlier allowance divided each log-likelihood
  ratio by a dispersion factor that included the interval judged: that corrects the
  variance, not the exponential moment, and fired in 10% of long null runs.)
- Non-inferiority. Before the step to 100%, a second anytime-valid test must show the
  canary is *not* worse than stable x tolerance x final_gross: likelihood ratios of
  ratios below that margin against the margin, multiplied over the whole rollout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

GRID = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)  # ratios of error rates, x tolerance
NI_GRID = (0.25, 0.5, 0.75, 0.9)        # ratios, x the non-inferiority margin
AB_GRID = (0.1, 0.25, 0.5)             # error rates, x detect_rate
DISPERSION_CAP = 3.0    # one interval pair's say in the spread estimate
MAX_COUNTER = 1e15      # a quadrillion requests: anything above is not a counter
MAX_SERIES = 2000       # per-series counters kept in the state (pods x 4 queries)
PRIOR_SPREAD = 0.75     # sigma^2 assumed before stable has shown its own
SPREAD_Z = 2.5          # standard errors added to the estimate
# The canary's own spread counts only from interval pairs expected to hold this many of
# its errors, and once there are CANARY_MIN_PAIRS of them: at a 5% weight its counts are
# a handful, their noise would swamp the estimate (and make the test needlessly slow),
# and there wandering is dwarfed by counting noise anyway - it matters where counts are
# large, which is where the canary's estimate becomes precise.
CANARY_MIN_ERRORS = 2.0
CANARY_MIN_PAIRS = 4
# The wandering the false-rollback bound allows for: each version's error rate may be
# multiplied, every interval, by its own shock of mean 1 and variance up to WANDER
# (gamma-distributed, or bounded within 1 +- sqrt(WANDER)): +-50%. See wander_penalty.
WANDER = 0.25
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


@dataclass
class State:
    last: dict[str, float] = field(default_factory=dict)   # previous raw counters
    t: int = 0                                              # intervals with errors seen
    s: list[float] = field(default_factory=lambda: [0.0] * len(GRID))
    stage: dict[str, float] = field(default_factory=dict)  # this stage's totals
    first_at: float | None = None                          # when counting began
    ni: list[float] = field(default_factory=lambda: [0.0] * len(NI_GRID))  # log products
    ab: list[float] = field(default_factory=lambda: [0.0] * len(AB_GRID))  # ...and absolute
    disp: dict[str, float] = field(default_factory=dict)   # stable's spread estimate
    disp_c: dict[str, float] = field(default_factory=dict)  # the canary's
    base: dict[str, float] = field(default_factory=dict)   # stable's rate, for the bound

    def to_json(self) -> dict[str, Any]:
        return {"last": self.last, "t": self.t, "s": self.s, "stage": self.stage,
                "first_at": self.first_at, "ni": self.ni, "ab": self.ab, "disp": self.disp,
                "disp_c": self.disp_c, "base": self.base}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> State:
        if not d:
            return cls()
        return cls(last=dict(d.get("last", {})), t=int(d.get("t", 0)),
                   s=_fit(d.get("s"), GRID, front=True), stage=dict(d.get("stage", {})),
                   first_at=d.get("first_at"), ni=_fit(d.get("ni"), NI_GRID),
                   ab=_fit(d.get("ab"), AB_GRID),
                   disp=dict(d.get("disp", {})), disp_c=dict(d.get("disp_c", {})),
                   base=dict(d.get("base", {})))


def wander_bound(state: State) -> float:
    """The wandering the next interval's bets pay for: WANDER, or less where both
    versions have shown, over past intervals only, that they wander less - the larger of
    the two upper confidence bounds of their spread (mean + SPREAD_Z standard errors of
    per-pair estimates), each WANDER until it has enough pairs."""
    st = spread(state.disp) if state.disp.get("k", 0.0) >= 2 else WANDER
    ca = spread(state.disp_c) if state.disp_c.get("k", 0.0) >= CANARY_MIN_PAIRS else WANDER
    return min(WANDER, max(st, ca))


def fold(gate: ErrorGate, state: State, e_c: float, n_c: float, e_s: float,
         n_s: float) -> State:
    """One interval into the test: the wandering allowance from the past, then both
    versions' spread estimates and the statistics."""
    v = wander_bound(state)
    state = replace(state, disp=observe(state.disp, e_s, n_s),
                    disp_c=observe(state.disp_c, e_c, n_c, CANARY_MIN_ERRORS))
    return step_absolute(gate, step(gate, state, e_c, n_c, e_s, n_s, v), e_c, n_c, v)


def _fit(xs: list[float] | None, grid: tuple[float, ...], front: bool = False) -> list[float]:
    """A stored statistic, fitted to the grid of this version: one stored by a version
    with one grid point fewer (1.1 was added in front of GRID, 0.9 behind NI_GRID) gets a
    component that starts now (0 mass, or a log product of 0: adding a component that
    starts late keeps the mixture an e-process); anything else starts afresh."""
    xs = list(xs or [])
    if len(xs) == len(grid):
        return xs
    if len(xs) == len(grid) - 1:
        return [0.0, *xs] if front else [*xs, 0.0]
    return [0.0] * len(grid)


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


def _log_lr(e_c: float, e_s: float, pi_k: float, pi_0: float) -> float:
    return e_c * math.log(pi_k / pi_0) + e_s * math.log((1 - pi_k) / (1 - pi_0))


def spread(disp: dict[str, float], z: float = SPREAD_Z) -> float:
    """sigma^2: the relative variance of a version's error rate from one interval to the
    next, beyond counting noise, as that version shows it. An upper confidence bound (the mean
    of the per-pair estimates plus SPREAD_Z standard errors), and PRIOR_SPREAD until two
    pairs have been seen: an estimate that is low by chance would leave the test too
    trusting, one that is high only costs a little speed. (Where counts are small the
    bound is loose, but there the binomial noise dwarfs any spread and phi stays ~1.)"""
    k = disp.get("k", 0.0)
    if k < 2:
        return PRIOR_SPREAD
    mean = disp.get("c", 0.0) / k
    var = max(0.0, disp.get("c2", 0.0) / k - mean * mean) * k / (k - 1)
    return max(0.0, mean) + z * math.sqrt(var / k)


def observe(disp: dict[str, float], e: float, n: float,
            min_errors: float = 0.0) -> dict[str, float]:
    """Fold one interval of a version into its spread estimate. For consecutive intervals,
    D = e2/n2 - e1/n1 has E[D^2] = p/n1 + p/n2 + 2 p^2 sigma^2 when the rate is p x a
    shock of variance sigma^2 each interval; e/n^2 estimates p/n. Differences, not
    deviations from the mean, so a slow trend in the rate is not counted as
    spread; each pair's say is capped, so one short burst shared by both versions (which
    the conditional test is immune to anyway) does not blunt the test for the rest of
    the rollout. A pair counts only when both intervals were expected (at the pooled
    rate, not their own, so a spike cannot select itself) to hold `min_errors`."""
    if n <= 0:
        return disp
    out = dict(disp)
    out["se"] = disp.get("se", 0.0) + e
    out["sn"] = disp.get("sn", 0.0) + n
    p = out["se"] / out["sn"]
    n1, e1 = disp.get("n", 0.0), disp.get("e", 0.0)
    if (n1 >= 1 and n >= 1 and p * p > 0  # (fractional or vanishing counts: skip)
            and p * min(n1, n) >= min_errors):
        d = e / n - e1 / n1
        c = (d * d - e / (n * n) - e1 / (n1 * n1)) / (2 * p * p)
        c = max(-DISPERSION_CAP, min(DISPERSION_CAP, c))
        out["c"] = disp.get("c", 0.0) + c
        out["c2"] = disp.get("c2", 0.0) + c * c
        out["k"] = disp.get("k", 0.0) + 1
    out["e"], out["n"] = e, n
    return out


def evidence(state: State) -> float:
    """The mixture statistic M_t: >= 1/alpha means the canary is worse than tolerated."""
    pending = 1.0 / (state.t + 1)  # q mass of change points not yet reached
    return sum(state.s) / len(GRID) + pending


def ni_evidence(state: State) -> float:
    """Evidence that the canary is no worse than the margin or fails less than
    detect_rate (>= 1/alpha: shown): the mean of the two e-processes, each an average
    over its grid, so it is itself an e-process for a canary that is both at or above the
    margin and at or above detect_rate."""
    ratio = sum(math.exp(min(700.0, x)) for x in state.ni) / len(NI_GRID)
    absolute = sum(math.exp(min(700.0, x)) for x in state.ab) / len(AB_GRID)
    return (ratio + absolute) / 2


def wander_penalty(s: float, v: float = WANDER) -> float | None:
    """The log of the most a bet of size s can gain from wandering alone.

    A version serving n requests at error rate p x X (X a shock of mean 1) makes e errors;
    given X, E[A^e] <= exp(n p X (A - 1)), binomial or Poisson. The interval's likelihood
    ratio A^e_c B^e_s (A = pi_k/pi_0 = 1 + s/a (1 - pi_0), B = (1 - pi_k)/(1 - pi_0)) then has
    E <= exp(s (X_c - X_s)) at the healthy boundary, where a = b is the canary's expected
    errors x (1 - pi_0), and less inside the null: steady rates make it 1, shocks shared
    by both versions cancel. Independent shocks do not: for gamma shocks of variance v,
    log E[exp(s (X_c - X_s))] = -log(1 - s^2 v^2) / v (and a shock bounded within
    1 +- sqrt(v) gains no more, by Hoeffding's lemma). Dividing the likelihood ratio by
    exp(this) makes it an e-value again under that wandering. None when s v >= 1: the
    shock's moment is infinite there, and the interval is not bet on at that ratio."""
    x = abs(s) * v
    if x >= 1:
        return None
    if v <= 0:
        return 0.0
    return -math.log1p(-x * x) / v


def absolute_penalty(x: float, v: float = WANDER) -> float:
    """The same for the canary's own errors against detect_rate (step_absolute): with
    x = n_c p0 (1 - r) / (1 - p0), the likelihood ratio's mean under a canary failing at
    p0 x X (X gamma, variance v) is at most exp(x - log(1 + x v) / v); a canary failing
    more often only lowers it."""
    if v <= 0:
        return 0.0
    return x - math.log1p(x * v) / v


def stable_rate_bound(state: State) -> float | None:
    """An upper estimate of stable's mean error rate from the intervals before this one
    (so the bet is fixed before the interval is seen): the errors per request so far,
    plus RATE_PRIOR errors, x (1 + 2 standard errors) for an average over k intervals of
    rates wandering by WANDER and counted with Poisson noise. None before stable has
    served a request. (A rate is at most 1.)"""
    n, k = state.base.get("n", 0.0), state.base.get("k", 0.0)
    if n < 1 or k <= 0:  # (less than one request so far: nothing to go on)
        return None
    e = state.base.get("e", 0.0) + RATE_PRIOR
    return min(1.0, e / n * (1 + 2 * math.sqrt(WANDER / k + 1 / e)))


def observe_base(base: dict[str, float], e_s: float, n_s: float) -> dict[str, float]:
    """Fold one interval of stable into its rate estimate. An interval counts at most
    RATE_CAP x the errors expected at the rate so far (+ 3 Poisson standard deviations
    + 2): one burst both versions share (an outage) must not raise the estimate - and
    slow the test - for the rest of the rollout. A gamma shock of variance WANDER exceeds
    2.5 with probability ~1%, by 0.3% of the mean on average - far inside the estimate's
    margin (stable_rate_bound)."""
    if n_s <= 0:
        return base
    n, e = base.get("n", 0.0), base.get("e", 0.0)
    if n > 0:
        m = (e + RATE_PRIOR) / n * n_s  # this interval's expected errors, at the rate so far
        e_s = min(e_s, RATE_CAP * m + 3 * math.sqrt(m) + 2)
    return {"n": n + n_s, "e": e + e_s, "k": base.get("k", 0.0) + 1}


def step_absolute(gate: ErrorGate, state: State, e_c: float, n_c: float,
                  v: float = WANDER) -> State:
    """Fold one interval of the canary's own counts into the test that its error rate is
    below detect_rate: for rates p1 below it (1/4, 1/2, 3/4 of it) the likelihood ratio
    of e_c errors in n_c requests, p1 against detect_rate, has mean <= 1 for any canary
    failing at detect_rate or more. Where stable has almost no errors the ratio test
    cannot build evidence; this one can, from the canary's own (absent) errors. Each
    interval pays absolute_penalty, for the canary's rate wandering by up to WANDER."""
    if n_c <= 0:
        return state
    p0 = gate.detect_rate
    ab = [x + e_c * math.log(r) + (n_c - e_c) * math.log((1 - r * p0) / (1 - p0))
          - absolute_penalty(n_c * p0 * (1 - r) / (1 - p0), v)
          for x, r in zip(state.ab, AB_GRID, strict=True)]
    return replace(state, ab=ab)


def _margin(gate: ErrorGate) -> float:
    return gate.tolerance * (gate.final_gross or gate.gross)


def _bet(n_c: float, n_s: float, r0: float, r: float, p_hat: float | None,
         v: float = WANDER) -> tuple[float, float, float, float] | None:
    """(log A, log B, penalty, pi_0) of the bet "ratio r against r0" on one interval's
    split, or None where it is not placed (no bound on stable's rate yet).

    The bet is the likelihood ratio of r against r0 - or a smaller one in the same
    direction where the interval holds many errors: under wandering, what a bet of size
    s = lambda x (expected errors) can gain grows like WANDER x s^2, what it can earn
    only like s x (r/r0 - 1), so s is kept to |r/r0 - 1| / (2 WANDER) (the size that
    earns most under the penalty), and below 0.5 / WANDER. Any predictable size is an
    e-value; these only make it grow where it can."""
    if p_hat is None:
        return None
    pi_0, pi_k = _pi(n_c, n_s, r0), _pi(n_c, n_s, r)
    lam = (pi_k - pi_0) / (pi_0 * (1 - pi_0))
    b = pi_0 * n_s * p_hat  # at the boundary a = b = pi_0 x stable's expected errors
    if v > 0 and b > 0:
        most = min(abs(r / r0 - 1) / (2 * v), 0.5 / v) / b
        if abs(lam) > most:
            lam = math.copysign(most, lam)
            pi_k = pi_0 + lam * pi_0 * (1 - pi_0)
    pen = wander_penalty(lam * b, v)
    if pen is None:
        return None
    return math.log(pi_k / pi_0), math.log((1 - pi_k) / (1 - pi_0)), pen, pi_0


def step(gate: ErrorGate, state: State, e_c: float, n_c: float, e_s: float,
         n_s: float, v: float = WANDER) -> State:
    """Fold one interval's counts into the statistics: every interval in which both
    versions served requests, with errors or without (the penalty is paid either way -
    skipping quiet intervals would let wandering pay only where it helps)."""
    if n_c <= 0 or n_s <= 0:
        return state  # one side idle: the split says nothing
    p_hat = stable_rate_bound(state)
    if p_hat is None:  # stable's first interval: nothing to bound the bet with yet
        return replace(state, base=observe_base(state.base, e_s, n_s))
    t = state.t + 1
    q = 1.0 / (t * (t + 1))
    stage = dict(state.stage)
    s = []
    for k, r in enumerate(GRID):
        bet = _bet(n_c, n_s, gate.tolerance, gate.tolerance * r, p_hat, v)
        if bet is None:
            s.append(state.s[k] + q)
            stage[f"skip{k}"] = stage.get(f"skip{k}", 0.0) + 1  # a replay cannot count it
            continue
        la, lb, pen, _ = bet
        # (in logs, and kept below 1e200: far past any 1/alpha, and finite for the store)
        s.append(math.exp(min(460.0, math.log(state.s[k] + q) + e_c * la + e_s * lb - pen)))
        stage[f"pen{k}"] = stage.get(f"pen{k}", 0.0) + pen
    margin = _margin(gate)
    ni = []
    for x, r in zip(state.ni, NI_GRID, strict=True):
        bet = _bet(n_c, n_s, margin, margin * r, p_hat, v)
        ni.append(x if bet is None else x + e_c * bet[0] + e_s * bet[1] - bet[2])
    stage["k"] = stage.get("k", 0.0) + 1
    return replace(state, t=t, s=s, stage=stage, ni=ni,
                   base=observe_base(state.base, e_s, n_s))


def could_detect(gate: ErrorGate, stage: dict[str, float], gross: float | None = None) -> bool:
    """Would a gross regression have fired on the traffic this stage has seen? Replays
    the stage's totals as one interval with the canary failing at the gross rate, less
    the wandering penalties the stage's intervals paid at each ratio (ratios the test did
    not bet on in every interval of the stage do not count)."""
    gross = gross or gate.gross
    n_c, n_s, e_s = stage.get("n_c", 0.0), stage.get("n_s", 0.0), stage.get("e_s", 0.0)
    if n_c <= 0 or n_s <= 0:
        return False
    p_s = e_s / n_s
    p_bad = min(0.99, max(gross * gate.tolerance * p_s, gate.detect_rate))
    e_c = n_c * p_bad
    pi_0 = _pi(n_c, n_s, gate.tolerance)
    best = max((_log_lr(e_c, e_s, _pi(n_c, n_s, gate.tolerance * r), pi_0)
                - stage.get(f"pen{k}", 0.0) for k, r in enumerate(GRID)
                if not stage.get(f"skip{k}")),  # (a ratio not bet on every interval)
               default=-math.inf)
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
    if share < w / 2 or (1 - share) < (1 - w) / 2:
        return (f"the canary served {share:.1%} of requests this stage at weight {weight}% "
                f"({n_c:.0f} of {n:.0f}): routing does not give it its weight (missing "
                "canary pods, a broken route?); holding")
    return None


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
    warming = state.first_at is not None and now - state.first_at < gate.warmup
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
    if m >= move_cap(gate):
        return Outcome("inconclusive", value, f"evidence that the canary is worse is {m:.3g} "
                                              f"(a stage moves on only below "
                                              f"{move_cap(gate):g}; it rolls back at "
                                              f"{1 / gate.alpha:g}): holding; {rates}", state)
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
    return Outcome("inconclusive", value, f"not enough canary traffic yet to rule out a "
                                          f"{gate.gross:g}x regression; {rates}", state)
