"""Verdict benchmark: canary's sequential error gate against the fixed-threshold rule.

A simulator makes per-scrape (15 s) request and error counts for stable and canary:
Poisson arrivals split by the current weight, binomial errors (beta-binomial when
overdispersed), with the weight following a staged policy (5/25/50/100%, holds
2/5/5/5 min, progress deadline 30 min). The same seeds drive every rule.

- canary: the controller's own state machine (`canary.engine.decide`, which runs
  `canary.gates.sequential`) fed the cumulative counters each scrape, with the router
  applying each weight at once: its holds, its inconclusive-holds, its non-inferiority
  step to 100%, its progress deadline (a rollback there is reported as inconclusive).
- fixed threshold (Flagger semantics): every `interval` the canary-only error rate over
  the last 1 m is checked against 1% (success rate >= 99%); no requests in the window is a
  failed check, as Flagger counts "no values found"; failed checks are counted
  cumulatively and the rollout rolls back at `threshold`; a stage moves on after its hold
  when the latest check passed. Tried at intervals 15/30/60 s x thresholds 1/2/5/10.

A bad row names two fixed settings: the cheapest in excess bad requests among those as
safe as canary's gate (or within 1%) on steady healthy traffic, and the cheapest among
those as safe on every healthy row of the same base rate and stages (a shared outage,
bursts, wandering: `peers`); after the table, each setting's false rollbacks per
healthy row.

    .venv/bin/python -m bench.verdicts.simulate --healthy-runs 2000 --bad-runs 300
    .venv/bin/python -m bench.verdicts.simulate --wander 0 ...  # the gate with `wander: 0`
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from canary.engine.dryrun import DryRun
from canary.gates.kinds import ErrorsGate, ThresholdGate
from canary.policy import NoData, Policy
from canary.stages import Stage

SCRAPE = 15.0
WEIGHTS = (5, 25, 50, 100)
HOLDS = (120.0, 300.0, 300.0, 300.0)
DEADLINE = 1800.0
MAX_TIME = 3600.0
# a longer policy, so a release that breaks after half an hour is still a canary then:
# 5% for 10 min, 25% for 15, 50% for 15 (the crash lands here), 100% for 5
SOAK_HOLDS = (600.0, 900.0, 900.0, 300.0)
SOAK_DEADLINE = 3600.0
ONE_PERCENT = (1, 25, 50, 100)  # a more careful first step
BASE = 0.005
FLAGGER = [(i, t) for i in (15, 30, 60) for t in (1, 2, 5, 10)]
MAX_ERROR = 0.01
GATE = ErrorsGate(name="errors", requests="r{{ version }}", errors="e{{ version }}",
            tolerance=1.0, alpha=0.01, gross=5.0, final_gross=2.0)
# docs/verdicts.md's restarts gate: any canary restart in the last 5 minutes rolls back
RESTART_GATE = ThresholdGate(name="canary-restarts", max=0, query=(
    'sum(increase(kube_pod_container_status_restarts_total{pod=~"web-canary-.*"}[5m])) '
    "or vector(0)"))


@dataclass(frozen=True)
class Scenario:
    name: str
    p_stable: float
    canary: Callable[[float], float]  # time since start -> canary error probability
    onset: float | None               # when the canary went bad (None: healthy)
    burst: bool = False               # both versions x10 for 2 minutes at 6 min
    shared_noise: float = 0.0         # bursty errors: both versions' rates x Gamma shock
    own_noise: float = 0.0            # each version's rate x its own Gamma shock
    canary_noise: float = 0.0         # the canary's rate alone x a Gamma shock
    holds: tuple[float, ...] = HOLDS  # the staged policy both rules follow...
    deadline: float = DEADLINE        # ...and its progress deadline...
    weights: tuple[int, ...] = WEIGHTS  # ...and its weights
    restart_every: float = 0.0        # canary pods restart (counters to 0) this often
    per_pod: bool = False             # the gate reads each pod's counters, not their sum
    crash_failures: bool = False      # the canary's failures above stable's rate come with
    #                                   its crashes: the requests a dying pod drops, which
    #                                   users see and no counter of the pod ever counts
    restart_gate: bool = False        # the policy adds RESTART_GATE (docs/verdicts.md)

    def rates(self, t: float, rng: np.random.Generator) -> tuple[float, float]:
        p_c, p_s = self.canary(t), self.p_stable
        if self.burst and 360 <= t < 480:
            p_c, p_s = p_c * 10, p_s * 10
        if self.shared_noise:
            k = 1 / self.shared_noise
            shock = float(rng.gamma(k, 1 / k))
            p_c, p_s = p_c * shock, p_s * shock
        if self.own_noise:
            k = 1 / self.own_noise
            p_c, p_s = p_c * float(rng.gamma(k, 1 / k)), p_s * float(rng.gamma(k, 1 / k))
        if self.canary_noise:  # one canary pod wanders; stable's many average out
            k = 1 / self.canary_noise
            p_c = p_c * float(rng.gamma(k, 1 / k))
        return min(1.0, p_c), min(1.0, p_s)


def scenarios() -> list[Scenario]:
    def const(p: float) -> Callable[[float], float]:
        return lambda t: p

    out = [Scenario(f"healthy {p:.1%}", p, const(p), None) for p in (0.002, 0.005, 0.008)]
    out += [
        Scenario("burst on both", BASE, const(BASE), None, burst=True),
        Scenario("bursty, shared", BASE, const(BASE), None, shared_noise=1.0),
        Scenario("bursty, per version", BASE, const(BASE), None, own_noise=0.3),
        Scenario("bursty, canary only", BASE, const(BASE), None, canary_noise=0.3),
        Scenario("very bursty, canary only", BASE, const(BASE), None, canary_noise=1.0),
        Scenario("errors x2", BASE, const(BASE * 2), 0.0),
        Scenario("errors x2, base 0.4%", 0.004, const(0.008), 0.0),
        Scenario("errors x3, base 0.2%", 0.002, const(0.006), 0.0),
        Scenario("errors x5", BASE, const(BASE * 5), 0.0),
        Scenario("errors x10", BASE, const(BASE * 10), 0.0),
        Scenario("crash at start", BASE, const(1.0), 0.0),
        Scenario("crash at 10 min", BASE, lambda t: 1.0 if t >= 600 else BASE, 600.0),
        Scenario("crash at 30 min (45 min policy)", BASE,
                 lambda t: 1.0 if t >= 1800 else BASE, 1800.0, holds=SOAK_HOLDS,
                 deadline=SOAK_DEADLINE),
        Scenario("crash loop, 4 pods, x2, summed counters", BASE, const(BASE * 2), 0.0,
                 restart_every=120.0),
        Scenario("crash loop, 4 pods, x2, per-pod counters", BASE, const(BASE * 2), 0.0,
                 restart_every=120.0, per_pod=True),
        Scenario("crash loop, failures lost with the pods, per-pod counters", BASE,
                 const(BASE * 2), 0.0, restart_every=120.0, per_pod=True,
                 crash_failures=True),
        Scenario("crash loop, failures lost with the pods, + restarts gate", BASE,
                 const(BASE * 2), 0.0, restart_every=120.0, per_pod=True,
                 crash_failures=True, restart_gate=True),
        Scenario("slow leak", BASE, lambda t: BASE * (1 + 9 * min(1.0, t / 900)), 0.0),
        Scenario("healthy, 1% first stage", BASE, const(BASE), None, weights=ONE_PERCENT),
        # the same healthy weathers as at 5% (outage, bursts, wandering), so a fixed setting
        # compared with canary on the 1% policy must be as safe through them too
        Scenario("burst on both, 1% first stage", BASE, const(BASE), None, burst=True,
                 weights=ONE_PERCENT),
        Scenario("bursty, shared, 1% first stage", BASE, const(BASE), None, shared_noise=1.0,
                 weights=ONE_PERCENT),
        Scenario("bursty, per version, 1% first stage", BASE, const(BASE), None,
                 own_noise=0.3, weights=ONE_PERCENT),
        Scenario("errors x5, 1% first stage", BASE, const(BASE * 5), 0.0, weights=ONE_PERCENT),
    ]
    return out


@dataclass
class Pods:
    """A canary on 4 pods, each with its own counters, each restarting (its counters back
    to 0) at random, `restart_every` seconds apart on average: a crash loop."""

    req: list[float] = field(default_factory=lambda: [0.0] * 4)
    err: list[float] = field(default_factory=lambda: [0.0] * 4)
    restarts: list[float] = field(default_factory=list)  # when each restart was seen

    def restarted(self, t: float, window: float = 300.0) -> float:
        """Restarts in the last `window` seconds: what
        sum(increase(kube_pod_container_status_restarts_total{...}[5m])) reads."""
        return float(sum(1 for r in self.restarts if t - window < r <= t))

    def scrape(self, rng: np.random.Generator, n_c: int, e_c: int, counts: dict[str, float],
               sc: Scenario, t: float = 0.0) -> dict[str, float]:
        share = rng.multinomial(n_c, [0.25] * 4)
        errs = rng.multivariate_hypergeometric(share, e_c) if n_c else np.zeros(4, int)
        for i in range(4):
            if rng.random() < SCRAPE / sc.restart_every:
                # it crashed part-way through the interval: what it counted before the
                # crash was never scraped; it counts from 0 again after
                self.restarts.append(t)
                kept = rng.random()
                self.req[i] = float(round(share[i] * kept))
                self.err[i] = float(round(errs[i] * kept))
            else:
                self.req[i] += float(share[i])
                self.err[i] += float(errs[i])
        out = {**counts, "canary_requests": sum(self.req), "canary_errors": sum(self.err)}
        if sc.per_pod:
            out.update({f"canary_requests|pod={i}": self.req[i] for i in range(4)})
            out.update({f"canary_errors|pod={i}": self.err[i] for i in range(4)})
        return out


@dataclass
class Result:
    outcome: str          # "promoted" | "rolled_back" | "inconclusive"
    time: float           # when it ended
    excess: float         # canary errors above stable's rate, from onset to the end
    max_weight: int = 0   # the highest weight the canary reached
    hour: float = 0.0     # ...from onset to the row's horizon (an hour, or the policy's
    #                       deadline and holds if longer): a bad canary promoted goes on
    #                       serving all traffic until then, which `excess` stops counting


@dataclass
class Schedule:
    """The staged policy both rules follow, and the fixed rule's failed-check counter."""

    holds: tuple[float, ...] = HOLDS
    deadline: float = DEADLINE
    weights: tuple[int, ...] = WEIGHTS
    stage: int = 0
    since: float = 0.0
    failed: int = 0
    next_check: float = 0.0

    def check_due(self, t: float, interval: float) -> bool:
        if t + 1e-9 < self.next_check:
            return False
        self.next_check = t + interval
        return True

    def fixed_check(self, ok: bool, threshold: int) -> bool:
        """Count a failed check; True when the rule rolls back (cumulative count)."""
        if not ok:
            self.failed += 1
        return self.failed >= threshold

    def advance(self, t: float, ok: bool) -> str | None:
        """After a judgement: "promoted", "inconclusive" (deadline), or None to go on."""
        if t - self.since >= self.holds[self.stage] and ok:
            if self.stage == len(self.weights) - 1:
                return "promoted"
            self.stage, self.since = self.stage + 1, t
        elif t - self.since > self.deadline:
            return "inconclusive"
        return None


