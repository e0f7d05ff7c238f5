"""The gate kinds a policy names: threshold, compare and errors, a union discriminated on
`kind`. Each kind is its own model, so its fields are its own; evaluate.py and
sequential.py judge them, prometheus.py reads their queries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from canary import schema, text, validation
from canary.fields import Duration, Number, Query, Text, template_names

GATE_KINDS = ("threshold", "compare", "errors")


def _stated(*rules: dict[str, Any], kind_required: bool = True) -> ConfigDict:
    """A gate kind's config: the rules its validator checks across fields, stated in its
    schema too, so an editor and helm refuse what canary refuses. In a file, only a
    threshold gate may leave out its kind (code may, for all)."""

    def extra(schema: dict[str, Any]) -> None:
        schema["required"] = [*schema.get("required", []), *(["kind"] if kind_required else [])]
        if rules:
            schema["allOf"] = list(rules)

    return ConfigDict(extra="forbid", use_attribute_docstrings=True, json_schema_extra=extra)


def _given(*fields: str, type: str = "number") -> dict[str, Any]:
    """At least one of `fields`, not null."""
    return {"anyOf": [{"required": [f], "properties": {f: {"type": type}}} for f in fields]}


def _versioned(value: str) -> str:
    if "version" not in template_names(value):
        raise ValueError("use {{ version }}: it is read for canary and for stable")
    return value


def _one_line(value: str) -> str:
    if any(text.is_control(c) for c in value):
        raise ValueError("must be text on one line (no control characters, line breaks or bidi "
                         "controls): it is shown in logs, terminals and chat messages")
    return value


# a gate's or a webhook's name: shown wherever its readings and verdicts are
GateName = Annotated[Text, Field(min_length=1, max_length=100, json_schema_extra={
    "not": {"pattern": text.CONTROL_PATTERN}}), AfterValidator(_one_line)]
# {{ version }}: the schema says it too; the validator keeps the message that says why
_VERSION_TEMPLATE = r"\{\{\s*version\s*\}\}"
_VERSIONED_QUERY = {"anyOf": [{"required": ["baseline"], "properties": {"baseline": {"type": "string"}}},
                              {"properties": {"query": {"pattern": _VERSION_TEMPLATE}}}]}
Versioned = Annotated[Query, AfterValidator(_versioned),
                      Field(json_schema_extra={"pattern": _VERSION_TEMPLATE})]


# the fields only another kind has: written without kind, they say which kind was meant
_OTHER_KINDS = {"errors": ("requests", "errors", "tolerance", "alpha", "gross", "final_gross",
                           "detect_rate", "warmup", "wander"),
                "compare": ("baseline", "max_increase", "max_ratio")}


@dataclass(frozen=True, config=_stated(_given("min", "max"), kind_required=False))
class ThresholdGate:
    """One query for the canary, bounded by min and/or max."""

    name: GateName
    """The gate's name, unique in its list; readings and rollback reasons show it."""
    query: Query
    """PromQL giving one number for the canary; {{ name }} is filled from the target's vars
    and from target, canary_version, stable_version, rollout_id and interval."""
    min: Number | None = None
    """The gate fails when the value is below this."""
    max: Number | None = None
    """The gate fails when the value is above this."""
    kind: Literal["threshold"] = "threshold"
    """threshold (the default): the query's value must stay within min and max."""

    @model_validator(mode="before")
    @classmethod
    def _kind_left_out(cls, data: Any) -> Any:
        # a gate without kind is a threshold gate: fields of another kind are a kind left
        # out, not three unknown fields and a missing query
        if isinstance(data, dict) and "kind" not in data:
            for kind, fields in _OTHER_KINDS.items():
                given = [f for f in fields if f in data]
                if given:
                    are = "is a field" if len(given) == 1 else "are fields"
                    an = "an" if kind[0] in "aeiou" else "a"
                    raise ValueError(f"{', '.join(given)} {are} of {an} {kind} gate: add "
                                     f"kind: {kind} (a gate without kind is a threshold "
                                     "gate: name, query, min, max)")
        return data

    @model_validator(mode="after")
    def _bounds(self) -> ThresholdGate:
        if self.min is None and self.max is None:
            raise ValueError("a gate needs min or max (or both): the bound it must stay within")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is above max; no value could pass")
        return self

    def bounds(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in (("min", self.min), ("max", self.max))
                         if v is not None)

    def queries(self) -> list[str]:
        return [self.query]


@dataclass(frozen=True, config=_stated(_given("max_increase", "max_ratio"), _VERSIONED_QUERY))
class CompareGate:
    """The same query for canary and stable (`{{ version }}`), or an explicit baseline,
    bounded by max_increase and/or max_ratio."""

    name: GateName
    """The gate's name, unique in its list; readings and rollback reasons show it."""
    query: Query
    """PromQL giving one number, read for the canary and for stable: {{ version }} is
    filled with each version (needed unless baseline is given)."""
    baseline: Query | None = None
    """PromQL giving stable's number, when it is not the query with the other version."""
    max_increase: Number | None = None
    """The gate fails when the canary's value is above stable's plus this (the query's unit)."""
    max_ratio: Number | None = None
    """The gate fails when the canary's value is above stable's times this."""
    kind: Literal["compare"] = "compare"
    """compare: the canary's value is judged against stable's."""

    @model_validator(mode="after")
    def _rules(self) -> CompareGate:
        wrong = []
        if not self.baseline and "version" not in template_names(self.query):
            wrong.append("query: use {{ version }} so the same query reads canary and stable, "
                         "or give a baseline query")
        if self.max_increase is None and self.max_ratio is None:
            wrong.append("a compare gate needs max_increase or max_ratio")
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    def bounds(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in
                         (("max_increase", self.max_increase), ("max_ratio", self.max_ratio))
                         if v is not None)

    def queries(self) -> list[str]:
        return [q for q in (self.query, self.baseline) if q]


