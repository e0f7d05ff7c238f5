"""Stage policies: YAML -> frozen Policy/Stage/Gate, through one model of the file.

The file's shape is written once, as pydantic models (PolicyDoc and the gate kinds, a
union discriminated on `kind`); canary validate, the API, the editor's JSON Schema and
the chart's schema all come from them. Every problem is reported as
`file:line: field: message`, all of them at once, so an SRE fixes a file in one pass.
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, field, replace
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from canary import schema, shapes, text, validation, yamlsrc
from canary.errors import InvalidInput, Problem, ValidationFailed

_PART = r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)"  # one part of a duration; the schema's pattern too
_DURATION_PART = re.compile(_PART)
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"  # a {{ name }}, an Alertmanager label, an env variable
_TEMPLATE = re.compile(rf"\{{\{{\s*({IDENTIFIER})\s*\}}\}}")
BUILTIN_VARS = frozenset({"target", "canary_version", "stable_version", "rollout_id", "interval",
                          "version"})
GATE_KINDS = ("threshold", "compare", "errors")
_UNIT_MS = {"ms": Decimal(1), "s": Decimal(1000), "m": Decimal(60_000), "h": Decimal(3_600_000)}
# Every duration is at most 30 days: no stage, deadline or timeout of a canary needs more,
# and anything bigger is a typo (a 400-digit number once reached the store as infinity).
MAX_DURATION = 30 * 24 * 3600.0
MAX_DURATION_TEXT = 32     # characters; `1h59m59s999ms` is 13
MIN_INTERVAL = 1.0         # seconds; Prometheus rarely has a newer sample sooner
_HINT = "write it like 500ms, 30s, 2m, 1h or 1m30s"


def parse_duration(text: object) -> float:
    """`500ms`, `10s`, `2m`, `1h`, `1m30s` -> seconds. Raises ValueError with a hint.

    Only whole milliseconds up to 30 days: that is what the store keeps
    (format_duration), so a duration always reads back as itself."""
    if not isinstance(text, str) or not text:
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
        raise ValueError(f"{shown} is not a duration; {_HINT}")
    if len(text) > MAX_DURATION_TEXT:
        raise ValueError(f"{text[:20]!r}... is {len(text)} characters, too long for a "
                         f"duration (at most {MAX_DURATION_TEXT}); {_HINT}, up to 30 days")
    pos, ms = 0, Decimal(0)
    with localcontext() as exact:
        exact.prec = 2 * MAX_DURATION_TEXT + 8  # no rounding: 32 digits times a unit
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            ms += Decimal(m.group(1)) * _UNIT_MS[m.group(3)]
            pos = m.end()
    if pos != len(text):
        raise ValueError(f"{text!r} is not a duration; {_HINT}")
    if ms > Decimal(int(MAX_DURATION * 1000)):
        raise ValueError(f"{text!r} is longer than 30 days, the longest duration canary "
                         "accepts; write 720h or less")
    if ms != ms.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of milliseconds; canary keeps "
                         "durations to the millisecond: write e.g. 1ms, 250ms or 1.5s")
    return int(ms) / 1000


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest duration text parse_duration reads back (`1m30s`)."""
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    s = ms // 1000
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return out or "0s"


def template_names(text: str) -> set[str]:
    return set(_TEMPLATE.findall(text))


