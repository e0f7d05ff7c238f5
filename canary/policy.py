"""Stage policies: YAML -> frozen Policy/Stage/Gate, checked field by field.

Every problem is reported as `file:line: field: message`, all of them at once, so an
SRE fixes a file in one pass instead of one error per run.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canary import yamlsrc
from canary.errors import InvalidInput, Problem, ValidationFailed

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
BUILTIN_VARS = frozenset({"target", "canary_version", "stable_version", "rollout_id", "interval"})
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: object) -> float:
    """`500ms`, `10s`, `2m`, `1h`, `1m30s` -> seconds. Raises ValueError with a hint."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{text!r} is not a duration; write it like 500ms, 30s, 2m, 1h or 1m30s")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"{text!r} is not a duration; write it like 500ms, 30s, 2m, 1h or 1m30s")
    return total


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


@dataclass(frozen=True)
class Gate:
    name: str
    query: str
    min: float | None = None
    max: float | None = None

    def bounds(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"min {self.min:g}")
        if self.max is not None:
            parts.append(f"max {self.max:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Stage:
    weight: int
    hold: float
    approval: bool = False
    gates: tuple[Gate, ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    stages: tuple[Stage, ...]
    gates: tuple[Gate, ...] = ()
    interval: float = 30.0
    failure_limit: int = 2
    no_data: NoData = NoData.HOLD
    progress_deadline: float = 1800.0
    source: str = field(default="", compare=False)

    def gates_for(self, stage: int) -> tuple[Gate, ...]:
        """The policy-wide gates with this stage's additions and bound changes."""
        merged = {g.name: g for g in self.gates}
        if 0 <= stage < len(self.stages):
            for g in self.stages[stage].gates:
                merged[g.name] = g
        return tuple(merged.values())

    def template_names(self) -> set[str]:
        names: set[str] = set()
        for g in self.gates:
            names |= template_names(g.query)
        for s in self.stages:
            for g in s.gates:
                names |= template_names(g.query)
        return names

    def to_dict(self) -> dict[str, Any]:
        def gate(g: Gate) -> dict[str, Any]:
            d: dict[str, Any] = {"name": g.name, "query": g.query}
            if g.min is not None:
                d["min"] = g.min
            if g.max is not None:
                d["max"] = g.max
            return d

        return {
            "name": self.name,
            "interval": format_duration(self.interval),
            "failure_limit": self.failure_limit,
            "no_data": self.no_data.value,
            "progress_deadline": format_duration(self.progress_deadline),
            "stages": [
                {
                    "weight": s.weight,
                    "hold": format_duration(s.hold),
                    "approval": s.approval,
                    **({"gates": [gate(g) for g in s.gates]} if s.gates else {}),
                }
                for s in self.stages
            ],
            "gates": [gate(g) for g in self.gates],
        }


def from_dict(data: Mapping[str, Any], *, file: str = "<stored policy>") -> Policy:
    """Rebuild a Policy from `to_dict` output (a rollout keeps the policy it started with)."""
    return _Checker(yamlsrc.Doc(file, data, {(): 1}), default_name=str(data.get("name", ""))).policy()


def load_file(path: str | Path) -> Policy:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValidationFailed([Problem(str(p), 1, "(file)", f"cannot read: {e.strerror}")]) from e
    return parse(raw, file=str(p), default_name=p.stem)


def parse(text: str | bytes, *, file: str, default_name: str) -> Policy:
    doc = yamlsrc.load(text, file)
    return _Checker(doc, default_name=default_name).policy()


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


_POLICY_KEYS = {"name", "interval", "failure_limit", "no_data", "progress_deadline", "stages", "gates"}
_STAGE_KEYS = {"weight", "hold", "approval", "gates"}
_GATE_KEYS = {"name", "query", "min", "max"}


class _Checker:
    """Walks one document, collecting every problem before giving up."""

    def __init__(self, doc: yamlsrc.Doc, *, default_name: str) -> None:
        self.doc = doc
        self.default_name = default_name
        self.problems: list[Problem] = []

    def problem(self, path: yamlsrc.Path, message: str) -> None:
        name = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
        name = name.replace(".[", "[") or "(file)"
        self.problems.append(Problem(self.doc.file, self.doc.line(path), name, message))

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], path: yamlsrc.Path) -> None:
        for key in data:
            if key not in allowed:
                self.problem((*path, key),
                             f"unknown field; expected one of {', '.join(sorted(allowed))}")

    def duration(self, data: Mapping[str, Any], key: str, path: yamlsrc.Path,
                 default: float | None, *, positive: bool = True) -> float:
        if key not in data:
            if default is None:
                self.problem((*path, key) if path else (key,), "required; write a duration like 30s")
                return 0.0
            return default
        try:
            value = parse_duration(data[key])
        except ValueError as e:
            self.problem((*path, key), str(e))
            return default or 0.0
        if positive and value <= 0:
            self.problem((*path, key), "must be longer than 0")
        return value

    def policy(self) -> Policy:
        data = self.doc.data
        if not isinstance(data, dict):
            self.problem((), "a policy is a YAML mapping with at least `stages`")
            raise ValidationFailed(self.problems)
        self.unknown_keys(data, _POLICY_KEYS, ())
        name = data.get("name", self.default_name)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            self.problem(("name",), "must be 1-63 letters, digits, '.', '_' or '-'")
            name = str(name)
        interval = self.duration(data, "interval", (), 30.0)
        failure_limit = data.get("failure_limit", 2)
        if isinstance(failure_limit, bool) or not isinstance(failure_limit, int) or failure_limit < 1:
            self.problem(("failure_limit",), "must be a whole number of at least 1")
            failure_limit = 1
        no_data_raw = data.get("no_data", "hold")
        try:
            no_data = NoData(no_data_raw)
        except ValueError:
            self.problem(("no_data",), "must be one of hold, fail, pass")
            no_data = NoData.HOLD
        deadline = self.duration(data, "progress_deadline", (), 1800.0)
        gates = self.gates(data.get("gates", []), ("gates",), inherited={})
        stages = self.stages(data.get("stages"), {g.name: g for g in gates})
        for i, s in enumerate(stages):
            if s.hold + interval >= deadline:
                self.problem(("progress_deadline",),
                             f"{format_duration(deadline)} is not longer than stage {i}'s hold "
                             f"plus one interval ({format_duration(s.hold + interval)}); "
                             "a healthy rollout would be rolled back")
                break
        if self.problems:
            raise ValidationFailed(self.problems)
        return Policy(name=name, stages=tuple(stages), gates=tuple(gates), interval=interval,
                      failure_limit=failure_limit, no_data=no_data,
                      progress_deadline=deadline, source=self.doc.file)

    def stages(self, raw: Any, policy_gates: dict[str, Gate]) -> list[Stage]:
        if raw is None:
            self.problem(("stages",), "required: a list of stages, each with weight and hold")
            return []
        if not isinstance(raw, list) or not raw:
            self.problem(("stages",), "must be a non-empty list of stages")
            return []
        out: list[Stage] = []
        last = 0
        for i, item in enumerate(raw):
            path: yamlsrc.Path = ("stages", i)
            if not isinstance(item, dict):
                self.problem(path, "a stage is a mapping with weight and hold")
                continue
            self.unknown_keys(item, _STAGE_KEYS, path)
            weight = item.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 100:
                self.problem((*path, "weight"), "must be a whole percent from 1 to 100")
                weight = last + 1
            elif weight <= last:
                self.problem((*path, "weight"),
                             f"{weight} is not above the previous stage's {last}; "
                             "weights must rise strictly")
            last = max(last, weight)
            hold = self.duration(item, "hold", path, None, positive=False)
            approval = item.get("approval", False)
            if not isinstance(approval, bool):
                self.problem((*path, "approval"), "must be true or false")
                approval = False
            gates = self.gates(item.get("gates", []), (*path, "gates"), inherited=policy_gates)
            out.append(Stage(weight=weight, hold=hold, approval=approval, gates=tuple(gates)))
        if out and out[-1].weight != 100:
            self.problem(("stages", len(raw) - 1, "weight"),
                         "the last stage must have weight 100 (all traffic on the canary)")
        return out

    def gates(self, raw: Any, path: yamlsrc.Path, *, inherited: dict[str, Gate]) -> list[Gate]:
        if not isinstance(raw, list):
            self.problem(path, "must be a list of gates, each with name, query and min or max")
            return []
        out: list[Gate] = []
        names: set[str] = set()
        for i, item in enumerate(raw):
            gpath = (*path, i)
            if not isinstance(item, dict):
                self.problem(gpath, "a gate is a mapping with name, query and min or max")
                continue
            self.unknown_keys(item, _GATE_KEYS, gpath)
            name = item.get("name")
            if not isinstance(name, str) or not name.strip():
                self.problem((*gpath, "name"), "required: a short name for this gate")
                continue
            if name in names:
                self.problem((*gpath, "name"), f"gate {name!r} appears twice in this list")
                continue
            names.add(name)
            base = inherited.get(name)
            query = item.get("query", base.query if base else None)
            if not isinstance(query, str) or not query.strip():
                self.problem((*gpath, "query"),
                             "required: a PromQL query that returns one number")
                query = ""
            for bad in re.findall(r"\{\{(?![^{}]*\}\})|\{\{\s*[^A-Za-z_\s][^}]*\}\}", query):
                self.problem((*gpath, "query"), f"malformed template {bad!r}; write {{{{ name }}}}")
            bounds: dict[str, float | None] = {}
            bad_bound = False
            for key in ("min", "max"):
                value = item.get(key, getattr(base, key) if base else None)
                if value is not None and (isinstance(value, bool)
                                          or not isinstance(value, int | float)):
                    self.problem((*gpath, key), "must be a number")
                    value, bad_bound = None, True
                bounds[key] = float(value) if value is not None else None
            if bad_bound:
                pass
            elif bounds["min"] is None and bounds["max"] is None:
                self.problem(gpath, "a gate needs min or max (or both): the bound it must stay within")
            elif (bounds["min"] is not None and bounds["max"] is not None
                  and bounds["min"] > bounds["max"]):
                self.problem((*gpath, "min"), "min is above max; no value could pass")
            out.append(Gate(name=name, query=query.strip(), min=bounds["min"], max=bounds["max"]))
        return out
