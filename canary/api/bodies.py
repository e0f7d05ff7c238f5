"""The API's request and response bodies, each written once as a model: the handlers
validate with them, and the OpenAPI description (api/openapi.py) is generated from them.

Responses are typed here too (`RolloutView` and friends in canary/model.py build the
rollout's JSON), so a response that drifts from its schema fails the fuzzing test,
which validates every response against the description.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from canary.errors import InvalidInput
from canary.fields import Version
from canary.model import (
    EventView,
    GateView,
    Phase,
    RolloutSummary,
    RolloutView,
    Verdict,
)
from canary.policy import Policy
from canary.text import CONTROL_PATTERN, is_control

MAX_TEXT = 1000


def _plain(value: str) -> str:
    bad = next((c for c in value if is_control(c)), None)
    if bad is not None:
        raise ValueError(f"contains the control character U+{ord(bad):04X}; send plain text on "
                         "one line (no line breaks, tabs, escape sequences or bidi controls)")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("required, a non-empty string")
    return value


Plain = Annotated[str, Field(max_length=MAX_TEXT, json_schema_extra={
    "not": {"pattern": CONTROL_PATTERN}}), AfterValidator(_plain)]
Required = Annotated[Plain, Field(min_length=1, json_schema_extra={"pattern": r"\S"}),
                     AfterValidator(_not_blank)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StartRollout(_Body):
    """POST /api/v1/rollouts"""

    target: Required
    canary_version: Version
    stable_version: Version | None = None
    policy: Required | None = None  # (left out: the target's own; "" names no policy)


class Override(_Body):
    """POST /api/v1/rollouts/{id}/pause, resume and abort: who asks is the token; why is
    the reason, kept as an event."""

    reason: Required


class Promote(Override):
    """POST /api/v1/rollouts/{id}/promote; `full` goes straight to 100%."""

    full: bool = False


class _Relaxed(_Body):
    """A body another program writes (Alertmanager): fields it may add later are ignored."""

    model_config = ConfigDict(extra="ignore")


LabelSet = Annotated[dict[Annotated[str, Field(max_length=1024)],
                          Annotated[str, Field(max_length=MAX_TEXT * 4)]],
                     Field(max_length=1000)]


class AlertmanagerAlert(_Relaxed):
    """One alert of an Alertmanager webhook."""

    status: Literal["firing", "resolved"]
    labels: LabelSet
    annotations: LabelSet = {}
    startsAt: str | None = None
    endsAt: str | None = None
    generatorURL: str | None = None
    fingerprint: str | None = None


class AlertmanagerWebhook(_Relaxed):
    """POST /api/v1/alerts: Alertmanager's webhook payload, version 4
    (prometheus.io/docs/alerting/latest/configuration/#webhook_config)."""

    version: Literal["4"]
    alerts: Annotated[list[AlertmanagerAlert], Field(max_length=10_000)]
    status: Literal["firing", "resolved"] | None = None
    receiver: str | None = None
    groupKey: str | None = None
    truncatedAlerts: int | None = None
    groupLabels: LabelSet = {}
    commonLabels: LabelSet = {}
    commonAnnotations: LabelSet = {}
    externalURL: str | None = None


class AlertsAnswer(BaseModel):
    rolled_back: list[str] = Field(description="ids of the rollouts these alerts rolled back")


class Error(_Body):
    error: str = Field(description="what is wrong and how to fix it")


class RolloutList(BaseModel):
    """GET /api/v1/rollouts: one page, newest first."""

    rollouts: list[RolloutSummary]
    next: str | None = Field(description="the `before` of the next page; null on the last")


class TargetView(BaseModel):
    name: str
    router: Literal["nginx", "istio", "gateway"]
    policy: str | None
    vars: dict[str, str]
    stable_version: str | None
    live_weight: int | None
    warning: str | None = None
    file: str | None = None
    upstream: str | None = None
    stable: list[str] | None = None
    canary: list[str] | None = None
    namespace: str | None = None
    virtual_service: str | None = None
    route: str | None = None
    http_route: str | None = None
    rule: str | int | None = None


Side = Literal["stable", "canary"]


class SideRuns(BaseModel):
    stable: str | None = Field(description="the version the side configured as `stable` "
                                           "runs, when known")
    canary: str | None = Field(description="... and the side configured as `canary`")


class ActiveOnTarget(BaseModel):
    state: str
    weight: int
    to_side: Side
    canary_version: str


class TargetDetail(BaseModel):
    """GET /api/v1/targets/{name} (README: The release cycle)."""

    name: str
    router: Literal["nginx", "istio", "gateway"]
    policy: str | None
    promotion: Literal["swap", "return"]
    live_weight: int | None = Field(description="the configured canary side's live share "
                                                "in percent")
    active_rollout: str | None
    serving: Side = Field(description="the side that carries the stable version now")
    deploy_to: Side = Field(description="the side where the next version must be deployed")
    runs: SideRuns
    active: ActiveOnTarget | None = None
    servers: dict[Side, list[str]] | None = None
    version_probe: str | None = None
    destinations: dict[Side, dict[str, str | None]] | None = None
    workload: dict[Side, str] | None = None
    warning: str | None = None


class TargetList(BaseModel):
    targets: list[TargetView]


class PolicyList(BaseModel):
    policies: list[Policy] = Field(
        description="each policy as its file says it (`canary schema policy`)")


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    policies: int
    active_rollouts: int
    leader: bool


class WeightPoint(BaseModel):
    at: str = Field(description="when the router was known to carry this weight")
    weight: int = Field(ge=0, le=100, description="percent of traffic to the canary")
    stage: int


class GateReading(BaseModel):
    """One evaluation of one gate."""

    at: str
    stage: int
    weight: int | None = Field(description="the canary weight in force when it was read")
    verdict: Verdict
    value: float | None = Field(description="the gate's value (for an errors gate: log10 of "
                                            "the evidence that the canary is worse)")
    min: float | None = None
    max: float | None = Field(default=None, description="the upper bound (for an errors gate: "
                                                        "the evidence's threshold, log10)")
    detail: str | None = None
    stable: float | None = Field(default=None, description="compare gate: stable's value")
    bound: float | None = Field(default=None, description="compare gate: the highest canary "
                                                          "value allowed against stable's")
    canary_requests: float | None = Field(default=None, description="errors gate: this "
                                          "stage's canary requests so far")
    canary_errors: float | None = None
    stable_requests: float | None = None
    stable_errors: float | None = None


class GateHistory(BaseModel):
    name: str
    kind: Literal["threshold", "compare", "errors"]
    readings: list[GateReading]


class ReadingsView(BaseModel):
    """GET /api/v1/rollouts/{id}/readings: the rollout's history, oldest first."""

    id: str
    state: Phase
    started_at: str
    updated_at: str
    weights: list[WeightPoint]
    gates: list[GateHistory]
    downsampling: str = Field(description="how a long rollout's history is thinned")


class WhoAmI(BaseModel):
    """GET /api/v1/whoami: the calling token, so a page can show what it may do."""

    name: str
    role: Literal["viewer", "pipeline", "oncall"]
    targets: list[str] | None = Field(description="the target globs it may see; null: all")
    may: list[str] = Field(description="the actions it may take: start, pause, resume, "
                                       "promote, abort, ...")


_VERSION_MESSAGE = "must be 1-128 letters, digits or ._:+- starting with a letter or digit"
_MESSAGES = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "missing": "required, a non-empty string",
    # (a constraint after a validator is checked as a sequence's length: too_short)
    **dict.fromkeys(("string_too_short", "too_short"), "required, a non-empty string"),
    # JSON may escape half of a UTF-16 pair ("\ud800"), which is no character at all
    "string_unicode": "must be text of whole characters: it holds a lone UTF-16 surrogate "
                      "(an escape like \\ud800 without its pair); send the character itself",
    **dict.fromkeys(("int_type", "int_from_float", "int_parsing"), "must be a whole number"),
}


