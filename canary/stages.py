"""A policy's stages: a weight, a match (headers and/or cookies) or a mirror, a union
discriminated on which of those fields a stage has. The match and mirror stages give
the plain shapes (shapes.py) the engine and the routers use."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, field
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from canary import shapes, text, validation
from canary.fields import Duration
from canary.gates.kinds import OVERRIDE, GateField

_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass(frozen=True, config=_CONFIG)
class _StageCommon:
    """What every stage shape has besides its own field and hold; keyword-only, so a
    shape's own fields come first (`Stage(50, 60.0)`). (Descriptions are given in Field:
    a subclass does not read its base's attribute docstrings.)"""

    _: KW_ONLY
    approval: Annotated[bool, Field(strict=True, description=(
        "After the hold, wait for a promote (the rollout is paused until then); default "
        "false."))] = False
    gates: Annotated[tuple[GateField, ...], WithJsonSchema({"type": "array", "items": OVERRIDE}),
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


# what canary validate says of a bad value in a stage's field (validation.problems)
MESSAGES = dict.fromkeys(("weight", "mirror"), "must be a whole percent from 1 to 100")
REQUIRED = {"hold": "required; write a duration like 30s"}
