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