def render(text: str, values: Mapping[str, str]) -> str:
    """Fill `{{ name }}`; an unknown name is an error (checked before a rollout starts)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise InvalidInput(f"query uses {{{{ {name} }}}}, which has no value")
        return values[name]

    return _TEMPLATE.sub(sub, text)


class NoData(enum.StrEnum):
    HOLD = "hold"
    FAIL = "fail"
    PASS = "pass"


# ---- the policy: one definition, validated as a file and used as it is --------------------
#
# These frozen pydantic dataclasses are both the policy file's schema (`canary schema
# policy`, the chart, the editor) and the objects the engine uses. Built in code they take
# plain numbers; read from a file (context {"file": True}) durations must be text.

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_DURATION_PATTERN = f"^({_PART})+$"
_MALFORMED = re.compile(r"\{\{(?![^{}]*\}\})|\{\{\s*[^A-Za-z_\s][^}]*\}\}")
MAX_QUERY = 10_000  # characters
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


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


def _from_file(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("file"))


def _duration(value: object, info: ValidationInfo) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and not _from_file(info):
        return float(value)
    return parse_duration(value)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be longer than 0")
    return value


def _templated(value: str) -> str:
    bad = _MALFORMED.search(value)
    if bad:
        raise ValueError(f"malformed template {bad.group(0)!r}; write {{{{ name }}}}")
    return value


def _query(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a PromQL query")
    return _templated(value).strip()


def _versioned(value: str) -> str:
    if "version" not in template_names(value):
        raise ValueError("use {{ version }}: it is read for canary and for stable")
    return value


_DURATION_SCHEMA = {"type": "string", "pattern": _DURATION_PATTERN,
                    "maxLength": MAX_DURATION_TEXT,
                    "description": "a duration like 500ms, 30s, 2m, 1h or 1m30s (whole "
                                   "milliseconds, at most 30 days)"}
Duration = Annotated[float, BeforeValidator(_duration),
                     PlainSerializer(format_duration, return_type=str, when_used="json"),
                     WithJsonSchema(_DURATION_SCHEMA)]
# a duration with a digit other than 0 in it: longer than 0. (The whole schema, not a
# Field's extra: that would be lost where the duration may also be null.)
_NONZERO = r"([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)(ms|s|m|h)"
PositiveDuration = Annotated[Duration, AfterValidator(_positive), WithJsonSchema({
    **_DURATION_SCHEMA, "pattern": f"^({_PART})*{_NONZERO}({_PART})*$",
    "description": "a duration longer than 0, like 500ms, 30s, 2m, 1h or 1m30s (whole "
                   "milliseconds, at most 30 days)"})]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True)]
Query = Annotated[Text, Field(max_length=MAX_QUERY, json_schema_extra={"pattern": r"\S"}),
                  AfterValidator(_query)]
GateName = Annotated[Text, Field(min_length=1, max_length=100)]
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
_OVERRIDE = schema.overrides(
    "kind", [ThresholdGate, CompareGate, ErrorsGate],
    "a gate of this stage only, or, under the name of a policy-wide gate, the fields of that "
    "gate changed at this stage (the others kept)")


@dataclass(frozen=True, config=_CONFIG)
class _StageCommon:
    """What every stage shape has besides its own field and hold; keyword-only, so a
    shape's own fields come first (`Stage(50, 60.0)`). (Descriptions are given in Field:
    a subclass does not read its base's attribute docstrings.)"""

    _: KW_ONLY
    approval: Annotated[bool, Field(strict=True, description=(
        "After the hold, wait for a promote (the rollout is paused until then); default "
        "false."))] = False
    gates: Annotated[tuple[GateField, ...], WithJsonSchema({"type": "array", "items": _OVERRIDE}),
                     Field(description="Gates of this stage only, added to the policy-wide "
                           "ones; an entry named like a policy-wide gate changes only the "
                           "fields it gives, at this stage.")] = ()


@dataclass(frozen=True, config=_CONFIG)
class Stage(_StageCommon):
    """One step of the rollout: a weight held for a time while the gates are evaluated."""

    weight: Annotated[int, Field(strict=True, ge=1, le=100), BeforeValidator(validation.whole)]
    """Percent of traffic sent to the canary at this stage, 1-100; higher than the
    previous stage's."""
    hold: Duration
    """How long the stage lasts, gates evaluated, before the next one: a duration like
    2m."""


HOOK_TIMES = ("pre-rollout", "stage", "pre-promotion", "post-rollout", "rollback")
GATING_HOOKS = ("pre-rollout", "stage", "pre-promotion")  # asked; the others are told
HOOK_PREFIX = "hook:"  # a gating webhook's name among a rollout's gates


def _label(value: str) -> str:
    if not re.fullmatch(IDENTIFIER, value):
        raise ValueError(f"{value[:100]!r} is not an Alertmanager label name (letters, digits "
                         "and _, not starting with a digit)")
    return value


def _label_keys(schema: dict[str, Any]) -> None:
    """Keys are label names: any other key is refused at its own place, by the editor
    and by helm alike."""
    schema["patternProperties"] = {f"^{IDENTIFIER}$": schema.pop("additionalProperties")}
    schema["additionalProperties"] = False


def _matcher_value(value: str) -> str:
    if not value.strip():
        raise ValueError("must be the label's value, e.g. CanaryHighErrorRate or "
                         "\"{{ service }}\"")
    return _templated(value).strip()


