"""Bearer tokens: only their sha256 is configured; every presented token is hashed and
compared against every configured hash in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from canary.config import Token


class Unauthorized(Exception):
    pass


class Forbidden(Exception):
    pass


def authenticate(header: str | None, tokens: Sequence[Token]) -> Token:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>` "
                           "(the CLI reads CANARY_TOKEN)")
    digest = hashlib.sha256(header[len("Bearer "):].strip().encode()).hexdigest()
    found: Token | None = None
    for t in tokens:  # no early exit: the time taken does not depend on which token matched
        if hmac.compare_digest(digest, t.sha256):
            found = t
    if found is None:
        raise Unauthorized("unknown token; ask for a token listed in the controller's auth.tokens")
    return found

