"""A policy's webhooks: their shape in the policy file, and on the wire: POST the rollout's JSON
and `{"hook", "when"}` to a hook's URL, and turn its answer into a Reading (gating hooks; told
hooks go through the outbox in canary/notify.py).

A call is bounded by the hook's own `timeout`, retries included (tenacity, with backoff,
for no answer or a 5xx/429): a hook that hangs costs that much and no more. The answer
shown is the status and the first bytes of the body, as plain text."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import aiohttp
from pydantic import AfterValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from canary.fields import PositiveDuration, Text, format_duration, render, templated
from canary.gates.kinds import GateName
from canary.model import Reading, Verdict
from canary.text import is_control

log = logging.getLogger("canary.hooks")
SHOWN = 200      # characters of a hook's answer kept in the gate's detail and the events
ATTEMPTS = 3     # tries within the timeout


# ---- a policy's `webhooks:` --------------------------------------------------------------

HOOK_TIMES = ("pre-rollout", "stage", "pre-promotion", "post-rollout", "rollback")
GATING_HOOKS = ("pre-rollout", "stage", "pre-promotion")  # asked; the others are told
HOOK_PREFIX = "hook:"  # a gating webhook's name among a rollout's gates


def _hook_url(value: str) -> str:
    if not re.match(r"^https?://", value):
        raise ValueError("must start with http:// or https://")
    return templated(value)


@dataclass(frozen=True, config=ConfigDict(extra="forbid", use_attribute_docstrings=True))
class Webhook:
    """A URL POSTed the rollout's JSON at one moment of its life (README: A smoke-test hook):
    pre-rollout, stage and pre-promotion hooks gate (2xx lets it go on), post-rollout and
    rollback hooks are told."""

    name: GateName
    """The hook's name, unique in the policy; a gating hook shows as gate hook:NAME."""
    when: Literal["pre-rollout", "stage", "pre-promotion", "post-rollout", "rollback"]
    """When it is called: pre-rollout, stage and pre-promotion gate (a 2xx lets the rollout
    go on); post-rollout and rollback are told."""
    url: Annotated[Text, Field(max_length=2048, json_schema_extra={"pattern": r"^https?://"}),
                   AfterValidator(_hook_url)]
    """http(s) URL POSTed the rollout's JSON; may use {{ vars }} like queries."""
    timeout: PositiveDuration = 10.0
    """How long one call may take, retries included (default 10s)."""

    @property
    def gates(self) -> bool:
        return self.when in GATING_HOOKS


MESSAGES = {
    # (a hook's name is any text: the policy's rule for its own name is not a hook's)
    "webhooks.name": "must be text of 1 to 100 characters, e.g. smoke-tests",
    "webhooks": "must be a list of webhooks, each with name, when and url",
    "when": f"must be one of {', '.join(HOOK_TIMES)}",
    "url": "must be an http:// or https:// URL (it may use {{ vars }} like queries)",
}
REQUIRED = {
    "when": f"required: one of {', '.join(HOOK_TIMES)}",
    "url": "required: the URL canary POSTs the rollout to",
}


class _Again(Exception):
    """An answer worth another try: none at all, a 5xx or a 429."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def shown(body: bytes) -> str:
    text = body[:SHOWN * 4].decode("utf-8", "replace")
    text = "".join(" " if is_control(c) else c for c in text).strip()
    return text[:SHOWN] + ("…" if len(text) > SHOWN else "")


def payload(rollout: Mapping[str, Any], hook: Webhook) -> dict[str, Any]:
    return {**rollout, "hook": hook.name, "when": hook.when}


async def call(session: aiohttp.ClientSession, hook: Webhook, values: Mapping[str, str],
               rollout: Mapping[str, Any]) -> tuple[bool, str]:
    """(a 2xx came back, what the hook answered), within the hook's timeout."""
    url = render(hook.url, values)
    body = payload(rollout, hook)
    last = "no answer"

    async def once() -> tuple[int, str]:
        nonlocal last
        try:
            async with session.post(url, json=body, allow_redirects=False) as resp:
                text = shown(await resp.content.read(SHOWN * 4))
        except (aiohttp.ClientError, OSError) as e:
            last = f"no answer: {type(e).__name__}" + (f": {e}" if str(e) else "")
            raise _Again(last) from None
        last = f"HTTP {resp.status}" + (f": {text}" if text else "")
        if resp.status >= 500 or resp.status == 429:
            raise _Again(last)
        return resp.status, last

    try:
        async with asyncio.timeout(hook.timeout):
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(_Again), stop=stop_after_attempt(ATTEMPTS),
                    wait=wait_exponential(multiplier=min(0.5, hook.timeout / 8), max=5.0),
                    reraise=True):
                with attempt:
                    status, what = await once()
                    return 200 <= status < 300, what
    except TimeoutError:
        return False, (f"no answer within {format_duration(hook.timeout)}"
                       + (f" (last: {last})" if last != "no answer" else ""))
    except _Again as e:
        return False, e.what
    raise AssertionError("unreachable: AsyncRetrying either returns or raises")


async def ask(session: aiohttp.ClientSession, hooks: tuple[Webhook, ...],
              values: Mapping[str, str], rollout: Mapping[str, Any]) -> tuple[Reading, ...]:
    """Every gating hook at once, each as a gate's reading: pass on a 2xx, else fail."""
    async def one(h: Webhook) -> Reading:
        ok, what = await call(session, h, values, rollout)
        return Reading(HOOK_PREFIX + h.name, Verdict.PASS if ok else Verdict.FAIL,
                       detail=f"{h.when} hook answered {what}" if what.startswith("HTTP")
                       else f"{h.when} hook: {what}")
    return tuple(await asyncio.gather(*(one(h) for h in hooks)))