class Ours(DryRun):
    """canary's own state machine (canary.engine.decide, the controller's code) with the
    given `errors` gates, judging every scrape; the router applies each weight at once."""

    def __init__(self, gates: tuple[ErrorsGate | ThresholdGate, ...], holds: tuple[float, ...],
                 deadline: float,
                 weights: tuple[int, ...]) -> None:
        super().__init__(Policy(name="sim", stages=tuple(Stage(w, h) for w, h in
                                                         zip(weights, holds, strict=True)),
                                gates=gates, interval=SCRAPE, failure_limit=1,
                                no_data=NoData.HOLD, progress_deadline=deadline))

    def judge(self, t: float, raws: list[dict[str, float]],
              values: dict[str, tuple[float | None, float | None]] | None = None
              ) -> str | None:
        errors = [g for g in self.policy.gates if g.kind == "errors"]
        return self.step(t, {g.name: raw for g, raw in zip(errors, raws, strict=True)},
                         values)


def rate_ok(window: list[tuple[float, float]]) -> bool:
    """Flagger's check: the canary's error rate over the last minute within MAX_ERROR."""
    req = sum(r for r, _ in window)
    return req > 0 and sum(e for _, e in window) / req <= MAX_ERROR


def judge(ours: Ours | None, sch: Schedule, rule: tuple[int, int] | None, t: float,
          raws: list[dict[str, float]], fixed_ok: Callable[[Any], bool],
          window: Any) -> str | None:
    """One scrape's verdict: canary's state machine, or the fixed rule when its check is
    due (`fixed_ok(window)`: does the check on the last minute pass). "promoted",
    "rolled_back", "inconclusive", or None to go on."""
    if ours is not None:
        return ours.judge(t, raws)
    assert rule is not None
    interval, threshold = rule
    if not sch.check_due(t, interval):
        return None
    ok = fixed_ok(window)
    if sch.fixed_check(ok, threshold):
        return "rolled_back"
    return sch.advance(t, ok)


