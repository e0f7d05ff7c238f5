"""Turning a model's ValidationError into the problems an SRE reads: `file:line: field:
message`, every one at once, in canary's words rather than pydantic's.

The models (policy.py, config.py, api/bodies.py) say the shape once; this module says
how a broken shape is reported. Each model may name, per field, the message for any
type or range error (`messages`), so `weight: 150` still reads "must be a whole percent
from 1 to 100" rather than "Input should be less than or equal to 100".
"""

from __future__ import annotations

import decimal
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from pydantic import Discriminator, Tag, TypeAdapter, ValidationError
from pydantic.json_schema import SkipJsonSchema

from canary import yamlsrc
from canary.errors import Problem

# a union member's tag appears in an error's location; it is never a key of the document
TAG_MARK = "="


def whole(value: object) -> object:
    """A whole number written with a fraction of zero (`5.0`) as that number: JSON Schema
    has no other integer, so the editor and helm accept it where a whole number goes, and
    canary reads it as they do. (5.5, true and "5" stay refused.)"""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def tag(kind_field: str, value: str) -> Tag:
    return Tag(f"{kind_field}{TAG_MARK}{value}")


# a discriminated union's error, by its custom type: (field, message for an unknown
# value of the field, message for something that is not a mapping at all)
UNIONS: dict[str, tuple[str, str, str]] = {}


def union(pick: Callable[[Any], str | None], error_type: str, field: str, bad_value: str,
          not_mapping: str) -> Discriminator:
    """A discriminator on `field` whose errors read `bad_value` (at the field) or
    `not_mapping` (at the item)."""
    UNIONS[error_type] = (field, bad_value, not_mapping)
    return Discriminator(pick, custom_error_type=error_type, custom_error_message=not_mapping)


def kind_of(field: str, kinds: Sequence[str], default: str | None = None
            ) -> Callable[[Any], str | None]:
    """The discriminator of a union on `field` (a mapping's key or an object's attribute):
    the member's tag, or None for a value of `field` that is not one of `kinds`."""

    def pick(value: Any) -> str | None:
        kind = value.get(field, default) if isinstance(value, dict) else getattr(
            value, field, None)
        return f"{field}{TAG_MARK}{kind}" if kind in kinds else None

    return pick


def problem(doc: yamlsrc.Doc, path: yamlsrc.Path, message: str) -> Problem:
    """A problem at `path` of `doc`, on its line."""
    return Problem(doc.file, doc.line(path), field_name(path), message)


def field_name(path: Sequence[str | int]) -> str:
    name = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
    return name.replace(".[", "[") or "(file)"


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold, with their tags: [(tag or None, type)]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        tags = [m.tag for m in meta if isinstance(m, Tag)]
        inner = _members(base)
        return [(tags[0] if tags else t, tp) for t, tp in inner]
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_members(arg))
        return out
    return [(None, annotation)]


def _fields(tp: Any) -> dict[str, Any] | None:
    """A model's or a pydantic dataclass's fields, or None for anything else."""
    fields = getattr(tp, "__pydantic_fields__", None) if isinstance(tp, type) else None
    return fields if isinstance(fields, dict) else None


def model_at(root: type[Any], loc: Sequence[str | int]) -> type[Any] | None:
    """The model class whose fields live at `loc` (a ValidationError location)."""
    current: Any = root
    for part in loc:
        candidates = _members(current)
        if isinstance(part, str) and TAG_MARK in part:
            current = next((tp for t, tp in candidates if t == part), None)
            continue
        model = next((tp for _, tp in candidates if _fields(tp) is not None), None)
        if model is not None and isinstance(part, str):
            info = (_fields(model) or {}).get(part)
            if info is None:
                return None
            current = info.annotation
            continue
        container = next((tp for _, tp in candidates
                          if typing.get_origin(tp) in (list, tuple, dict)), None)
        if container is None:
            return None
        args = [a for a in typing.get_args(container) if a is not Ellipsis]
        current = args[-1] if args else None
    return next((tp for _, tp in _members(current) if _fields(tp) is not None), None)


_GENERIC = {
    "missing": "required",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
}


def _message(e: Mapping[str, Any], root: type[Any], path: tuple[str | int, ...],
             loc: tuple[str | int, ...], messages: Mapping[str, str],
             required: Mapping[str, str]) -> str:
    kind = e["type"]
    ctx = e.get("ctx") or {}
    last = next((p for p in reversed(path) if isinstance(p, str)), "")
    if kind == "value_error":
        return str(ctx.get("error", e["msg"]))
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        model = model_at(root, loc[:-1])
        # (fields the schema skips are no file's: a target's name is its key, a policy's
        # source where it was read from)
        allowed = sorted(n for n, f in (_fields(model) or {}).items()
                         if not any(type(m) is SkipJsonSchema for m in f.metadata))
        return "unknown field" + (f"; expected one of {', '.join(allowed)}" if allowed else "")
    if kind in ("missing", "missing_argument"):
        return required.get(last) or "required"
    if kind.startswith("union_tag") or e["msg"].startswith("must "):
        return str(e["msg"])  # a discriminator's own message
    value = e.get("input")
    if kind == "finite_number" or (kind == "float_type" and isinstance(value, int)
                                   and not isinstance(value, bool)):  # too big for a float
        shown = str(e.get("input"))
        shown = shown if len(shown) < 20 else shown[:16] + "..."
        return (f"{shown} is not a finite number; write a number like 0.01, or leave the "
                "field out")
    if path and isinstance(path[-1], int) and f"{last}[]" in messages:
        return messages[f"{last}[]"].format(value=repr(e.get("input")))  # one item of a list
    names = [p for p in path if isinstance(p, str)]
    if len(names) > 1 and f"{names[-2]}.{last}" in messages:  # a field named as another's
        return messages[f"{names[-2]}.{last}"]
    if last in messages:
        return messages[last]
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '').replace(chr(39), '')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "above", "greater_than_equal": "at least",
                 "less_than": "below", "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()), "")
        return f"must be {words} {bound}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "string_too_short":
        return "must not be empty"
    return _GENERIC.get(kind, str(e["msg"]))