def _hook_url(value: str) -> str:
    if not re.match(r"^https?://", value):
        raise ValueError("must start with http:// or https://")
    return _templated(value)


@dataclass(frozen=True, config=_CONFIG)
class Webhook:
    """A URL POSTed the rollout's JSON at one moment of its life (interface.md section 6):
    pre-rollout, stage and pre-promotion hooks gate (2xx lets it go on), post-rollout and
    rollback hooks are told."""

    name: GateName
    """The hook's name, unique in the policy; a gating hook shows as gate hook:NAME."""
    when: Literal["pre-rollout", "stage", "pre-promotion", "post-rollout", "rollback"]
    """When it is called: pre-rollout, stage and pre-promotion gate (a 2xx lets the rollout
    go on); post-rollout and rollback are told."""
    url: Annotated[Text, Field(max_length=2048, json_schema_extra={"pattern": r"^https?://"}),
                   AfterValidator(_hook_url)]
    """http(s) URL POSTed the rollout's JSON; may use {{ vars }} like queries."""
    timeout: PositiveDuration = 10.0
    """How long one call may take, retries included (default 10s)."""

    @property
    def gates(self) -> bool:
        return self.when in GATING_HOOKS


@dataclass(frozen=True, config=_CONFIG)
class AlertRule:
    """Firing Alertmanager alerts whose labels equal every matcher (values rendered like
    queries) roll back this policy's rollouts."""

    matchers: Annotated[Mapping[Annotated[str, Field(strict=True, max_length=1024),
                                          AfterValidator(_label)],
                                Annotated[Text, Field(max_length=1024, json_schema_extra={
                                    "pattern": r"\S"}), AfterValidator(_matcher_value)]],
                        Field(min_length=1, max_length=100,
                              json_schema_extra=_label_keys)]
    """Alert label -> value; every one must equal the alert's label (values rendered like
    queries, e.g. {{ service }})."""



# ---- stage shapes: a weight, a match (headers and/or cookies) or a mirror ------------------

_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,99}$")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_]{1,100}$")
MAX_MATCH_VALUE = 1024   # characters of one header's or cookie's value
MAX_MATCH_RULES = 8      # headers and cookies of one match stage together
_VALUE_HINT = ('write a value, {prefix: "42"} or {regex: "^(alice|bob)$"}')


def _match_key(kind: str, pattern: re.Pattern[str], chars: str, example: str
               ) -> Callable[[object], str]:
    """A header's or cookie's name, or a ValueError saying what such a name is made of.
    Header names are case-insensitive, and meshes want them lower case."""

    def check(name: object) -> str:
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise ValueError(f"{str(name)[:40]!r} is not a {kind} name canary can match; use "
                             f"letters, digits and {chars} (e.g. {example}), at most 100 "
                             "characters")
        return name.lower() if kind == "header" else name

    return check


def _condition(value: object) -> shapes.Condition:
    """A match value: exact text, {prefix: ...} or {regex: ...}; a regex must compile."""
    if isinstance(value, shapes.Condition):
        return value
    how: str = "exact"
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in ("prefix", "regex"):
            raise ValueError(f"a match value is text or a mapping with one key, prefix or "
                             f"regex; {_VALUE_HINT}")
        how, value = next(iter(value.items()))
    if isinstance(value, bool | int | float):
        raise ValueError(f"{value!r} is not text; quote it (e.g. \"true\" or \"42\"): "
                         "header and cookie values are compared as text")
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be non-empty text; {_VALUE_HINT}")
    if len(value) > MAX_MATCH_VALUE:
        raise ValueError(f"at most {MAX_MATCH_VALUE} characters")
    if any(text.is_control(c) for c in value):
        raise ValueError("must be text on one line (no control characters, line breaks or "
                         "bidi controls)")
    if how == "regex":
        try:
            with warnings.catch_warnings():  # (Python's "possible nested set" is not the user's)
                warnings.simplefilter("ignore")
                re.compile(value)
        except re.error as e:
            raise ValueError(f"regex {value[:60]!r} does not compile: {e}; write a regular "
                             "expression for the whole value, like ^42.* or (alice|bob)") from e
        unportable = shapes.unportable(value)
        if unportable:
            raise ValueError(f"regex {value[:60]!r} uses {unportable}, which not every router's "
                             "engine accepts (nginx: PCRE, istio and gateways: RE2); use "
                             "groups, classes, alternatives and quantifiers, like ^42.* or "
                             "(alice|bob)")
    return shapes.Condition("regex" if how == "regex" else "prefix" if how == "prefix"
                            else "exact", value)