# Latency: a lognormal body (median 60 ms) with a 2% slow tail (median 250 ms), seen
# through Prometheus' default histogram buckets. The latency gates judge the share of
# requests slower than SLOW_AT (ours) or the p99 interpolated from the buckets (fixed).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
SLOW_AT = (0.1, 0.25)  # two boundaries: near stable's p80 and at its p99 (the SLO)
MAX_P99 = 0.5   # Flagger's request-duration default bound, 500 ms
LAT_GATES = tuple(  # one per boundary; alpha 0.005 each, 0.01 together
    ErrorsGate(name=f"slower-than-{b:g}s", requests="r{{ version }}",
         errors="e{{ version }}", tolerance=1.0, alpha=0.005, gross=3.0, final_gross=fg,
         detect_rate=0.05, warmup=120.0)
    for b, fg in zip(SLOW_AT, (1.5, 2.0), strict=True))
EXCESS_AT = 0.25  # "a bad request" in the latency rows: slower than stable's p99


def _lognorm_cdf(x: float, median: float, sigma: float) -> float:
    if x <= 0:
        return 0.0
    if math.isinf(x):
        return 1.0
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


def bucket_probs(shift_all: float, shift_tail: float) -> np.ndarray:
    """P(latency in each bucket) for the body+tail mixture, shifted by seconds."""
    cdf = np.array([0.98 * _lognorm_cdf(b - shift_all, 0.06, 0.5)
                    + 0.02 * _lognorm_cdf(b - shift_all - shift_tail, 0.25, 0.6)
                    for b in BUCKETS])
    return np.diff(np.concatenate([[0.0], cdf]))


