"""Stage policies: YAML -> frozen Policy/Stage/Gate, through one model of the file.

The file's shape is written once, as pydantic models (PolicyDoc and the gate kinds, a
union discriminated on `kind`); canary validate, the API, the editor's JSON Schema and
the chart's schema all come from them. Every problem is reported as
`file:line: field: message`, all of them at once, so an SRE fixes a file in one pass.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import field, replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from canary import hooks, stages, validation, yamlsrc
from canary.errors import Problem, ValidationFailed
from canary.fields import (
    IDENTIFIER,
    NAME_PATTERN,
    NotInFiles,
    PositiveDuration,
    Text,
    format_duration,
    from_file,
    parse_duration,
    template_names,
    templated,
)
from canary.gates import kinds
from canary.gates.kinds import GATE_KINDS, Gate, GateField
from canary.hooks import Webhook
from canary.stages import AnyStage, StageField


class NoData(enum.StrEnum):
    HOLD = "hold"
    FAIL = "fail"
    PASS = "pass"


# ---- the policy: one definition, validated as a file and used as it is --------------------
#
# These frozen pydantic dataclasses are both the policy file's schema (`canary schema
# policy`, the chart, the editor) and the objects the engine uses. Built in code they take
# plain numbers; read from a file (context {"file": True}) durations must be text.

MIN_INTERVAL = 1.0  # seconds; Prometheus rarely has a newer sample sooner
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


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
    return templated(value).strip()


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


def _name_defaults(schema: dict[str, Any]) -> None:
    """A file may leave out its name (it is then the file's): optional for an editor too."""
    schema["required"] = [f for f in schema.get("required", []) if f != "name"]


@dataclass(frozen=True, config=ConfigDict(extra="forbid", title="canary policy",
                                           use_attribute_docstrings=True,
                                           json_schema_extra=_name_defaults))
class Policy:
    """A stage policy (README: Writing a policy)."""

    name: Annotated[Text, Field(pattern=NAME_PATTERN)]
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
    source: NotInFiles = field(default="", compare=False, repr=False)
    """Where it was read from; not part of the file."""

    @field_validator("interval")
    @classmethod
    def _schedulable(cls, value: float, info: ValidationInfo) -> float:
        if 0 < value < MIN_INTERVAL and from_file(info) \
                and not (info.context or {}).get("stored"):
            raise ValueError(f"{format_duration(value)} is shorter than {MIN_INTERVAL:g}s, the "
                             "shortest interval canary evaluates at; write 1s or more")
        return value

    @field_validator("stages")
    @classmethod
    def _some(cls, value: tuple[AnyStage, ...], info: ValidationInfo) -> tuple[AnyStage, ...]:
        if not value and from_file(info):
            raise ValueError("must be a non-empty list of stages")
        return value

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        """A stage gate named like a policy-wide one changes only the fields it gives."""
        if not isinstance(data, dict):
            return data
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
    **kinds.MESSAGES, **stages.MESSAGES, **hooks.MESSAGES,
    "name": "must be 1-63 letters, digits, '.', '_' or '-'",
    "failure_limit": "must be a whole number of at least 1",
    "no_data": "must be one of hold, fail, pass",
    "stages": "must be a non-empty list of stages",
    "gates": "must be a list of gates, each with name, query and min or max",
    "alerts": "must be a list of {matchers: {label: value, ...}}",
    "matchers": "must be a non-empty mapping of Alertmanager label -> value, like "
                "{alertname: CanaryHighErrorRate, service: \"{{ service }}\"}",
}
POLICY_REQUIRED = {
    **kinds.REQUIRED, **stages.REQUIRED, **hooks.REQUIRED,
    "stages": "required: a list of stages, each with weight and hold",
    "name": "required: a short name for this gate",
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
