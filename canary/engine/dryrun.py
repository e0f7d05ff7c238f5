"""A rollout run on the controller's own state machine (canary.engine.decide) without a
controller: the caller supplies readings, the router applies each weight at once.

Used by `canary plan --rps` (how long will this policy take on my traffic?) and by the
verdict benchmark (bench/verdicts/), so both measure exactly what production decides.
`shape_of` says what a gate's query measures, for the query shapes the shipped policies
use, so the plan and the benchmark can feed every gate kind, and name the gates they
cannot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from canary.engine import decide
from canary.fields import parse_duration
from canary.gates.evaluate import judge, judge_compare
from canary.gates.kinds import Gate
from canary.hooks import HOOK_PREFIX
from canary.model import Command, CommandKind, PauseKind, Phase, Reading, Readings, Rollout, Verdict
from canary.policy import Policy

# what a threshold or compare gate reads: (canary value, stable value); None: no sample
Values = tuple[float | None, float | None]


@dataclass(frozen=True)
class Shape:
    """What a query measures, for the shapes canary can model: `error_ratio` (5xx share
    over a window), `request_rate` (requests/s over a window), `quantile` (a
    histogram_quantile over a window), `request_count` (an increase over a window), and
    raw counters: `requests`, `errors` (5xx count) or `slow` (requests slower than `le`),
    as an `errors` gate reads them."""

    measure: str
    window: float = 0.0
    q: float = 0.0
    le: float = 0.0
    floor: float = 0.0   # an error ratio's denominator clamped to at least this many
    min_count: float = 0.0  # a quantile read only over at least this many requests


_WINDOW = re.compile(r"\[(\d+(?:\.\d+)?(?:ms|s|m|h))\]")
_QUANTILE = re.compile(r"histogram_quantile\(\s*([0-9.]+)")
_LE = re.compile(r'le="([0-9.]+)"')
_5XX = re.compile(r'code=~"5\.\."')
_MIN_COUNT = re.compile(r"\)\s*and\s+on\(\)\s*\(?\s*sum\(increase\([^)]*_count[^)]*\)\)"
                        r"\s*>=?\s*([0-9.]+)\s*\)?\s*$")
_FLOOR = re.compile(r"clamp_min\((?:.|\n)*,\s*([0-9.]+)\s*\)\s*$")


def shape_of(query: str) -> Shape | None:
    """The shape of one query, or None when canary cannot model it."""
    window = _WINDOW.search(query)
    w = parse_duration(window.group(1)) if window else 0.0
    if m := _QUANTILE.search(query):
        least = _MIN_COUNT.search(query.strip())
        return Shape("quantile", w, q=float(m.group(1)),
                     min_count=float(least.group(1)) if least else 0.0) if w else None
    if "_bucket" in query and (le := _LE.search(query)) and "_count" in query:
        return Shape("slow", le=float(le.group(1)))
    if _5XX.search(query):
        if "/" in query:
            floor = _FLOOR.search(query.strip())
            return Shape("error_ratio", w, floor=float(floor.group(1)) if floor else 0.0) \
                if w else None
        return None if w else Shape("errors")
    if "/" not in query and ("requests_total" in query or "_count" in query):
        if not w:
            return Shape("requests")
        # increase() counts the window's requests; rate() divides them by its length
        return Shape("request_count" if "increase(" in query else "request_rate", w)
    return None


def unmodelled(policy: Policy) -> list[str]:
    """Gates whose queries canary cannot model (their names, once each)."""
    out: list[str] = []
    for i in range(len(policy.stages)):
        for g in policy.gates_for(i):
            if any(shape_of(q) is None for q in g.queries()) and g.name not in out:
                out.append(g.name)
    return out


class DryRun:
    """One rollout of `policy`, started at time 0 with its first weight in force. An
    approval stage is approved at once (a person's wait is not the policy's)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        r = decide.start(rollout_id="dry-run", target="dry-run", policy=policy,
                         canary_version="canary", stable_version="stable", now=0.0,
                         actor="dry-run")
        self.r: Rollout = decide.applied(r, r.weight, 0.0, shape=r.shape)

    @property
    def weight(self) -> int:
        """The canary weight in force (the router applies at once)."""
        return self.r.weight

    def step(self, t: float, raws: Mapping[str, Mapping[str, float | None]],
             values: Mapping[str, Values] | None = None) -> str | None:
        """One evaluation at time t. `raws` holds each `errors` gate's cumulative counters
        (canary_requests, canary_errors, stable_requests, stable_errors); `values` each
        threshold gate's value (the first of the pair) and each compare gate's (canary,
        stable). A gate in neither reads as passing, and so does every gating webhook.
        Returns "promoted", "rolled_back", "inconclusive" (rolled back at the progress
        deadline), or None while the rollout goes on."""
        values = values or {}
        items = []
        for g in self.policy.gates_for(self.r.stage):
            if g.kind == "errors":
                items.append(Reading(g.name, Verdict.PENDING, raw=dict(raws[g.name]))
                             if g.name in raws else Reading(g.name, Verdict.PASS, value=0.0))
            elif g.name in values:
                c, s = values[g.name]
                items.append(judge_compare(g, c, s) if g.kind == "compare" else judge(g, c))
            else:
                items.append(Reading(g.name, Verdict.PASS, value=0.0))
        # a gating webhook's answer is not known here: it says yes
        items.extend(Reading(g.name, Verdict.PASS, detail="dry run: answered 2xx")
                     for g in self.r.gates if g.name.startswith(HOOK_PREFIX))
        r = decide.tick(decide.readings(self.r, self.policy, Readings(t, self.r.stage,
                                                                      tuple(items)), t),
                        self.policy, t)
        if r.state is Phase.PAUSED and r.pause_kind is PauseKind.APPROVAL:
            r = decide.command(r, self.policy, Command(CommandKind.PROMOTE, "dry-run",
                                                       "approved"), t)
        if r.weight != r.applied_weight or r.shape != r.applied_shape:
            r = decide.tick(decide.applied(r, r.weight, t, shape=r.shape), self.policy, t)
        self.r = r
        if r.state is Phase.ROLLED_BACK:
            return "inconclusive" if (r.reason or "").startswith("no progress") else \
                "rolled_back"
        return "promoted" if r.state is Phase.SUCCEEDED else None


def gate_shapes(g: Gate) -> tuple[Shape | None, ...]:
    """The shapes of a gate's queries: (requests, errors) for an `errors` gate, else the
    query's (and the baseline's)."""
    return tuple(shape_of(q) for q in g.queries())