def quantile(q: float, counts: np.ndarray) -> float | None:
    """histogram_quantile(q, ...): linear interpolation inside the bucket; None when the
    histogram is empty."""
    total = counts.sum()
    if total == 0:
        return None
    rank = q * total
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, rank))
    if math.isinf(BUCKETS[i]):
        return BUCKETS[i - 1]
    lo = BUCKETS[i - 1] if i else 0.0
    below = cum[i - 1] if i else 0.0
    return float(lo + (BUCKETS[i] - lo) * (rank - below) / max(counts[i], 1e-12))


def p99_from_buckets(counts: np.ndarray) -> float | None:
    return quantile(0.99, counts)


def p99_ok(window: list[np.ndarray]) -> bool:
    """Flagger's latency check: the p99 over the last minute within MAX_P99."""
    p99 = p99_from_buckets(np.sum(window, axis=0))
    return p99 is not None and p99 <= MAX_P99


@dataclass(frozen=True)
class LatencyScenario:
    name: str
    shift: Callable[[float], tuple[float, float]]  # time -> (shift all, shift tail), canary
    onset: float | None


def latency_scenarios() -> list[LatencyScenario]:
    return [
        LatencyScenario("latency healthy", lambda t: (0.0, 0.0), None),
        LatencyScenario("warm-up slowness (healthy)",
                        lambda t: (0.2, 0.0) if t < 90 else (0.0, 0.0), None),
        LatencyScenario("+50 ms everywhere", lambda t: (0.05, 0.0), 0.0),
        LatencyScenario("+50 ms in the tail only", lambda t: (0.0, 0.05), 0.0),
    ]