# (every text as `canary validate` takes it: bounded, no control characters or line breaks)
_MATCH_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_MATCH_VALUE,
               "not": {"pattern": text.CONTROL_PATTERN}}
_CONDITION_SCHEMA = {"description": "exact text, {prefix: ...} or {regex: ...}", "anyOf": [
    _MATCH_TEXT,
    {"type": "object", "additionalProperties": False, "required": ["prefix"],
     "properties": {"prefix": {**_MATCH_TEXT,
                               "description": "the value starts with this text"}}},
    {"type": "object", "additionalProperties": False, "required": ["regex"],
     "properties": {"regex": {**_MATCH_TEXT,
                              "description": "a regular expression the whole value "
                                            "matches"}}}]}
MatchValue = Annotated[shapes.Condition, PlainValidator(_condition),
                       PlainSerializer(lambda c: c.to_json()),
                       WithJsonSchema(_CONDITION_SCHEMA)]
HeaderName = Annotated[str, PlainValidator(_match_key("header", _HEADER_NAME, "'-'", "x-beta")),
                       WithJsonSchema({"type": "string", "pattern": _HEADER_NAME.pattern})]
CookieName = Annotated[str, PlainValidator(_match_key("cookie", _COOKIE_NAME, "'_'", "canary")),
                       WithJsonSchema({"type": "string", "pattern": _COOKIE_NAME.pattern})]


def _some_rule(schema: dict[str, Any]) -> None:
    """A match names at least one header or cookie, and at most MAX_MATCH_RULES of each."""
    schema["anyOf"] = [{"required": [f], "properties": {f: {"minProperties": 1}}}
                       for f in ("headers", "cookies")]
    for f in ("headers", "cookies"):
        schema["properties"][f]["maxProperties"] = MAX_MATCH_RULES


@dataclass(frozen=True, config=ConfigDict(extra="forbid", use_attribute_docstrings=True,
                                          json_schema_extra=_some_rule))
class Match:
    """Requests that reach the canary: every header and cookie listed must match."""

    headers: Mapping[HeaderName, MatchValue] = field(default_factory=dict)
    """Header name -> value: exact text, {prefix: ...} or {regex: ...} (the whole value)."""
    cookies: Mapping[CookieName, MatchValue] = field(default_factory=dict)
    """Cookie name -> value: exact text, {prefix: ...} or {regex: ...} (the whole value)."""

    @field_validator("headers", mode="before")
    @classmethod
    def _once_each(cls, value: object) -> object:
        if isinstance(value, Mapping):
            seen: dict[str, object] = {}
            for name in value:
                if isinstance(name, str) and name.lower() in seen:
                    raise ValueError(f"header {name!r} is named twice ({seen[name.lower()]!r} "
                                     "too): header names are case-insensitive; keep one")
                seen[str(name).lower()] = name
        return value

    @model_validator(mode="after")
    def _some(self) -> Match:
        n = len(self.headers) + len(self.cookies)
        if n == 0:
            raise ValueError("a match needs at least one header or cookie, e.g. "
                             "headers: {x-beta: \"true\"}")
        if n > MAX_MATCH_RULES:
            raise ValueError(f"at most {MAX_MATCH_RULES} headers and cookies together")
        return self

    def shape(self) -> shapes.Shape:
        return shapes.Shape(rules=tuple(
            [shapes.Rule("header", k, v) for k, v in self.headers.items()]
            + [shapes.Rule("cookie", k, v) for k, v in self.cookies.items()]))


@dataclass(frozen=True, config=_CONFIG)
class MatchStage(_StageCommon):
    """Only matching requests reach the canary; users' weight stays 0."""

    match: Match
    """The headers and/or cookies a request needs to reach the canary; the rest go to
    stable. Users' weight stays 0."""
    hold: Duration
    """How long the stage lasts, gates evaluated, before the next one: a duration like
    10m."""

    @property
    def weight(self) -> int:
        return 0

    @property
    def shape(self) -> shapes.Shape:
        return self.match.shape()