_EXPONENT = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?)(\d+)")


def _field_takes(root: type[Any], loc: tuple[str | int, ...]) -> Callable[[Any], bool]:
    """Whether the field at `loc` (a ValidationError location) takes a value, by its own
    type and constraints (not its model's checks across fields); unknown: it does."""
    name = loc[-1] if loc else None
    model = model_at(root, loc[:-1]) if isinstance(name, str) else None
    info = (_fields(model) or {}).get(name) if isinstance(name, str) else None
    if info is None:
        return lambda value: True
    annotation: Any = (typing.Annotated[(info.annotation, *info.metadata)] if info.metadata
                       else info.annotation)
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def takes(value: Any) -> bool:
        try:
            adapter.validate_python(value, context={"file": True})
        except ValidationError:
            return False
        return True

    return takes


def _exponent_hint(e: Mapping[str, Any], root: type[Any], loc: tuple[str | int, ...]) -> str:
    """YAML 1.1 reads a number with an unsigned exponent (`5e2`) as text (canary's loader
    reads a signed one, `5e-3`, as the number: yamlsrc), and a quoted one (`"5e-3"`) is
    text anyway; a number field refuses it with a message that looks wrong for a number
    in range. Say how to write it: only the forms
    YAML reads as a number the field at `loc` takes, so following the hint never meets
    a refusal again; of a number the field would refuse, or none can hold, say so."""
    value = e.get("input")
    if e["type"] not in ("float_type", "float_parsing", "int_type", "int_parsing") \
            or not isinstance(value, str):
        return ""
    m = _EXPONENT.fullmatch(value.strip())
    if m is None or _reads_as_number(value.strip()):
        # (a signed exponent is a number to canary's loader: text here, it was quoted)
        return _quoted_hint(value.strip(), root, loc)
    said = f" (YAML reads {value.strip()} as text, not a number"
    number = decimal.Decimal(m.group(0))
    if not math.isfinite(float(number)):
        return f"{said}, and it is too large for a number: at most about 1.8e+308)"
    if float(number) == 0 and number != 0:
        return f"{said}, and it is too small for a number: it reads as 0)"
    mantissa = m.group(1) if "." in m.group(1) else m.group(1) + ".0"
    written = f"{mantissa}e{m.group(2) or '+'}{m.group(3)}"
    plain = format(number, "f")  # (never an exponent: that is text again)
    forms = [f for f in (written, plain) if len(f) <= 24 or f == written]
    takes = _field_takes(root, loc)
    offered = [f for f in forms if takes(yaml.safe_load(f))]
    if not offered:
        return f"{said}; the number it stands for, {forms[-1]}, is refused too)"
    return f"{said}: write {' or '.join(offered)})"


def _quoted_hint(text: str, root: type[Any], loc: tuple[str | int, ...]) -> str:
    """Text that YAML would read as a number, written bare, was quoted: `"0.005"`. The
    field's message alone ('must be between 0 and 0.5') would look wrong of it; say to
    drop the quotes, when the number is one the field takes."""
    if not _reads_as_number(text):
        return ""
    if not _field_takes(root, loc)(yamlsrc.scalar(text)):
        return ""
    return f' (YAML reads "{text}" in quotes as text, not a number: write {text})'


def _reads_as_number(text: str) -> bool:
    """Would canary's loader read `text`, written bare, as a number?"""
    try:
        float(text)  # (a number's characters only: no YAML tag, anchor or flow)
        number = yamlsrc.scalar(text)
    except (ValueError, yaml.YAMLError):
        return False
    return isinstance(number, int | float) and not isinstance(number, bool)


def problems(doc: yamlsrc.Doc, error: ValidationError, root: type[Any], *,
             at: tuple[str | int, ...] = (), messages: Mapping[str, str] | None = None,
             required: Mapping[str, str] | None = None) -> list[Problem]:
    """Each error of `error` as a Problem on `doc`'s lines; `at` is where the validated
    value sits in the document."""
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in error.errors(include_url=False):
        loc = tuple(e["loc"])
        path = (*at, *(p for p in loc if not (isinstance(p, str) and TAG_MARK in p)
                       and p != "[key]"))
        if e["type"] in UNIONS:
            field, bad_value, not_mapping = UNIONS[e["type"]]
            if isinstance(e.get("input"), dict):
                path, message = (*path, field), bad_value
            else:
                message = not_mapping
        else:
            message = _message(e, root, path, loc, messages or {}, required or {})
            message += _exponent_hint(e, root, loc)
            # a check across an object's fields that names the one it is about
            # ("promotion: ..."): reported at that field, on its line, when it is written
            about = re.match(r"([a-z_]+): (.+)", message, re.S) \
                if e["type"] == "value_error" else None
            if about and (*path, about.group(1)) in doc.lines:
                path, message = (*path, about.group(1)), about.group(2)
        name = field_name(path)
        if (name, message) in seen:
            continue
        seen.add((name, message))
        out.append(Problem(doc.file, doc.line(path), name, message))
    return out