# what a missing field that is not text is (the others: "required, a non-empty string")
_REQUIRED = {
    "version": 'required: "4", the version of Alertmanager\'s webhook payload',
    "alerts": "required: a list of alerts, each with status and labels",
    "status": "required: firing or resolved",
    "labels": "required: a JSON object of label names and values",
}


def parse(model: type[_Body], data: Any) -> Any:
    """`data` (a decoded JSON object) as `model`, or InvalidInput naming each field that
    is wrong and how to fix it."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        out = []
        for err in e.errors(include_url=False):
            field = ".".join(str(p) for p in err["loc"]) or "body"
            kind = err["type"]
            if kind == "extra_forbidden":
                message = f"unknown field; expected {', '.join(model.model_fields)}"
            elif kind == "value_error":
                message = str((err.get("ctx") or {}).get("error", err["msg"]))
            elif kind == "string_pattern_mismatch" and field.endswith("_version"):
                message = f"{err.get('input')!r} {_VERSION_MESSAGE}"
            elif kind in ("model_type", "dict_type"):
                message = "must be a JSON object"
            elif kind == "missing" and str(err["loc"][-1]) in _REQUIRED:
                message = _REQUIRED[str(err["loc"][-1])]
            elif kind == "literal_error":
                message = f"must be {(err.get('ctx') or {}).get('expected', err['msg'])}"
            elif kind == "list_type":
                message = "must be a list"
            elif kind in ("string_too_long", "too_long"):
                # the field's own limit (a label value may be 4,000 characters, a label
                # name 1,024), not one number for all
                most = (err.get("ctx") or {}).get("max_length", MAX_TEXT)
                message = (f"at most {most} characters" if kind == "string_too_long"
                           else f"at most {most} entries")
            else:
                message = _MESSAGES.get(kind, err["msg"])
            if field == "policy" and message == _MESSAGES["string_too_short"]:
                message = ("must name a policy (GET /api/v1/policies lists them), or be left "
                           "out for the target's own")
            out.append(f"{field}: {message}")
        raise InvalidInput("; ".join(out)) from None


__all__ = ["AlertmanagerWebhook", "AlertsAnswer", "Error", "EventView", "GateView", "Override",
           "Promote", "ReadingsView", "RolloutList", "RolloutView", "StartRollout", "TargetDetail",
           "TargetList", "WhoAmI", "parse"]