@dataclass(frozen=True, config=_CONFIG)
class MirrorStage(_StageCommon):
    """`mirror` percent of requests are copied to the canary; users are served by stable."""

    mirror: Annotated[int, Field(strict=True, ge=1, le=100), BeforeValidator(validation.whole)]
    """Percent of requests copied to the canary, 1-100; its answers are discarded and
    users are served by stable (weight 0)."""
    hold: Duration
    """How long the stage lasts, gates evaluated, before the next one: a duration like
    5m."""

    @property
    def weight(self) -> int:
        return 0

    @property
    def shape(self) -> shapes.Shape:
        return shapes.Shape(mirror=self.mirror)


STAGE_SHAPES = ("weight", "match", "mirror")


def _stage_shape(value: Any) -> str | None:
    if isinstance(value, dict):
        present = [k for k in STAGE_SHAPES if k in value]
        return f"shape={present[0]}" if len(present) == 1 else None
    kind = {Stage: "weight", MatchStage: "match", MirrorStage: "mirror"}.get(type(value))
    return f"shape={kind}" if kind else None


StageField = Annotated[
    Annotated[Stage, validation.tag("shape", "weight")]
    | Annotated[MatchStage, validation.tag("shape", "match")]
    | Annotated[MirrorStage, validation.tag("shape", "mirror")],
    validation.union(_stage_shape, "stage_shape", "weight",
                     "a stage has exactly one of weight (a percent), match (headers or "
                     "cookies) or mirror (a percent)",
                     "a stage is a mapping with weight, match or mirror, and hold")]
AnyStage = Stage | MatchStage | MirrorStage


def stage_shape(stage: AnyStage) -> shapes.Shape | None:
    """The stage's match or mirror; None for a weight stage."""
    return None if isinstance(stage, Stage) else stage.shape


@dataclass(frozen=True, config=ConfigDict(extra="forbid", title="canary policy",
                                           use_attribute_docstrings=True))
