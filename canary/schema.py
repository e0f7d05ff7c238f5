"""JSON Schemas of canary's files, from the same models that validate them.

`canary schema policy|config` prints them; the editor's YAML language server, the Helm
chart's values.schema.json and the OpenAPI description are made from these.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def policy_schema() -> dict[str, Any]:
    from pydantic import TypeAdapter

    from canary.policy import Policy

    return {"$schema": SCHEMA_DRAFT, **TypeAdapter(Policy).json_schema()}


def config_schema() -> dict[str, Any]:
    from canary.config import Config

    return {"$schema": SCHEMA_DRAFT, **Config.model_json_schema()}


SCHEMAS = {"policy": policy_schema, "config": config_schema}


# a field (or key) a document must not have, refused at its own place: validators report a
# `false` schema at the object around it, `not: {}` at the field
REFUSED: dict[str, Any] = {"not": {}}


def refused_keys(pattern: str) -> Callable[[dict[str, Any]], None]:
    """A mapping's keys that match `pattern` are refused in the schema, each at its own
    place (propertyNames would report them at the mapping)."""
    return lambda schema: schema.setdefault("patternProperties", {}).update({pattern: REFUSED})


def overrides(field: str, models: Sequence[type[Any]], description: str) -> dict[str, Any]:
    """The schema of a partial entry of a union of `models` discriminated on `field` (a
    stage's change to a policy-wide gate): `name` required, every other field optional
    with the type and bounds its model gives it, and no field of one member beside a field
    (or the `field` value) of another."""
    from pydantic import TypeAdapter

    own = {m: TypeAdapter(m).json_schema(mode="validation") for m in models}
    properties: dict[str, Any] = {}
    for schema in own.values():
        for name, sub in schema["properties"].items():
            if name == field:
                continue
            sub = {k: v for k, v in sub.items() if k not in ("default", "title")}
            same = {k: v for k, v in properties.get(name, sub).items() if k != "description"}
            if same != {k: v for k, v in sub.items() if k != "description"}:
                raise ValueError(f"{name}: typed differently in two of {models}")
            properties.setdefault(name, sub)
    kinds = [schema["properties"][field]["const"] for schema in own.values()]
    properties[field] = {"enum": kinds, "description": f"{', '.join(kinds)}: when left out, "
                                                       "the kind of the gate it changes"}
    rules = []
    for kind, schema in zip(kinds, own.values(), strict=True):
        mine = set(schema["properties"])
        others = set().union(*(set(s["properties"]) for s in own.values() if s is not schema))
        rules.append({"if": {"anyOf": [{"properties": {field: {"const": kind}},
                                        "required": [field]},
                                       *({"required": [f]} for f in sorted(mine - others))]},
                      "then": {"properties": {f: REFUSED for f in sorted(others - mine)}}})
    return {"type": "object", "description": description, "required": ["name"],
            "properties": properties, "additionalProperties": False, "allOf": rules}


# ---- the published files: editors, `canary schema`, the Helm chart ------------------------
#
# Editors' YAML language server reads JSON Schema up to draft 7, and so do older Helm 3
# releases, so what is published is the models' schema turned into draft 7 (`definitions`,
# `#/definitions/...`),
# with the few things pydantic writes that draft 7 or an editor would misread repaired.
# `python -m canary.schema write` rewrites every file below from the models; a test fails
# when a checked-in file is out of date.

DRAFT_07 = "http://json-schema.org/draft-07/schema#"
ROOT = Path(__file__).resolve().parent.parent  # the repository, when run from a checkout
CHART_TEMPLATE = Path("charts/canary/values.schema.in.json")
CHART_SCHEMA = Path("charts/canary/values.schema.json")
EDITOR_FILES = {name: Path("schemas") / f"{name}.schema.json" for name in SCHEMAS}
REGENERATE = "python -m canary.schema write"

# keywords whose value is a schema, a list of schemas, or a mapping of names to schemas;
# everything else (default, const, enum, examples, ...) is data and is never rewritten
_ONE = ("additionalProperties", "additionalItems", "items", "not", "if", "then", "else",
        "contains", "propertyNames")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependencies")
# what a $ref may stand beside in draft 7, where a $ref's siblings are ignored
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment"}
# 2019-09 and 2020-12 keywords that a draft 7 validator would silently skip
_NEWER = {"dependentRequired", "dependentSchemas", "unevaluatedProperties",
          "unevaluatedItems", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
          "$recursiveAnchor", "$anchor", "minContains", "maxContains"}


def _walk(node: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """Apply `fn` to every subschema, innermost first, following only schema keywords."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _ONE and isinstance(value, dict | list):
            out[key] = ([_walk(v, fn) for v in value] if isinstance(value, list)
                        else _walk(value, fn))
        elif key in _MANY and isinstance(value, list):
            out[key] = [_walk(v, fn) for v in value]
        elif key in _NAMED and isinstance(value, dict):
            out[key] = {k: _walk(v, fn) for k, v in value.items()}
        else:
            out[key] = value
    return fn(out)


def _draft7(node: dict[str, Any]) -> dict[str, Any]:
    newer = _NEWER & set(node)
    if newer:
        raise ValueError(f"{', '.join(sorted(newer))}: not in JSON Schema draft 7, which "
                         "editors and Helm use; express it another way in the model")
    if "$defs" in node:
        node = {("definitions" if k == "$defs" else k): v for k, v in node.items()}
    if "prefixItems" in node:  # a tuple: draft 7 writes it as a list of item schemas
        rest = {k: v for k, v in node.items() if k not in ("prefixItems", "items")}
        rest["items"] = node["prefixItems"]
        if "items" in node:
            rest["additionalItems"] = node["items"]
        node = rest
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/$defs/") and not ref.startswith("#/definitions/"):
            raise ValueError(f"$ref {ref!r}: only local definitions can be published")
        node = {**node, "$ref": "#/definitions/" + ref.split("/", 2)[2]}
        if set(node) - _ANNOTATIONS - {"$ref"}:  # draft 7 would ignore the siblings
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**rest, "allOf": [*rest.get("allOf", []), {"$ref": node["$ref"]}]}
    mapping = node.get("discriminator", {}).get("mapping") if isinstance(
        node.get("discriminator"), dict) else None
    if isinstance(mapping, dict):
        node = {**node, "discriminator": {**node["discriminator"], "mapping": {
            k: v.replace("#/$defs/", "#/definitions/") for k, v in mapping.items()}}}
    return node


