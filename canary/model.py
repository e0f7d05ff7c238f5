"""The rollout record and what acts on it: Phase, Event, GateStatus, Command, Reading.

Frozen dataclasses only; the JSON form here is both the stored form and the API's.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, overload

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from canary import shapes

# a version's character set, for the whole string (interface.md section 3)
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"


class Phase(enum.StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"  # weight 0 decided, not yet confirmed by the router
    PROMOTING = "promoting"  # 100% reached and passed; hand-over in progress (return mode)
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK)


class PauseKind(enum.StrEnum):
    MANUAL = "manual"      # on-call said pause
    APPROVAL = "approval"  # an approval stage waits for promote
    DRIFT = "drift"        # someone changed the weights outside canary
    ROUTER = "router"      # the router could not apply the next weight
    HANDOVER = "handover"  # a hand-over did not complete within progress_deadline


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"
    ERROR = "error"
    PENDING = "pending"  # not evaluated at this stage yet
    INCONCLUSIVE = "inconclusive"  # a sequential gate has not seen enough yet: hold


class CommandKind(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"
    HANDOVER = "handover"  # the stable side now runs the canary version: return the traffic


@dataclass(frozen=True)
class Command:
    kind: CommandKind
    actor: str
    reason: str
    full: bool = False


@dataclass(frozen=True)
class Reading:
    """One gate's measurement and verdict at one evaluation."""

    gate: str
    verdict: Verdict
    value: float | None = None
    detail: str | None = None
    raw: dict[str, float | None] | None = None  # counters, for gates judged with state


@dataclass(frozen=True)
class Readings:
    at: float    # when the queries were sent
    stage: int   # the stage they were taken for
    items: tuple[Reading, ...]


@dataclass(frozen=True)
class Event:
    at: float
    type: str
    message: str
    actor: str = "controller"


@dataclass(frozen=True)
class GateStatus:
    name: str
    min: float | None
    max: float | None
    status: Verdict = Verdict.PENDING
    value: float | None = None
    failures: int = 0
    at: float | None = None
    detail: str | None = None
    state: dict[str, Any] | None = None  # a sequential gate's evidence so far


class GateView(BaseModel):
    """One gate of a rollout, as the API shows it."""

    name: str
    value: float | None = Field(description="the latest reading (for an errors gate: the "
                                            "log10 evidence that the canary is worse)")
    status: Verdict
    failures: int
    min: float | None = None
    max: float | None = None
    at: str | None = None
    detail: str | None = None
    kind: Literal["errors"] | None = None

    @model_serializer(mode="wrap")
    def _present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # optional fields are left out when empty; value, status and failures never are
        out: dict[str, Any] = handler(self)
        return {k: v for k, v in out.items() if v is not None or k == "value"}


class EventView(BaseModel):
    at: str
    type: str
    message: str
    actor: str


class RolloutSummary(BaseModel):
    """A rollout in a listing: all of it but its events."""

    id: str
    target: str
    policy: str
    canary_version: str
    stable_version: str | None
    state: Phase
    stage: int
    weight: int = Field(ge=0, le=100)
    applied_weight: int | None
    reason: str | None
    paused_for: PauseKind | None
    started_at: str
    updated_at: str
    stage_since: str | None
    gates: list[GateView]
    shape: str | None = Field(default=None, description="a match or mirror stage's shape in "
                                                        "words (weight is 0 for users then)")
    to_side: Literal["stable", "canary"] = Field(
        "canary", description="the configured side the new version runs on, the one this "
                              "rollout shifts traffic to (the other side serves the stable "
                              "version)")
    promotion: Literal["swap", "return"] = "swap"


