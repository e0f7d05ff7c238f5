"""Who may call the API: the tokens of the config's `auth:` (a name, the sha256 of the
token, a role, the targets it may see) and the check of a presented bearer token, hashed
and compared against every configured hash in constant time."""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import hmac
from collections.abc import Sequence
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.dataclasses import dataclass

from canary.fields import SECTION, Setting


class Role(enum.IntEnum):
    VIEWER = 1
    PIPELINE = 2
    ONCALL = 3


# a target name, or a glob over target names: *, ?, [abc], [!abc], [a-z]
_TARGET_GLOB = r"^(?:[A-Za-z0-9_.*?-]|\[!?[A-Za-z0-9_.-]+\])+$"
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)

_ROLES = tuple(r.name.lower() for r in Role)  # viewer, pipeline, oncall
# canary reads a role in any case (Oncall): so does the schema, which still offers the
# lower-case names to complete
_ROLE_SCHEMA = {"type": "string", "anyOf": [
    {"enum": list(_ROLES)},
    {"pattern": "^(" + "|".join("".join(f"[{c.upper()}{c}]" for c in r) for r in _ROLES) + ")$"}]}


def _role(value: object) -> object:
    if isinstance(value, Role):  # built in code
        return value
    if isinstance(value, str) and value.upper() in Role.__members__:
        return Role[value.upper()]
    # not the enum's numbers: `role: 1` or `role: true` would read as viewer
    raise ValueError("must be one of viewer, pipeline, oncall")


@dataclass(frozen=True, config=_CONFIG)
class Token:
    name: Annotated[Setting, Field(max_length=100)]
    """Who holds the token; events and reasons name them by it. Unique."""
    sha256: Annotated[str, Field(strict=True, pattern=r"^[0-9a-fA-F]{64}$"),
                      AfterValidator(str.lower)]
    """The sha256 of the bearer token, 64 hex digits (`printf %s "$TOKEN" | sha256sum`);
    the token itself is never stored."""
    role: Annotated[Role, BeforeValidator(_role), WithJsonSchema(_ROLE_SCHEMA)]
    """viewer reads; pipeline reads, starts and aborts; oncall does everything."""
    targets: Annotated[tuple[Annotated[str, Field(strict=True, pattern=_TARGET_GLOB)], ...],
                       Field(min_length=1, max_length=1000)] | None = None
    """Names or globs (* ? [abc] [!abc]) of the targets this token may read or act on;
    left out: every target."""

    def may_see(self, target: str) -> bool:
        return self.targets is None or any(fnmatch.fnmatchcase(target, g) for g in self.targets)


class AuthDoc(BaseModel):
    model_config = ConfigDict(**SECTION, json_schema_extra={"anyOf": [  # at least one token
        {"required": ["tokens"], "properties": {"tokens": {"minItems": 1}}},
        {"required": ["tokens_file"], "properties": {"tokens_file": {"type": "string"}}}]})
    tokens: Annotated[list[Token], Field(max_length=10_000)] = []
    """Who may call the API: {name, sha256, role, targets?} each."""
    tokens_file: Setting | None = None
    """A YAML file with more tokens (a list, or tokens: [...]), e.g. from a Secret."""


MESSAGES = {
    "sha256": "must be 64 hex digits: the sha256 of the token, e.g. "
              "`printf %s \"$TOKEN\" | sha256sum`",
    "role": "must be one of viewer, pipeline, oncall",
    "targets": "must be a non-empty list of target names or globs, like [\"shop\", \"shop-*\"] "
               "(letters, digits, '.', '_', '-' and the wildcards * ? [abc] [!abc] [a-z]); "
               "leave it out for every target",
    "targets[]": "{value} is not a target name or glob: letters, digits, '.', '_', '-' and the "
                 "wildcards * ? [abc] [!abc] [a-z]",
}


class Unauthorized(Exception):
    pass


class Forbidden(Exception):
    pass


def authenticate(header: str | None, tokens: Sequence[Token]) -> Token:
    """The token in `Authorization: Bearer <token>`. The scheme is case-insensitive
    (RFC 9110 section 11.1), so `bearer` is accepted too."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>` "
                           "(the CLI reads CANARY_TOKEN)")
    try:
        # aiohttp hands over bytes that are not UTF-8 as lone surrogates
        presented = credentials.strip().encode("utf-8")
    except UnicodeEncodeError:
        raise Unauthorized("the token is not UTF-8 text; send the token exactly as issued")\
            from None
    digest = hashlib.sha256(presented).hexdigest()
    found: Token | None = None
    for t in tokens:  # no early exit: the time taken does not depend on which token matched
        if hmac.compare_digest(digest, t.sha256):
            found = t
    if found is None:
        raise Unauthorized("unknown token; ask for a token listed in the controller's auth.tokens")
    return found