def _repair(node: dict[str, Any]) -> dict[str, Any]:
    """What pydantic writes that an editor or a validator would misread."""
    default = node.get("default")
    # a duration's default is the parsed number (30.0); an editor should offer `30s`
    if node.get("type") == "string" and isinstance(default, int | float) \
            and not isinstance(default, bool):
        from canary.fields import format_duration

        text = format_duration(default)
        pattern = node.get("pattern")
        node = {k: v for k, v in node.items() if k != "default"}
        if isinstance(pattern, str) and re.search(pattern, text):
            node["default"] = text
    # a sub-model's default is the dump of its defaults, with numbers for durations; each
    # of its fields carries its own default
    if "$ref" in node and isinstance(default, dict):
        node = {k: v for k, v in node.items() if k != "default"}
    # a dict with constrained keys: pydantic refuses a key that matches no pattern
    if "patternProperties" in node and "additionalProperties" not in node:
        node = {**node, "additionalProperties": False}
    return node


def _by_kind(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A union discriminated on a field (`kind`, `router`) as `if kind is X then X's
    schema`. pydantic writes it as oneOf (its discriminator is a function, so it gives no
    mapping), and a validator then reports every other kind's complaints beside the real
    one; this way an error names only what is wrong for the kind the document chose."""
    branches = node.get("oneOf")
    if not isinstance(branches, list) or not branches \
            or not all(set(b) == {"$ref"} for b in branches):
        return node
    targets = [definitions.get(b["$ref"].rsplit("/", 1)[1], {}) for b in branches]
    common = set.intersection(*(
        {k for k, v in t.get("properties", {}).items() if isinstance(v, dict) and "const" in v}
        for t in targets))
    for field in sorted(common):
        values = [t["properties"][field]["const"] for t in targets]
        if len(set(values)) != len(values):
            continue
        required = [field in t.get("required", []) for t in targets]
        rest = {k: v for k, v in node.items() if k != "oneOf"}
        said = [t["properties"][field].get("description") for t in targets]
        return {**rest, "type": "object",
                "properties": {field: {"enum": values, **({"description": "; ".join(
                    d.rstrip(".") for d in said if d) + "."} if any(said) else {})}},
                **({"required": [field]} if all(required) else {}),
                "allOf": [{"if": {"properties": {field: {"const": value}},
                                  **({"required": [field]} if req else {})},
                           "then": branch}
                          for value, req, branch in zip(values, required, branches,
                                                        strict=True)]}
    # a union told apart by which field is present (a stage's weight, match or mirror)
    keys = [set(t.get("required", [])) - set.union(*(set(o.get("properties", {}))
                                                     for o in targets if o is not t))
            for t in targets]
    if all(len(k) == 1 for k in keys):
        rest = {k: v for k, v in node.items() if k != "oneOf"}
        fields = [next(iter(k)) for k in keys]
        return {**rest, "type": "object",
                "anyOf": [{"required": [f]} for f in fields],
                "allOf": [{"if": {"required": [f]}, "then": branch}
                          for f, branch in zip(fields, branches, strict=True)]}
    return node


def published(name: str) -> dict[str, Any]:
    """The schema of `name` (policy or config) as editors and Helm read it: draft 7."""
    schema = _walk(SCHEMAS[name](), lambda n: _draft7(_repair(n)))
    definitions = schema.get("definitions", {})
    schema = _walk(schema, lambda n: _by_kind(n, definitions))
    return {"$schema": DRAFT_07,
            "$comment": f"generated from canary's models: `canary schema {name}` (in the "
                        f"repository: {REGENERATE})",
            **{k: v for k, v in schema.items() if k not in ("$schema", "$comment")}}


def _pointer(schema: dict[str, Any], pointer: str) -> Any:
    node: Any = schema
    for part in [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise ValueError(f"{pointer!r}: no such place in the schema; the model changed, "
                             f"so change {CHART_TEMPLATE}")
    return node


def _refs(node: Any) -> set[str]:
    found: set[str] = set()

    def collect(n: dict[str, Any]) -> dict[str, Any]:
        if isinstance(n.get("$ref"), str):
            found.add(n["$ref"].rsplit("/", 1)[1])
        return n

    _walk(node, collect)
    return found


def chart_values_schema(template: dict[str, Any]) -> dict[str, Any]:
    """The chart's values.schema.json: `template` with each `{"x-canary": {...}}` node
    replaced by a part of a published schema. `{"schema": "config", "at": "/pointer",
    "drop": [keys]}` takes the node at the JSON pointer (the whole document for ""),
    without the properties in `drop` (the keys the chart sets itself). The definitions
    that part uses move to the chart's `definitions` as `<schema>.<Name>`, their $refs
    rewritten."""
    sources = {name: published(name) for name in SCHEMAS}
    definitions: dict[str, Any] = {}

    def fill(node: dict[str, Any]) -> dict[str, Any]:
        spec = node.get("x-canary")
        if not isinstance(spec, dict):
            return node
        name = spec["schema"]
        source = sources[name]
        part = copy.deepcopy(_pointer(source, spec.get("at", "")))
        if spec.get("at", "") == "":
            part = {k: v for k, v in part.items()
                    if k not in ("$schema", "$comment", "definitions", "title")}
        drop = set(spec.get("drop", []))
        if drop:
            missing = drop - set(part.get("properties", {}))
            if missing:
                raise ValueError(f"{', '.join(sorted(missing))}: not a field of the {name} "
                                 f"schema any more; change {CHART_TEMPLATE}")
            part["properties"] = {k: v for k, v in part["properties"].items() if k not in drop}
            part["required"] = [k for k in part.get("required", []) if k not in drop]
            if not part["required"]:
                del part["required"]
        # the definitions this part needs, and the ones they need in turn
        todo, used = _refs(part), set()
        while todo:
            ref = todo.pop()
            used.add(ref)
            todo |= _refs(source["definitions"][ref]) - used

        def prefix(n: dict[str, Any]) -> dict[str, Any]:
            if isinstance(n.get("$ref"), str):
                return {**n, "$ref": f"#/definitions/{name}.{n['$ref'].rsplit('/', 1)[1]}"}
            return n

        for ref in used:
            definitions[f"{name}.{ref}"] = _walk(copy.deepcopy(source["definitions"][ref]),
                                                 prefix)
        extra = {k: v for k, v in node.items() if k != "x-canary"}
        return {**_walk(part, prefix), **extra}

    out = _walk(template, fill)
    out["definitions"] = {**out.get("definitions", {}), **dict(sorted(definitions.items()))}
    return {"$schema": out.pop("$schema", DRAFT_07),
            "$comment": f"generated by {REGENERATE} from {CHART_TEMPLATE.name} and canary's "
                        "models; edit those, not this file",
            **{k: v for k, v in out.items() if k != "$comment"}}


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def generated_files(root: Path = ROOT) -> dict[Path, str]:
    """Every file made from the models, by path relative to the repository, and its text."""
    files = {path: _text(published(name)) for name, path in EDITOR_FILES.items()}
    template = json.loads((root / CHART_TEMPLATE).read_text())
    files[CHART_SCHEMA] = _text(chart_values_schema(template))
    return files


def stale_files(root: Path = ROOT) -> list[Path]:
    """The generated files whose checked-in text differs from what the models give."""
    out = []
    for path, text in generated_files(root).items():
        try:
            current = (root / path).read_text()
        except FileNotFoundError:
            current = None
        if current != text:
            out.append(path)
    return out


def write(root: Path = ROOT) -> list[Path]:
    """Rewrite the generated files that are out of date; return them."""
    changed = []
    for path, text in generated_files(root).items():
        target = root / path
        if not target.exists() or target.read_text() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m canary.schema", description="write the JSON "
                                "Schema files made from canary's models (schemas/*.json and "
                                "the chart's values.schema.json)")
    p.add_argument("action", choices=["write", "check"], help="write: rewrite the files "
                   "that are out of date; check: exit 1 if any is")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: the "
                   "one this canary runs from)")
    args = p.parse_args(argv)
    if not (args.root / CHART_TEMPLATE).is_file():
        p.error(f"{args.root} is not a canary repository (no {CHART_TEMPLATE}); give --root")
    if args.action == "check":
        stale = stale_files(args.root)
        for path in stale:
            print(f"{path}: out of date with the models; run {REGENERATE}")
        return 1 if stale else 0
    for path in write(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
