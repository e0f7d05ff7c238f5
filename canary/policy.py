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
BUILTIN_VARS = frozenset({"target", "canary_version", "stable_version", "rollout_id", "interval",
                          "version"})
GATE_KINDS = ("threshold", "compare", "errors")
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
    """A check of the canary. `threshold` (the default): one query, bounded by min/max.
    `compare`: the same query for canary and stable ({{ version }}), or an explicit
    `baseline`, bounded by max_increase and/or max_ratio. `errors`: request and error
    counters of both versions, judged by the sequential test in gates/sequential.py."""

    name: str
    query: str = ""
    min: float | None = None
    max: float | None = None
    kind: str = "threshold"
    baseline: str | None = None
    max_increase: float | None = None
    max_ratio: float | None = None
    requests: str | None = None
    errors: str | None = None
    tolerance: float = 1.0
    alpha: float = 0.01
    gross: float = 5.0
    final_gross: float = 2.0
    detect_rate: float = 0.01
    warmup: float = 0.0

    def bounds(self) -> str:
        if self.kind == "errors":
            return f"errors <= stable x {self.tolerance:g}, alpha {self.alpha:g}"
        parts = []
        for key in ("min", "max", "max_increase", "max_ratio"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key.replace('_', ' ')} {value:g}")
        return ", ".join(parts)

    def queries(self) -> list[str]:
        return [q for q in (self.query, self.baseline, self.requests, self.errors) if q]


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
        for g in (*self.gates, *(g for s in self.stages for g in s.gates)):
            for q in g.queries():
                names |= template_names(q)
            if g.kind != "threshold":
                names.add("stable_version")  # the other side of every comparison
        return names - {"version"}

    def to_dict(self) -> dict[str, Any]:
        def gate(g: Gate) -> dict[str, Any]:
            d: dict[str, Any] = {"name": g.name}
            defaults = Gate(name=g.name)
            for key in ("kind", "query", "min", "max", "baseline", "max_increase", "max_ratio",
                        "requests", "errors", "tolerance", "alpha", "gross", "final_gross",
                        "detect_rate", "warmup"):
                value = getattr(g, key)
                if key == "warmup" and value:
                    value = format_duration(value)
                if value is not None and (value != getattr(defaults, key) or key == "query"):
                    d[key] = value
            if not d.get("query"):
                d.pop("query", None)
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
_GATE_KEYS = {"name", "query", "min", "max", "kind", "baseline", "max_increase", "max_ratio",
              "requests", "errors", "tolerance", "alpha", "gross", "final_gross", "detect_rate",
              "warmup"}


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
            kind = item.get("kind", base.kind if base else "threshold")
            if kind not in GATE_KINDS:
                self.problem((*gpath, "kind"), f"must be one of {', '.join(GATE_KINDS)}")
                continue
            texts: dict[str, str | None] = {}
            for key in ("query", "baseline", "requests", "errors"):
                # (an inherited errors gate has query "": not given, not a bad query)
                value = item.get(key, (getattr(base, key) or None) if base else None)
                if value is not None and (not isinstance(value, str) or not value.strip()):
                    self.problem((*gpath, key), "must be a PromQL query")
                    value = None
                texts[key] = value.strip() if isinstance(value, str) else None
                for bad in re.findall(r"\{\{(?![^{}]*\}\})|\{\{\s*[^A-Za-z_\s][^}]*\}\}",
                                      value or ""):
                    self.problem((*gpath, key), f"malformed template {bad!r}; write {{{{ name }}}}")
            nums: dict[str, float | None] = {}
            bad_number = False
            for key in ("min", "max", "max_increase", "max_ratio", "tolerance", "alpha", "gross",
                        "final_gross", "detect_rate"):
                value = item.get(key, getattr(base, key) if base else None)
                if value is not None and (isinstance(value, bool)
                                          or not isinstance(value, int | float)):
                    self.problem((*gpath, key), "must be a number")
                    value, bad_number = None, True
                nums[key] = float(value) if value is not None else None
            fields: dict[str, Any] = {k: v for k, v in nums.items() if v is not None}
            if kind == "threshold":
                if not texts["query"]:
                    self.problem((*gpath, "query"), "required: a PromQL query that returns one "
                                                    "number")
                if bad_number:
                    pass
                elif nums["min"] is None and nums["max"] is None:
                    self.problem(gpath, "a gate needs min or max (or both): the bound it must "
                                        "stay within")
                elif (nums["min"] is not None and nums["max"] is not None
                      and nums["min"] > nums["max"]):
                    self.problem((*gpath, "min"), "min is above max; no value could pass")
            elif kind == "compare":
                q = texts["query"] or ""
                if not q:
                    self.problem((*gpath, "query"), "required: the query for the canary, with "
                                                    "{{ version }} where the version goes")
                elif not texts["baseline"] and "version" not in template_names(q):
                    self.problem((*gpath, "query"), "use {{ version }} so the same query reads "
                                                    "canary and stable, or give a baseline query")
                if nums["max_increase"] is None and nums["max_ratio"] is None and not bad_number:
                    self.problem(gpath, "a compare gate needs max_increase or max_ratio")
            else:
                for key in ("requests", "errors"):
                    if not texts[key]:
                        self.problem((*gpath, key), f"required: a counter query of {key}, with "
                                                    "{{ version }} where the version goes")
                    elif "version" not in template_names(texts[key] or ""):
                        self.problem((*gpath, key), "use {{ version }}: it is read for canary "
                                                    "and for stable")
                if (nums["alpha"] is not None and not 0 < nums["alpha"] < 0.5):
                    self.problem((*gpath, "alpha"), "must be between 0 and 0.5, e.g. 0.01")
                if nums["tolerance"] is not None and nums["tolerance"] <= 0:
                    self.problem((*gpath, "tolerance"), "must be above 0 (1 = no worse than "
                                                        "stable)")
                for key, example in (("gross", "5"), ("final_gross", "2")):
                    factor = nums[key]
                    if factor is not None and not 1 < factor <= 1000:
                        self.problem((*gpath, key), f"must be above 1 and at most 1000, e.g. "
                                                    f"{example} (a {example}x regression)")
                rate = nums["detect_rate"]
                if rate is not None and not 0 < rate < 1:
                    self.problem((*gpath, "detect_rate"), "must be between 0 and 1, e.g. 0.01 "
                                                          "(1% errors)")
            if "warmup" in item or (base and base.warmup):
                try:
                    fields["warmup"] = (parse_duration(item["warmup"]) if "warmup" in item
                                        else base.warmup if base else 0.0)
                except ValueError as e:
                    self.problem((*gpath, "warmup"), str(e))
            fields.update({k: v for k, v in texts.items() if v is not None})
            out.append(Gate(name=name, kind=kind, **fields))
        return out