def simulate_latency(sc: LatencyScenario, rps: float, seed: int,
                     rule: tuple[int, int] | None) -> Result:
    """Ours: two `errors` gates on the share of requests slower than 100 ms and 250 ms
    (alpha 0.005 each, 0.01 together); fixed: p99 from the buckets against 500 ms."""
    rng = np.random.default_rng(seed)
    sch, t = Schedule(), 0.0
    counts = [dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                             "stable_errors"), 0.0) for _ in SLOW_AT]
    ours = Ours(LAT_GATES, HOLDS, DEADLINE, WEIGHTS) if rule is None else None
    base = bucket_probs(0.0, 0.0)
    at = [BUCKETS.index(b) + 1 for b in SLOW_AT]
    ex_at = BUCKETS.index(EXCESS_AT) + 1
    p_slow_base = float(base[ex_at:].sum())
    window: list[np.ndarray] = []
    excess, top = 0.0, 0
    while t < horizon(sc):
        w = (ours.weight if ours else WEIGHTS[sch.stage]) / 100
        top = max(top, round(w * 100))
        n = rng.poisson(rps * SCRAPE)
        n_c = int(rng.binomial(n, w))
        n_s = n - n_c
        probs = bucket_probs(*sc.shift(t))
        b_c = rng.multinomial(n_c, probs)
        b_s = rng.multinomial(n_s, base)
        t += SCRAPE
        if sc.onset is not None and t > sc.onset:
            excess += float(b_c[ex_at:].sum()) - n_c * p_slow_base
        for c, i in zip(counts, at, strict=True):
            c["canary_requests"] += n_c
            c["canary_errors"] += float(b_c[i:].sum())
            c["stable_requests"] += n_s
            c["stable_errors"] += float(b_s[i:].sum())
        window = [*window, b_c][-4:]
        end = judge(ours, sch, rule, t, counts, p99_ok, window)
        if end:
            return _ended(end, sc, rps, seed, t, excess, top)
    return _ended("inconclusive", sc, rps, seed, t, excess, top)


def simulate(sc: Scenario, rps: float, seed: int, rule: tuple[int, int] | None) -> Result:
    """One rollout. rule None: canary's gate; (interval, threshold): the fixed rule."""
    rng = np.random.default_rng(seed)
    sch, t = Schedule(holds=sc.holds, deadline=sc.deadline, weights=sc.weights), 0.0
    counts = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                            "stable_errors"), 0.0)
    gates: tuple[ErrorsGate | ThresholdGate, ...] = (GATE, RESTART_GATE) if sc.restart_gate \
        else (GATE,)
    ours = Ours(gates, sc.holds, sc.deadline, sc.weights) if rule is None else None
    window: list[tuple[float, float]] = []  # canary (requests, errors) per scrape, last 1 m
    excess, top = 0.0, 0
    pods = Pods()
    while t < horizon(sc):
        w = (ours.weight if ours else sch.weights[sch.stage]) / 100
        top = max(top, round(w * 100))
        n = rng.poisson(rps * SCRAPE)
        n_c = rng.binomial(n, w)
        n_s = n - n_c
        p_c, p_s = sc.rates(t, rng)
        e_c = rng.binomial(n_c, p_c)
        e_s = rng.binomial(n_s, p_s)
        t += SCRAPE
        if sc.onset is not None and t > sc.onset:
            excess += e_c - n_c * sc.p_stable
        counts["canary_requests"] += n_c
        counts["canary_errors"] += e_c
        counts["stable_requests"] += n_s
        counts["stable_errors"] += e_s
        seen = e_c
        if sc.crash_failures:  # only the part at stable's rate reaches a counter
            seen = int(rng.binomial(e_c, min(1.0, sc.p_stable / max(p_c, 1e-12))))
            counts["canary_errors"] += seen - e_c
        window = [*window, (n_c, seen)][-4:]
        raw = counts
        if sc.restart_every:
            raw = pods.scrape(rng, n_c, seen, counts, sc, t)
        values = {RESTART_GATE.name: (pods.restarted(t), None)} if sc.restart_gate else None
        if ours is not None and values:
            end = ours.judge(t, [raw], values)
        else:
            end = judge(ours, sch, rule, t, [raw], rate_ok, window)
        if end:
            return _ended(end, sc, rps, seed, t, excess, top)
    return _ended("inconclusive", sc, rps, seed, t, excess, top)


