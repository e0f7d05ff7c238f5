"""A rollout run on the controller's own state machine (canary.engine.decide) without a
controller: the caller supplies readings, the router applies each weight at once.

Used by `canary plan --rps` (how long will this policy take on my traffic?) and by the
verdict benchmark (bench/verdicts/), so both measure exactly what production decides.
"""

from __future__ import annotations

from collections.abc import Mapping

from canary.engine import decide
from canary.model import Phase, Reading, Readings, Rollout, Verdict
from canary.policy import Policy


class DryRun:
    """One rollout of `policy`, started at time 0 with its first weight in force."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        r = decide.start(rollout_id="dry-run", target="dry-run", policy=policy,
                         canary_version="canary", stable_version="stable", now=0.0,
                         actor="dry-run")
        self.r: Rollout = decide.applied(r, r.weight, 0.0)

    @property
    def weight(self) -> int:
        """The canary weight in force (the router applies at once)."""
        return self.r.weight

    def step(self, t: float, raws: Mapping[str, Mapping[str, float]]) -> str | None:
        """One evaluation at time t. `raws` holds each `errors` gate's cumulative counters
        (canary_requests, canary_errors, stable_requests, stable_errors); every other gate
        reads as passing. Returns "promoted", "rolled_back", "inconclusive" (rolled back
        at the progress deadline), or None while the rollout goes on."""
        items = tuple(
            Reading(g.name, Verdict.PENDING, raw=dict(raws[g.name])) if g.kind == "errors"
            else Reading(g.name, Verdict.PASS, value=0.0)
            for g in self.policy.gates_for(self.r.stage))
        r = decide.tick(decide.readings(self.r, self.policy, Readings(t, self.r.stage, items),
                                        t), self.policy, t)
        if r.weight != r.applied_weight:
            r = decide.tick(decide.applied(r, r.weight, t), self.policy, t)
        self.r = r
        if r.state is Phase.ROLLED_BACK:
            return "inconclusive" if (r.reason or "").startswith("no progress") else \
                "rolled_back"
        return "promoted" if r.state is Phase.SUCCEEDED else None
