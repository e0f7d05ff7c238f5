"""A policy's webhooks on the wire: POST the rollout's JSON and `{"hook", "when"}` to a
hook's URL, and turn its answer into a Reading (gating hooks; told hooks go through the
outbox in canary/notify.py).

A call is bounded by the hook's own `timeout`, retries included (tenacity, with backoff,
for no answer or a 5xx/429): a hook that hangs costs that much and no more. The answer
shown is the status and the first bytes of the body, as plain text."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from canary.fields import format_duration, render
from canary.model import Reading, Verdict
from canary.policy import HOOK_PREFIX, Webhook
from canary.text import is_control

log = logging.getLogger("canary.hooks")
SHOWN = 200      # characters of a hook's answer kept in the gate's detail and the events
ATTEMPTS = 3     # tries within the timeout


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