def _ended(end: str, sc: Any, rps: float, seed: int, t: float, excess: float,
           top: int) -> Result:
    """A rollout's Result; a promoted one goes on to the horizon for `hour`."""
    after = _after_promotion(sc, rps, seed, t) if end == "promoted" else 0.0
    return Result(end, t, excess, top, excess + after)


def horizon(sc: Any) -> float:
    """The common end every rule's excess is counted to, for `Result.hour`."""
    return max(MAX_TIME, getattr(sc, "deadline", 0.0) + sum(getattr(sc, "holds", ())))


def _after_promotion(sc: Any, rps: float, seed: int, t: float) -> float:
    """The excess bad requests a promoted bad canary serves from `t` to the horizon with
    all traffic (its own random stream: the rollout's draws stay those of `excess`)."""
    rng = np.random.default_rng([seed, 1])
    excess = 0.0
    if isinstance(sc, LatencyScenario):
        base = bucket_probs(0.0, 0.0)
        ex_at = BUCKETS.index(EXCESS_AT) + 1
        while t < horizon(sc):
            n = int(rng.poisson(rps * SCRAPE))
            b_c = rng.multinomial(n, bucket_probs(*sc.shift(t)))
            t += SCRAPE
            excess += float(b_c[ex_at:].sum()) - n * float(base[ex_at:].sum())
        return excess
    while t < horizon(sc):
        n = int(rng.poisson(rps * SCRAPE))
        p_c, _ = sc.rates(t, rng)
        t += SCRAPE
        excess += int(rng.binomial(n, p_c)) - n * sc.p_stable
    return excess


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def summarize(results: list[Result], sc: Any) -> dict[str, float]:
    n = len(results)
    rb = [r for r in results if r.outcome == "rolled_back"]
    out: dict[str, float] = {"n": n, "rolled_back": len(rb) / n,
                             "inconclusive": sum(r.outcome == "inconclusive" for r in results) / n}
    lo, hi = wilson(len(rb), n)
    out["rb_lo"], out["rb_hi"] = lo, hi
    if sc.onset is None:
        promoted = [r.time for r in results if r.outcome == "promoted"]
        out["promote_median_min"] = float(np.median(promoted)) / 60 if promoted else math.nan
    else:
        det = [r.time - sc.onset for r in rb if r.time >= sc.onset]  # (before: a false one)
        out["miss"] = 1 - len(rb) / n
        out["promoted"] = sum(r.outcome == "promoted" for r in results) / n
        out["reached_50"] = sum(r.max_weight >= 50 for r in results) / n
        out["detect_median_s"] = float(np.median(det)) if det else math.nan
        out["detect_p90_s"] = float(np.percentile(det, 90)) if det else math.nan
        out["excess_mean"] = float(np.mean([max(0.0, r.excess) for r in results]))
        out["hour_mean"] = float(np.mean([max(0.0, r.hour) for r in results]))
    return out


def peers(sc: Any, cases: list[Any]) -> list[str]:
    """The healthy scenarios a fixed setting must be as safe in as canary's gate before it
    may be compared on the bad scenario `sc`: those with the same stages at the same base
    error rate (steady, a shared outage, shared bursts, each version or the canary alone
    wandering), or, for a base rate no healthy scenario has, those at BASE."""
    if isinstance(sc, LatencyScenario):
        return [c.name for c in cases if isinstance(c, LatencyScenario) and c.onset is None]
    same = [c for c in cases if isinstance(c, Scenario) and c.onset is None
            and c.weights == sc.weights]
    at = [c.name for c in same if c.p_stable == sc.p_stable]
    return at or [c.name for c in same if c.p_stable == BASE]


def _cheapest(fixed: dict[tuple[int, int], dict[str, Any]],
              healthy: list[dict[tuple[int, int] | None, float]],
              cost: str = "excess_mean") -> tuple[int, int] | None:
    """The fixed setting with the fewest excess bad requests (`cost`: to the rollout's end,
    or to the horizon) among those whose false-rollback rate is at most canary's (or 1%)
    on every one of the `healthy` scenarios' rates."""
    ok = [k for k in fixed
          if all(g.get(k, 1.0) <= max(g.get(None, 0.0), 0.01) for g in healthy)]
    return min(ok, key=lambda k: fixed[k][cost]) if ok else None