@dataclass(frozen=True, config=_stated())
class ErrorsGate:
    """Request and error counters of both versions, judged by the sequential test in
    gates/sequential.py."""

    name: GateName
    """The gate's name, unique in its list; readings and rollback reasons show it."""
    requests: Versioned
    """PromQL counter of requests, with {{ version }} where the version goes (read for
    canary and for stable)."""
    errors: Versioned
    """PromQL counter of failed requests, with {{ version }} where the version goes."""
    tolerance: Annotated[Number, Field(gt=0)] = 1.0
    """Healthy means the canary's error rate is at most stable's times this (above 0;
    default 1: no worse than stable)."""
    alpha: Annotated[Number, Field(gt=0, lt=0.5)] = 0.01
    """The false-rollback budget per rollout: the chance a healthy canary is rolled back
    by this gate (between 0 and 0.5; default 0.01)."""
    gross: Annotated[Number, Field(gt=1, le=1000)] = 5.0
    """A stage passes once a regression this many times stable's error rate would have
    been caught (above 1, at most 1000; default 5)."""
    final_gross: Annotated[Number, Field(gt=1, le=1000)] = 2.0
    """The step to 100% waits until the canary is shown below stable's error rate times
    tolerance times this, or below detect_rate (above 1, at most 1000; default 2)."""
    detect_rate: Annotated[Number, Field(gt=0, lt=1)] = 0.01
    """When stable has almost no errors, a regression means at least this error rate
    (between 0 and 1; default 0.01, 1% of requests)."""
    warmup: Duration = 0.0
    """Ignore the canary for this long after the gate's first reading, a duration like
    2m (default 0s)."""
    wander: Annotated[Number, Field(ge=0, le=0.5)] = 0.5
    """How much each version's error rate may wander on its own, interval to interval,
    that the false-rollback bound allows for, as a relative size: 0.5 is +-50% (the
    default), 0 means the versions' rates move only together (steady, or shared bursts
    of any size). Tabulated at 0, 0.1, 0.25 and 0.5; any value from 0 to 0.5 is rounded
    up to the next of these. Smaller is faster to catch a bad canary, but rolls back
    healthy canaries more often than alpha where the versions do wander apart."""
    kind: Literal["errors"] = "errors"
    """errors: a sequential test of the canary's error rate against stable's."""

    def bounds(self) -> str:
        from canary.gates.sequential import tabulated_wander

        wander = "" if self.wander == 0.5 else f", wander {self.wander:g}"
        read = f"{tabulated_wander(self.wander):g}"
        if wander and read != f"{self.wander:g}":  # rounded up to a table
            wander += f", read as {read}"
        return f"errors <= stable x {self.tolerance:g}, alpha {self.alpha:g}{wander}"

    def queries(self) -> list[str]:
        return [self.requests, self.errors]


Gate = ThresholdGate | CompareGate | ErrorsGate


GateField = Annotated[
    Annotated[ThresholdGate, validation.tag("kind", "threshold")]
    | Annotated[CompareGate, validation.tag("kind", "compare")]
    | Annotated[ErrorsGate, validation.tag("kind", "errors")],
    validation.union(validation.kind_of("kind", GATE_KINDS, "threshold"), "gate_kind", "kind",
                     f"must be one of {', '.join(GATE_KINDS)}",
                     "a gate is a mapping with name, query and min or max")]
OVERRIDE = schema.overrides(
    "kind", [ThresholdGate, CompareGate, ErrorsGate],
    "a gate of this stage only, or, under the name of a policy-wide gate, the fields of that "
    "gate changed at this stage (the others kept)")


# what canary validate says of a bad value in a gate's field (validation.problems)
MESSAGES = {
    # (a gate's name is any text: the policy's name rule is not a gate's)
    "gates.name": "must be text of 1 to 100 characters, e.g. error-rate",
    **dict.fromkeys(("query", "baseline", "requests", "errors"), "must be a PromQL query"),
    "alpha": "must be between 0 and 0.5, e.g. 0.01",
    "tolerance": "must be above 0 (1 = no worse than stable)",
    "gross": "must be above 1 and at most 1000, e.g. 5 (a 5x regression)",
    "final_gross": "must be above 1 and at most 1000, e.g. 2 (a 2x regression)",
    "detect_rate": "must be between 0 and 1, e.g. 0.01 (1% errors)",
    "wander": "must be a number from 0 to 0.5: the per-version wandering allowed for "
              "(0.5 = +-50%, the default; 0 = rates move only together); tabulated at 0, "
              "0.1, 0.25, 0.5, other values rounded up to the next of these",
}
REQUIRED = {
    "query": "required: a PromQL query that returns one number",
    "requests": "required: a counter query of requests, with {{ version }} where the version "
                "goes",
    "errors": "required: a counter query of errors, with {{ version }} where the version goes",
}