class Policy:
    """A stage policy (interface.md section 1)."""

    name: Annotated[Text, Field(pattern=_NAME_PATTERN)]
    """Unique among the loaded policies; targets and start requests name it. Default: the
    file's name without .yaml."""
    stages: Annotated[tuple[StageField, ...], Field(max_length=100, json_schema_extra={
        "minItems": 1})]
    """The stages the canary goes through, in order: match (headers, cookies) and mirror
    stages first, then weights rising strictly, the last one 100."""
    gates: Annotated[tuple[GateField, ...], Field(max_length=100)] = ()
    """Gates evaluated at every stage."""
    interval: PositiveDuration = 30.0
    """How often every gate is evaluated: a duration of at least 1s (default 30s)."""
    failure_limit: Annotated[int, Field(strict=True, ge=1, le=1000),
                             BeforeValidator(validation.whole)] = 2
    """Consecutive failing evaluations of one gate that roll back (default 2; errors gates
    roll back at once)."""
    no_data: NoData = NoData.HOLD
    """What a gate whose query returns no sample counts as: hold (wait, the default), fail
    or pass."""
    progress_deadline: PositiveDuration = 1800.0
    """Roll back when no stage progress is made (held, no data, errors) for this long:
    longer than every stage's hold plus one interval (default 30m)."""
    webhooks: Annotated[tuple[Webhook, ...], Field(max_length=100)] = ()
    """URLs called at moments of the rollout: some gate it (pre-rollout, stage,
    pre-promotion), some are told (post-rollout, rollback)."""
    alerts: Annotated[tuple[AlertRule, ...], Field(max_length=100)] = ()
    """Firing Alertmanager alerts (POST /api/v1/alerts) that roll this policy's rollouts
    back."""
    approval_timeout: PositiveDuration | None = None
    """An approval stage waiting longer than this is rolled back (default: it waits)."""
    source: SkipJsonSchema[str] = field(default="", compare=False, repr=False)
    """Where it was read from; not part of the file."""

    @field_validator("interval")
    @classmethod
    def _schedulable(cls, value: float, info: ValidationInfo) -> float:
        if 0 < value < MIN_INTERVAL and _from_file(info) \
                and not (info.context or {}).get("stored"):
            raise ValueError(f"{format_duration(value)} is shorter than {MIN_INTERVAL:g}s, the "
                             "shortest interval canary evaluates at; write 1s or more")
        return value

    @field_validator("stages")
    @classmethod
    def _some(cls, value: tuple[AnyStage, ...], info: ValidationInfo) -> tuple[AnyStage, ...]:
        if not value and _from_file(info):
            raise ValueError("must be a non-empty list of stages")
        return value

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        """A stage gate named like a policy-wide one changes only the fields it gives."""
        if not isinstance(data, dict):
            return data
        if "source" in data:
            raise ValueError("source: unknown field")
        gates, stages = data.get("gates"), data.get("stages")
        wide = {g["name"]: g for g in gates if isinstance(g, dict)
                and isinstance(g.get("name"), str)} if isinstance(gates, list) else {}
        if not wide or not isinstance(stages, list):
            return data
        out = []
        for s in stages:
            if isinstance(s, dict) and isinstance(s.get("gates"), list):
                s = {**s, "gates": [{**wide[g["name"]], **g} if isinstance(g, dict) and isinstance(
                    g.get("name"), str) and g["name"] in wide else g for g in s["gates"]]}
            out.append(s)
        return {**data, "stages": out}

    def gates_for(self, stage: int) -> tuple[Gate, ...]:
        """The policy-wide gates with this stage's additions and bound changes."""
        merged = {g.name: g for g in self.gates}
        if 0 <= stage < len(self.stages):
            for g in self.stages[stage].gates:
                merged[g.name] = g
        return tuple(merged.values())

    def template_names(self) -> set[str]:
        names: set[str] = set()
        for g in (*self.gates, *(g for s in self.stages for g in s.gates)):
            for q in g.queries():
                names |= template_names(q)
            if g.kind != "threshold":
                names.add("stable_version")  # the other side of every comparison
        for h in self.webhooks:
            names |= template_names(h.url)
        for a in self.alerts:
            for v in a.matchers.values():
                names |= template_names(v)
        return names - {"version"}

    def hooks(self, when: str) -> tuple[Webhook, ...]:
        return tuple(h for h in self.webhooks if h.when == when)

    def gating_hooks(self, stage: int, *, pre_rollout: bool = False) -> tuple[Webhook, ...]:
        """The hooks asked at this stage: `pre-rollout` ones before any traffic moves, else
        every `stage` hook, and the `pre-promotion` ones at the stage before the step to
        100% (with a single stage, there is no such step: pre-rollout covers it)."""
        if pre_rollout:
            return self.hooks("pre-rollout")
        out = self.hooks("stage")
        if len(self.stages) >= 2 and stage == len(self.stages) - 2:
            out += self.hooks("pre-promotion")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The policy as a file would say it (stored with each rollout, served by the API)."""
        out: dict[str, Any] = _POLICY.dump_python(self, mode="json", exclude_none=True,
                                                  exclude={"source"})
        return out


_POLICY: TypeAdapter[Policy] = TypeAdapter(Policy)


def from_dict(data: Mapping[str, Any], *, file: str = "<stored policy>") -> Policy:
    """Rebuild a Policy from `to_dict` output (a rollout keeps the policy it started with).
    Rules that only guard what an SRE writes (the shortest interval) are not applied again:
    a rollout started under them keeps running after they change."""
    return _check(yamlsrc.Doc(file, data, {(): 1}), default_name=str(data.get("name", "")),
                  stored=True)


def load_file(path: str | Path) -> Policy:
    return _check(yamlsrc.read(path), default_name=Path(path).stem)


def parse(text: str | bytes, *, file: str, default_name: str) -> Policy:
    return _check(yamlsrc.load(text, file), default_name=default_name)


def load_many(paths: Iterable[str | Path]) -> dict[str, Policy]:
    """Load several policy files; names must be unique. All problems are raised together."""
    problems: list[Problem] = []
    out: dict[str, Policy] = {}
    for path in paths:
        try:
            pol = load_file(path)
        except ValidationFailed as e:
            problems.extend(e.problems)
            continue
        if pol.name in out:
            problems.append(
                Problem(str(path), 1, "name",
                        f"policy name {pol.name!r} is also used by {out[pol.name].source}; "
                        "give each policy a unique name")
            )
            continue
        out[pol.name] = pol
    if problems:
        raise ValidationFailed(problems)
    return out


POLICY_MESSAGES = {
    "name": "must be 1-63 letters, digits, '.', '_' or '-'",
    # (a gate's or a hook's name is any text: the policy's rule above is not theirs)
    "gates.name": "must be text of 1 to 100 characters, e.g. error-rate",
    "webhooks.name": "must be text of 1 to 100 characters, e.g. smoke-tests",
    "weight": "must be a whole percent from 1 to 100",
    "mirror": "must be a whole percent from 1 to 100",
    "failure_limit": "must be a whole number of at least 1",
    "no_data": "must be one of hold, fail, pass",
    **dict.fromkeys(("query", "baseline", "requests", "errors"), "must be a PromQL query"),
    "alpha": "must be between 0 and 0.5, e.g. 0.01",
    "tolerance": "must be above 0 (1 = no worse than stable)",
    "gross": "must be above 1 and at most 1000, e.g. 5 (a 5x regression)",
    "final_gross": "must be above 1 and at most 1000, e.g. 2 (a 2x regression)",
    "detect_rate": "must be between 0 and 1, e.g. 0.01 (1% errors)",
    "wander": "must be a number from 0 to 0.5: the per-version wandering allowed for "
              "(0.5 = +-50%, the default; 0 = rates move only together); tabulated at 0, "
              "0.1, 0.25, 0.5, other values rounded up to the next of these",
    "stages": "must be a non-empty list of stages",
    "gates": "must be a list of gates, each with name, query and min or max",
    "webhooks": "must be a list of webhooks, each with name, when and url",
    "when": f"must be one of {', '.join(HOOK_TIMES)}",
    "url": "must be an http:// or https:// URL (it may use {{ vars }} like queries)",
    "alerts": "must be a list of {matchers: {label: value, ...}}",
    "matchers": "must be a non-empty mapping of Alertmanager label -> value, like "
                "{alertname: CanaryHighErrorRate, service: \"{{ service }}\"}",
}
POLICY_REQUIRED = {
    "stages": "required: a list of stages, each with weight and hold",
    "hold": "required; write a duration like 30s",
    "name": "required: a short name for this gate",
    "query": "required: a PromQL query that returns one number",
    "requests": "required: a counter query of requests, with {{ version }} where the version "
                "goes",
    "errors": "required: a counter query of errors, with {{ version }} where the version goes",
    "when": f"required: one of {', '.join(HOOK_TIMES)}",
    "url": "required: the URL canary POSTs the rollout to",
    "matchers": "required: a mapping of Alertmanager label -> value",
}


def _repeated_names(entries: object) -> Iterable[tuple[int, str, int]]:
    """(index, name, index of its first use) of each entry of a list of mappings whose
    name an earlier entry has."""
    names = [e.get("name") if isinstance(e, dict) else None
             for e in (entries if isinstance(entries, list) else [])]
    for j, name in enumerate(names):
        if isinstance(name, str) and name in names[:j]:
            yield j, name, names.index(name)


def _rules(doc: yamlsrc.Doc) -> list[Problem]:
    """What a single field cannot say: weights that rise to 100, unique gate names, a
    progress deadline longer than every hold. Read from the raw document, so they are
    reported beside the models' problems."""
    out: list[Problem] = []
    data = doc.data

    def problem(path: yamlsrc.Path, message: str) -> None:
        out.append(validation.problem(doc, path, message))

    raw = data.get("stages")
    stages = [s if isinstance(s, dict) else {} for s in raw] if isinstance(raw, list) else []
    last, first_weight = 0, None
    for i, s in enumerate(stages):
        w = s.get("weight")
        if isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 100:
            if w <= last:
                problem(("stages", i, "weight"), f"{w} is not above the previous stage's "
                                                 f"{last}; weights must rise strictly")
            last = max(last, w)
        shape = next((k for k in ("match", "mirror") if k in s and "weight" not in s), None)
        if shape and first_weight is not None:
            problem(("stages", i, shape),
                    f"a {shape} stage comes before every weight stage: after stage "
                    f"{first_weight} users already reach the canary by weight; move it up")
        if "weight" in s and first_weight is None:
            first_weight = i
    final = stages[-1] if stages else {}
    if isinstance(final.get("weight"), int) and final["weight"] != 100:
        problem(("stages", len(stages) - 1, "weight"),
                "the last stage must have weight 100 (all traffic on the canary)")
    elif "weight" not in final and ("match" in final or "mirror" in final):
        problem(("stages", len(stages) - 1), "the last stage must have weight 100 (all "
                                             "traffic on the canary); add weight stages after "
                                             "the match and mirror stages")
    for path, gates in [(("gates",), data.get("gates")),
                        *((("stages", i, "gates"), s.get("gates")) for i, s in enumerate(stages))]:
        for j, name, _ in _repeated_names(gates):
            problem((*path, j, "name"), f"gate {name!r} appears twice in this list")
    for j, name, first in _repeated_names(data.get("webhooks")):
        problem(("webhooks", j, "name"), f"webhook {name!r} is also webhooks[{first}]'s name; "
                                         "give each webhook a unique name (a gating one shows "
                                         "as gate hook:NAME)")
    try:
        interval = parse_duration(data.get("interval", "30s"))
        deadline = parse_duration(data.get("progress_deadline", "30m"))
        holds = [parse_duration(s["hold"]) for s in stages]
    except (ValueError, KeyError):
        return out  # the models say what is wrong with them
    for i, hold in enumerate(holds):
        if hold + interval >= deadline:
            problem(("progress_deadline",),
                    f"{format_duration(deadline)} is not longer than stage {i}'s hold plus one "
                    f"interval ({format_duration(hold + interval)}); a healthy rollout would "
                    "be rolled back")
            break
    return out


