"""The value types every model shares: durations (text in files, seconds inside), strict
numbers and text, PromQL queries and their `{{ name }}` templates, and the bounded names
and URLs of the controller config. One definition each, used by the policy, the config
and the API bodies, and stated in their JSON Schemas."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, localcontext
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from canary.errors import InvalidInput
from canary.model import VERSION_PATTERN

_PART = r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)"  # one part of a duration; the schema's pattern too
_DURATION_PART = re.compile(_PART)
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"  # a {{ name }}, an Alertmanager label, an env variable
_TEMPLATE = re.compile(rf"\{{\{{\s*({IDENTIFIER})\s*\}}\}}")
BUILTIN_VARS = frozenset({"target", "canary_version", "stable_version", "rollout_id", "interval",
                          "version"})
_UNIT_MS = {"ms": Decimal(1), "s": Decimal(1000), "m": Decimal(60_000), "h": Decimal(3_600_000)}
# Every duration is at most 30 days: no stage, deadline or timeout of a canary needs more,
# and anything bigger is a typo (a 400-digit number once reached the store as infinity).
MAX_DURATION = 30 * 24 * 3600.0
MAX_DURATION_TEXT = 32     # characters; `1h59m59s999ms` is 13
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


_DURATION_PATTERN = f"^({_PART})+$"
_MALFORMED = re.compile(r"\{\{(?![^{}]*\}\})|\{\{\s*[^A-Za-z_\s][^}]*\}\}")
MAX_QUERY = 10_000  # characters


def from_file(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("file"))


def _not_from_files(value: object, info: ValidationInfo) -> object:
    if from_file(info):  # an unknown field there, like any other
        raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")
    return value


# a field no file sets (a policy's source, a target's name: its key) and no schema shows
NotInFiles = SkipJsonSchema[Annotated[str, AfterValidator(_not_from_files)]]


def _duration(value: object, info: ValidationInfo) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and not from_file(info):
        return float(value)
    return parse_duration(value)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be longer than 0")
    return value


def templated(value: str) -> str:
    bad = _MALFORMED.search(value)
    if bad:
        raise ValueError(f"malformed template {bad.group(0)!r}; write {{{{ name }}}}")
    return value


def _query(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a PromQL query")
    return templated(value).strip()


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


# ---- the controller config's values -------------------------------------------------------

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"  # a policy's, a target's, a receiver's name
# a port, 1-65535 (up to 5 digits, leading zeros allowed), for host:port
PORT = (r"(0{0,4}[1-9]|0{0,3}[1-9][0-9]|0{0,2}[1-9][0-9]{2}|0?[1-9][0-9]{3}|[1-5][0-9]{4}"
        r"|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])")
Setting = Annotated[str, Field(strict=True, min_length=1, max_length=4096)]


def a_path(value: str) -> str:
    """A path the file system can take, on any machine: no NUL, each name at most 255
    bytes, the whole at most 4095 (else the first write fails, mid-rollout)."""
    if "\x00" in value:
        raise ValueError("contains a NUL character, which no path can")
    if len(value.encode("utf-8", "surrogatepass")) > 4095:
        raise ValueError("is longer than a path can be (4095 bytes)")
    if any(len(name.encode("utf-8", "surrogatepass")) > 255 for name in value.split("/")):
        raise ValueError("has a name longer than a file name can be (255 bytes)")
    return value


def an_argument(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character, which no command argument can")
    return value
Name = Annotated[str, Field(strict=True, pattern=NAME_PATTERN)]
Dns = Annotated[str, Field(strict=True, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                           max_length=253)]
Version = Annotated[str, Field(strict=True, pattern=VERSION_PATTERN)]
EnvName = Annotated[str, Field(strict=True, pattern=f"^{IDENTIFIER}$")]
HttpUrl = Annotated[str, Field(strict=True, pattern=r"^https?://", max_length=2048)]
# a URL canary sends to: a host (a DNS name in ASCII, an IPv4 address, or an [IPv6
# address]) without user@, a port in range, then a path, query or fragment without control
# characters. The schema states it and send_url() checks the same, so an editor, helm and
# canary agree; each part is one the HTTP clients (aiohttp, requests) can use.
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS = rf"({_LABEL}\.)*[A-Za-z0-9_-]{{0,62}}[A-Za-z_-][A-Za-z0-9_-]{{0,62}}\.?"  # not all digits
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"({_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join([  # RFC 3986's IPv6address, and a zone (%25eth0)
    rf"({_H16}:){{6}}{_LS32}", rf"::({_H16}:){{5}}{_LS32}", rf"({_H16})?::({_H16}:){{4}}{_LS32}",
    rf"(({_H16}:){{0,1}}{_H16})?::({_H16}:){{3}}{_LS32}",
    rf"(({_H16}:){{0,2}}{_H16})?::({_H16}:){{2}}{_LS32}",
    rf"(({_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}", rf"(({_H16}:){{0,4}}{_H16})?::{_LS32}",
    rf"(({_H16}:){{0,5}}{_H16})?::{_H16}", rf"(({_H16}:){{0,6}}{_H16})?::"])
SEND_URL_PATTERN = (rf"^https?://({_IPV4}|{_DNS}|\[({_IPV6})(%25[A-Za-z0-9._~-]+)?\])"
                    rf"(:{PORT})?([/?#][^\x00-\x1f\x7f]*)?$")


def send_url(value: str) -> str:
    """A URL canary can send to, as SEND_URL_PATTERN says; the message says what is wrong
    but never repeats the URL (a chat's incoming-webhook URL is itself a secret)."""
    if not re.fullmatch(SEND_URL_PATTERN, value):
        raise ValueError(f"is not a URL canary can send to ({_why_not(value)}); write "
                         "http(s)://HOST[:PORT]/PATH")
    return value


def _why_not(url: str) -> str:
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in authority) \
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "a space or control character in it"
    if "@" in authority:
        return "user@ in it: credentials do not belong in a URL"
    host, port = authority, None
    if authority.startswith("["):
        host, bracket, after = authority.partition("]")
        if not bracket:
            return "an IPv6 address without its closing ]"
        port = after.removeprefix(":") if after else None  # (anything else there: no port)
    elif ":" in authority:
        host, _, port = authority.partition(":")
    if not host.strip("[]"):
        return "no host"
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return "the port must be a number from 1 to 65535"
    if any(ord(c) > 0x7E for c in host):
        return "a host not in ASCII: write an international name as its xn-- form"
    return "not a host name, IPv4 address or [IPv6 address]"


SendUrl = Annotated[HttpUrl, AfterValidator(send_url),
                    Field(json_schema_extra={"pattern": SEND_URL_PATTERN})]


# a section of the controller config: no unknown keys, no coercion, frozen, each field's
# docstring its description in the schema
SECTION = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)


class Section(BaseModel):
    model_config = SECTION