def _rule_name(rule: tuple[int, int] | None, ran: bool) -> str:
    return (f"interval {rule[0]}s, threshold {rule[1]}" if rule
            else "none qualifies" if ran else "not run")


def _detection(d: dict[str, Any]) -> str:
    return f"{d.get('detect_median_s', math.nan):.0f} / {d.get('detect_p90_s', math.nan):.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--healthy-runs", type=int, default=2000)
    ap.add_argument("--bad-runs", type=int, default=300)
    ap.add_argument("--rps", type=float, nargs="*", default=[0.5, 2, 20, 200])
    ap.add_argument("--only", nargs="*", default=[""], help="run the scenarios whose name "
                    "contains one of these (the healthy baselines always run: the fair "
                    "comparison needs them)")
    ap.add_argument("--no-fixed", action="store_true", help="run canary's gate only (the "
                    "fixed rule's columns read '-'): the fixed rule does not change with "
                    "canary's code, and costs 12 times as much")
    ap.add_argument("--no-move-cap", action="store_true", help="let a stage move on whatever "
                    "the evidence against the canary (to measure what the cap buys)")
    ap.add_argument("--wander", type=float, default=None, help="the errors gate's `wander` "
                    "(default: the gate's default, 0.5): e.g. 0, for versions whose error "
                    "rates move only together")
    ap.add_argument("--detect-rate", type=float, default=None, help="the errors gate's "
                    "`detect_rate` (default: the gate's default, 0.01)")
    args = ap.parse_args()
    global GATE
    if args.wander is not None:
        GATE = replace(GATE, wander=args.wander)
    if args.detect_rate is not None:
        GATE = replace(GATE, detect_rate=args.detect_rate)
    if args.no_move_cap:
        from canary.gates import sequential

        sequential.move_cap = lambda gate: math.inf  # type: ignore[assignment]
    t0 = time.time()
    print(f"# {args.healthy_runs} runs per healthy condition, {args.bad_runs} per bad one; "
          f"error bound 1% for the fixed rule; alpha 0.01 for canary's gate"
          f"{'' if args.wander is None else f', wander {args.wander:g}'}"
          f"{'' if args.detect_rate is None else f', detect_rate {args.detect_rate:g}'}\n")
    print("| scenario | rps | canary: rolled back | canary: inconclusive | canary: promoted "
          "(bad) | canary: reached 50% (bad) | canary: detect "
          "median / p90 s | canary: excess bad | canary: promote min | best fixed rule "
          "(FR <= canary's or 1%) | its rolled back | its promoted (bad) | its detect "
          "median / p90 s | its excess bad | its promote min | best fixed rule fair under "
          "bursts too (FR <= canary's or 1% on every healthy row of its base) | its detect "
          "median / p90 s | its excess bad |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    per_rule: list[tuple[float, dict[str, dict[tuple[int, int] | None, float]]]] = []
    hours: list[tuple[str, float, dict[str, Any],
                      list[tuple[tuple[int, int] | None, dict[str, Any]]]]] = []
    for rps in args.rps:
        cases: list[tuple[Any, Callable[..., Result]]] = [(sc, simulate) for sc in scenarios()]
        cases += [(sc, simulate_latency) for sc in latency_scenarios()]
        wanted = [c for c in cases if any(o in c[0].name for o in args.only)]
        scs = [c[0] for c in cases]
        need = {c[0].name for c in wanted} | {n for sc, _ in wanted if sc.onset is not None
                                              for n in peers(sc, scs)}
        need |= {f"healthy {BASE:.1%}", "latency healthy"}
        healthy = [c for c in cases if c[0].onset is None and c[0].name in need]
        bad = [c for c in cases if c[0].onset is not None and c[0].name in need]
        # canary's and each fixed setting's false-rollback rate, per healthy scenario
        fr: dict[str, dict[tuple[int, int] | None, float]] = {}
        for sc, sim in healthy + bad:
            runs = args.healthy_runs if sc.onset is None else args.bad_runs
            seeds = range(runs)
            ours = summarize([sim(sc, rps, s, None) for s in seeds], sc)
            fixed = {rule: summarize([sim(sc, rps, s, rule) for s in seeds], sc)
                     for rule in ([] if args.no_fixed else FLAGGER)}
            isbad = sc.onset is not None
            if not isbad:
                fr[sc.name] = {None: ours["rolled_back"],
                               **{k: v["rolled_back"] for k, v in fixed.items()}}
                best = min(fixed, key=lambda k: fixed[k]["rolled_back"]) if fixed else None
            else:
                # the old criterion: as safe as canary on steady traffic at the base rate;
                # fair under bursts too: as safe on every healthy scenario of the same base
                # rate and stages (shared outages, bursts, wandering)
                steady_fr = [fr["latency healthy" if isinstance(sc, LatencyScenario)
                                else f"healthy {BASE:.1%}"]]
                peer_fr = [fr[n] for n in peers(sc, scs)]
                best = _cheapest(fixed, steady_fr)
            b = fixed[best] if best else {}
            rb = f"{ours['rolled_back']:.2%} [{ours['rb_lo']:.2%}, {ours['rb_hi']:.2%}]"
            det = _detection(ours) if isbad else "-"
            ex = f"{ours['excess_mean']:.1f}" if isbad else "-"
            pro = f"{ours['promote_median_min']:.1f}" if not isbad else "-"
            brb = f"{b['rolled_back']:.2%}" if b else "-"
            bdet = _detection(b) if b and isbad else "-"
            bex = f"{b['excess_mean']:.1f}" if b and isbad else "-"
            bpro = f"{b['promote_median_min']:.1f}" if b and not isbad else "-"
            prom = f"{ours['promoted']:.1%}" if isbad else "-"
            r50 = f"{ours['reached_50']:.1%}" if isbad else "-"
            bprom = f"{b['promoted']:.1%}" if b and isbad else "-"
            wide_cols = "- | - | -"
            if isbad:
                wide = _cheapest(fixed, peer_fr)
                w = fixed[wide] if wide else {}
                wex = f"{w['excess_mean']:.1f}" if w else "-"
                wide_cols = (f"{_rule_name(wide, bool(fixed))} | "
                             f"{_detection(w) if w else '-'} | {wex}")
            elif fixed:
                worst = max(fr[sc.name][k] for k in fixed)
                wide_cols = f"- | - | (fixed settings roll back up to {worst:.1%})"
            if isbad and fixed:
                steady = _cheapest(fixed, steady_fr, "hour_mean")
                safe = _cheapest(fixed, peer_fr, "hour_mean")
                hours.append((sc.name, rps, ours, [(k, fixed[k] if k else {})
                                                   for k in (steady, safe)]))
            print(f"| {sc.name} | {rps:g} | {rb} | {ours['inconclusive']:.1%} | {prom} | {r50} | "
                  f"{det} | {ex} | {pro} | {_rule_name(best, bool(fixed))} | {brb} | {bprom} | "
                  f"{bdet} | {bex} | {bpro} | {wide_cols} |", flush=True)
        if not args.no_fixed:  # why a fixed setting is or is not fair under bursts
            per_rule.append((rps, fr))
    if hours:
        print("\nexcess bad requests to the horizon (an hour from the start, or the policy's "
              "deadline and holds if longer), a bad canary that was promoted serving all "
              "traffic until then; each fixed setting picked as above, but by this cost:\n")
        print("| scenario | rps | canary: promoted | canary: excess bad to the horizon | best "
              "fixed rule (FR <= canary's or 1% on steady traffic) | its promoted | its "
              "excess bad to the horizon | best fixed rule as safe on every healthy row of "
              "its base | its promoted | its excess bad to the horizon |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, rps, ours, picks in hours:
            cols = " | ".join(f"{_rule_name(k, True)} | "
                              + (f"{d['promoted']:.1%} | {d['hour_mean']:.1f}" if d
                                 else "- | -") for k, d in picks)
            print(f"| {name} | {rps:g} | {ours['promoted']:.1%} | {ours['hour_mean']:.1f} | "
                  f"{cols} |")
    for rps, fr in per_rule:
        print(f"\nfixed settings at {rps:g} requests/s, each one's false rollbacks on the "
              f"healthy rows (canary's gate in brackets):")
        for rule in FLAGGER:
            rows = ", ".join(f"{n} {v[rule]:.1%} [{v[None]:.1%}]" for n, v in fr.items())
            print(f"- interval {rule[0]}s, threshold {rule[1]}: {rows}")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