class RolloutView(RolloutSummary):
    """A rollout as the API shows it (README: HTTP API)."""

    events: list[EventView]


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: float | None) -> str | None: ...
def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Rollout:
    id: str
    target: str
    policy: str
    policy_spec: dict[str, Any] = field(compare=False)  # the policy as it was at start
    canary_version: str
    stable_version: str | None
    state: Phase
    stage: int
    weight: int                       # the weight canary wants in force
    started_at: float
    updated_at: float
    reason: str | None = None
    applied_weight: int | None = None  # the weight the router is known to carry
    stage_since: float | None = None   # when this stage's weight came into force
    paused_at: float | None = None
    pause_kind: PauseKind | None = None
    finishing: bool = False            # succeed as soon as weight 100 is in force
    pre_rollout: bool = False          # at weight 0, waiting for the pre-rollout hooks
    # per notification receiver, how many of the rollout's events it has been sent (and
    # `NAME#...` keys for its approval reminders): the outbox's cursor (canary/notify.py)
    delivered: dict[str, int] = field(default_factory=dict)
    # a match or mirror stage's shape (shapes.Shape.key) canary wants in force, and the one
    # the router is known to carry; None: no match rule or mirror
    shape: str | None = None
    applied_shape: str | None = None
    # which configured side the new version runs on ("canary", or "stable" when the sides
    # have swapped): the rollout's weight is the share of that side
    to_side: str = "canary"
    promotion: str = "swap"            # swap | return, fixed at start
    promoting_since: float | None = None  # when the hand-over began (return mode)
    returning: bool = False            # handed over: succeed once weight 0 is in force
    waiting_since: float | None = None  # held before a step until the canary workload is ready
    gates: tuple[GateStatus, ...] = ()
    events: tuple[Event, ...] = ()
    version: int = 0                   # the store's optimistic-concurrency counter

    def to_api(self) -> dict[str, Any]:
        view = RolloutView(
            id=self.id, target=self.target, policy=self.policy,
            canary_version=self.canary_version, stable_version=self.stable_version,
            state=self.state, stage=self.stage, weight=self.weight,
            applied_weight=self.applied_weight, reason=self.reason,
            paused_for=self.pause_kind, started_at=iso(self.started_at),
            updated_at=iso(self.updated_at), stage_since=iso(self.stage_since),
            to_side="stable" if self.to_side == "stable" else "canary",
            promotion="return" if self.promotion == "return" else "swap",
            gates=[GateView(name=g.name, value=g.value, min=g.min, max=g.max, status=g.status,
                            failures=g.failures, at=iso(g.at), detail=g.detail,
                            kind="errors" if g.state is not None else None)
                   for g in self.gates],
            shape=shapes.describe(self.shape) if self.shape else None,
            events=[EventView(at=iso(e.at), type=e.type, message=e.message, actor=e.actor)
                    for e in self.events])
        out: dict[str, Any] = view.model_dump(mode="json")
        return out

    def to_store(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("version")
        return d

    @classmethod
    def from_store(cls, d: dict[str, Any], *, version: int) -> Rollout:
        d = dict(d)
        d["state"] = Phase(d["state"])
        d["pause_kind"] = PauseKind(d["pause_kind"]) if d.get("pause_kind") else None
        d["gates"] = tuple(GateStatus(**{**g, "status": Verdict(g["status"])}) for g in d["gates"])
        d["events"] = tuple(Event(**e) for e in d["events"])
        return cls(**d, version=version)


def _other(side: str) -> str:
    return "stable" if side == "canary" else "canary"


@dataclass(frozen=True)
class Sides:
    """Which configured side of a target serves the stable version, and what each side
    runs when known. Stored with the target; written when a rollout ends, and rebuilt
    from that rollout if a crash came in between (`after`)."""

    serving: str = "stable"
    stable_runs: str | None = None   # the version on the side configured as `stable`
    canary_runs: str | None = None   # ... and on the side configured as `canary`
    rollout: str | None = None       # the finished rollout that left the target so

    @property
    def deploy_to(self) -> str:
        return _other(self.serving)

    def runs(self, side: str) -> str | None:
        return self.stable_runs if side == "stable" else self.canary_runs

    def to_store(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_store(cls, d: dict[str, Any]) -> Sides:
        def text(key: str) -> str | None:
            value = d.get(key)
            return value if isinstance(value, str) else None
        return cls(serving=text("serving") or "stable", stable_runs=text("stable_runs"),
                   canary_runs=text("canary_runs"), rollout=text("rollout"))

    @classmethod
    def after(cls, r: Rollout) -> Sides:
        """Where a finished rollout left the target."""
        new, old = r.to_side, _other(r.to_side)
        runs: dict[str, str | None]
        if r.state is Phase.SUCCEEDED and r.promotion == "return":
            serving, runs = old, {old: r.canary_version, new: r.canary_version}
        elif r.state is Phase.SUCCEEDED:
            serving, runs = new, {new: r.canary_version, old: r.stable_version}
        else:
            serving, runs = old, {old: r.stable_version, new: r.canary_version}
        return cls(serving=serving, stable_runs=runs["stable"], canary_runs=runs["canary"],
                   rollout=r.id)