_STAGE_GATE_FIELD = re.compile(r"stages\[(\d+)\]\.gates\[(\d+)\]\.(\w+)$")


def _wide_gates(data: Mapping[str, Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    gates = data.get("gates")
    return {g["name"]: (i, g) for i, g in enumerate(gates if isinstance(gates, list) else [])
            if isinstance(g, dict) and isinstance(g.get("name"), str)}


def _stage_gates(data: Mapping[str, Any]) -> Iterable[tuple[int, int, dict[str, Any]]]:
    stages = data.get("stages")
    for i, s in enumerate(stages if isinstance(stages, list) else []):
        gates = s.get("gates") if isinstance(s, dict) else None
        for j, g in enumerate(gates if isinstance(gates, list) else []):
            if isinstance(g, dict):
                yield i, j, g


def _inherited(data: Mapping[str, Any], wide: Mapping[str, Any], problem: Problem) -> bool:
    """A problem of a field a stage's change to a policy-wide gate does not write, but
    takes from that gate: reported where it is written (or, for a gate whose kind the
    stage changes, by _kept_kinds), not again at the stage's line."""
    m = _STAGE_GATE_FIELD.match(problem.field)
    if not m:
        return False
    stages = data.get("stages")
    try:
        entry = stages[int(m.group(1))]["gates"][int(m.group(2))]  # type: ignore[index]
    except (TypeError, IndexError, KeyError):
        return False
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and entry["name"] in wide and m.group(3) not in entry)


def _kept_kinds(doc: yamlsrc.Doc) -> list[Problem]:
    """A stage's entry named like a policy-wide gate changes that gate's fields; it cannot
    make it a gate of another kind (the fields it keeps would be of the old kind)."""
    wide = _wide_gates(doc.data)
    out = []
    for i, j, g in _stage_gates(doc.data):
        if not isinstance(g.get("name"), str) or g["name"] not in wide or "kind" not in g:
            continue
        k, base = wide[g["name"]]
        kind = base.get("kind", "threshold")
        if g["kind"] != kind and g["kind"] in GATE_KINDS:
            out.append(validation.problem(doc, ("stages", i, "gates", j, "kind"), (
                f"gate {g['name']!r} is a {kind} gate (gates[{k}]); a stage changes a "
                f"policy-wide gate's fields, not its kind: give a {g['kind']} gate of this "
                "stage only another name")))
    return out


def _check(doc: yamlsrc.Doc, *, default_name: str, stored: bool = False) -> Policy:
    data = doc.data
    if not isinstance(data, dict):
        raise ValidationFailed([validation.problem(doc, (), "a policy is a YAML mapping with "
                                                            "at least `stages`")])
    problems = _rules(doc) + _kept_kinds(doc)
    if "name" not in data:
        data = {**data, "name": default_name}
    try:
        pol = _POLICY.validate_python(data, context={"file": True, "stored": stored})
    except ValidationError as e:
        wide = _wide_gates(data)
        problems = [p for p in validation.problems(doc, e, Policy, messages=POLICY_MESSAGES,
                                                   required=POLICY_REQUIRED)
                    if not _inherited(data, wide, p)] + problems
    if problems:
        raise ValidationFailed(sorted(problems, key=lambda p: p.line))
    return replace(pol, source=doc.file)
