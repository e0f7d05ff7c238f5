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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GRID = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0)  # ratios of error rates, x tolerance


@dataclass(frozen=True)
class ErrorGate:
    tolerance: float = 1.0        # healthy: canary rate <= stable rate x tolerance
    alpha: float = 0.01           # false-rollback budget per rollout
    gross: float = 5.0            # the regression a stage must have been able to catch
    final_gross: float | None = None  # ...before the step to 100% (non-inferiority margin)
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

    def to_json(self) -> dict[str, Any]:
        return {"last": self.last, "t": self.t, "s": self.s, "stage": self.stage,
                "first_at": self.first_at}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> State:
        if not d:
            return cls()
        return cls(last=dict(d.get("last", {})), t=int(d.get("t", 0)),
                   s=list(d.get("s", [0.0] * len(GRID))), stage=dict(d.get("stage", {})),
                   first_at=d.get("first_at"))


def _delta(new: float, old: float | None) -> float:
    """Counter increase, handling resets (a counter that went down restarted from 0)."""
    if old is None:
        return 0.0
    return new if new < old else new - old


def _pi(n_c: float, n_s: float, r: float) -> float:
    return n_c * r / (n_c * r + n_s)


def _log_lr(e_c: float, e_s: float, pi_k: float, pi_0: float) -> float:
    return e_c * math.log(pi_k / pi_0) + e_s * math.log((1 - pi_k) / (1 - pi_0))


def evidence(state: State) -> float:
    """The mixture statistic M_t: >= 1/alpha means the canary is worse than tolerated."""
    pending = 1.0 / (state.t + 1)  # q mass of change points not yet reached
    return sum(state.s) / len(GRID) + pending


def step(gate: ErrorGate, state: State, e_c: float, n_c: float, e_s: float,
         n_s: float) -> State:
    """Fold one interval's counts into the statistic."""
    if e_c + e_s <= 0 or n_c <= 0 or n_s <= 0:
        return state  # no errors, or one side idle: the split says nothing
    t = state.t + 1
    q = 1.0 / (t * (t + 1))
    pi_0 = _pi(n_c, n_s, gate.tolerance)
    s = []
    for k, r in enumerate(GRID):
        pi_k = _pi(n_c, n_s, gate.tolerance * r)
        lr = math.exp(min(700.0, _log_lr(e_c, e_s, pi_k, pi_0)))
        s.append((state.s[k] + q) * lr)
    return State(last=state.last, t=t, s=s, stage=state.stage, first_at=state.first_at)


def could_detect(gate: ErrorGate, stage: dict[str, float], gross: float | None = None) -> bool:
    """Would a gross regression have fired on the traffic this stage has seen? Replays
    the stage's totals as one interval with the canary failing at the gross rate."""
    gross = gross or gate.gross
    n_c, n_s, e_s = stage.get("n_c", 0.0), stage.get("n_s", 0.0), stage.get("e_s", 0.0)
    if n_c <= 0 or n_s <= 0:
        return False
    p_s = e_s / n_s
    p_bad = min(0.99, max(gross * gate.tolerance * p_s, gate.detect_rate))
    e_c = n_c * p_bad
    pi_0 = _pi(n_c, n_s, gate.tolerance)
    best = max(_log_lr(e_c, e_s, _pi(n_c, n_s, gate.tolerance * r), pi_0) for r in GRID)
    # the full mixture pays log(#grid) and the change-point prior; be as strict
    return best - math.log(len(GRID)) - math.log(2) >= math.log(1 / gate.alpha)


@dataclass(frozen=True)
class Outcome:
    verdict: str          # "fail" | "pass" | "inconclusive" | "no_data"
    value: float | None   # log10 of the evidence (>= log10(1/alpha) fires)
    detail: str
    state: State


def update(gate: ErrorGate, state: State, raw: dict[str, float | None],
           *, new_stage: bool = False, before_full: bool = False, now: float = 0.0) -> Outcome:
    """One evaluation: raw holds the counters `canary_requests`, `canary_errors`,
    `stable_requests`, `stable_errors` (None where the query had no sample)."""
    if new_stage:
        state = State(last=state.last, t=state.t, s=state.s, stage={}, first_at=state.first_at)
    if any(raw.get(k) is None for k in ("canary_requests", "stable_requests")):
        return Outcome("no_data", None, "no request counters yet", state)
    cur = {k: float(v or 0.0) for k, v in raw.items()}
    first = not state.last
    d = {k: _delta(cur[k], state.last.get(k)) for k in cur}
    state = State(last=cur, t=state.t, s=state.s, stage=dict(state.stage),
                  first_at=now if first else state.first_at)
    if first:
        return Outcome("inconclusive", None, "first reading; counting from here", state)
    warming = state.first_at is not None and now - state.first_at < gate.warmup
    n_c, e_c = d["canary_requests"], min(d["canary_errors"], d["canary_requests"])
    n_s, e_s = d["stable_requests"], min(d["stable_errors"], d["stable_requests"])
    for k, v in (("n_c", n_c), ("e_c", e_c), ("n_s", n_s), ("e_s", e_s)):
        state.stage[k] = state.stage.get(k, 0.0) + v
    if warming:
        # a canary warming up (cold caches, JIT) is slow or flaky for a while: this gate
        # does not judge it until `warmup` has passed (give crash-catching gates none)
        return Outcome("inconclusive", None, f"warming up for {gate.warmup:g}s", state)
    if (n_c >= gate.guard_min and e_c >= gate.guard_share * n_c
            and e_s < gate.guard_share * n_s):  # (both failing is an outage, not the canary)
        return Outcome("fail", None, f"hard guard: canary failed {e_c:.0f} of {n_c:.0f} "
                                     "requests in one interval", state)
    state = step(gate, state, e_c, n_c, e_s, n_s)
    m = evidence(state)
    value = math.log10(m) if m > 0 else None
    st = state.stage
    rates = (f"canary {st.get('e_c', 0):.0f}/{st.get('n_c', 0):.0f} errors, stable "
             f"{st.get('e_s', 0):.0f}/{st.get('n_s', 0):.0f} this stage")
    if m >= 1 / gate.alpha:
        return Outcome("fail", value, f"canary's error rate is above stable's x "
                                      f"{gate.tolerance:g} (evidence {m:.3g} >= "
                                      f"{1 / gate.alpha:g}); {rates}", state)
    gross = (gate.final_gross or gate.gross) if before_full else gate.gross
    if could_detect(gate, state.stage, gross):
        return Outcome("pass", value, rates, state)
    if n_s == 0 and n_c > 0:
        # at 100% there is nothing to compare with: the stages before judged the canary
        # (and the hard guard still watches it)
        return Outcome("pass", value, f"stable serves no traffic at this weight; judged by "
                                      f"the stages before; {rates}", state)
    return Outcome("inconclusive", value, f"not enough canary traffic yet to rule out a "
                                          f"{gross:g}x regression; {rates}", state)
