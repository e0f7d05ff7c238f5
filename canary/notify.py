"""Telling people: a rollout's events sent to chat (slack, teams) and to any HTTP endpoint
(webhook: the rollout's JSON and the event), at least once, in order per rollout, across
controller crashes.

The outbox is the rollout's own record. Its events are saved with it, atomically, by the
controller; what each receiver has been sent is a cursor in the same record
(`Rollout.delivered[receiver]`: how many events it has), written after each delivery. A
controller killed between a delivery and its cursor sends that message again, with the
same idempotency key (`Idempotency-Key` header, and `idempotency_key` in a webhook body):
the rollout's id and the event's number. Nothing but the cursor lives only in memory, so
this holds for every state store.

Bounds: one delivery worker per receiver, each request limited by the receiver's
`timeout`; failures are retried with exponential backoff (capped). The rollouts waiting
for a receiver are at most MAX_BACKLOG (the oldest is given up, counted in
canary_notifications_dropped), and a rollout keeps at most decide.MAX_EVENTS events, so a
receiver that never comes back costs a bounded backlog and a metric. Nothing here runs
on a rollout's task: a slow receiver never delays an evaluation or an abort.

apprise is not used: it is synchronous (a thread per send), and the delivery needs what
it does not give: our own idempotency key and signature headers, the answer's status for
the at-least-once cursor, and a per-request timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import aiohttp
import pydantic.dataclasses
from pydantic import ConfigDict, Field, model_validator

from canary import hooks
from canary import policy as policy_mod
from canary.clock import Clock
from canary.errors import NotFound, StoreConflict, TransientError, ValidationFailed
from canary.fields import EnvName, Name, PositiveDuration, SendUrl, format_duration, send_url
from canary.hooks import Webhook
from canary.metrics import Metrics
from canary.model import Event, PauseKind, Phase, Rollout, iso
from canary.store import Store
from canary.targets import Target

log = logging.getLogger("canary.notify")
MAX_BACKLOG = 1000      # rollouts waiting for one receiver
BATCH = 50              # messages sent for one rollout before the next rollout's turn
BACKOFF_FIRST = 0.5     # seconds; doubled per failure up to BACKOFF_CAP
BACKOFF_CAP = 60.0
RECENT = 24 * 3600.0    # at start, rollouts updated this recently are checked for undelivered
SHOWN = 200             # characters of a receiver's answer in the log

# event types -> the names a receiver's `events` picks from (config.NOTIFY_EVENTS)
CATEGORIES = {"start": "started", "stage": "stage", "pause": "paused", "approval": "approval",
              "drift": "drift", "router_error": "router", "router_recovered": "router",
              "rollback": "rolled_back", "rolled_back": "rolled_back",
              "rollback_held": "rolled_back", "succeeded": "succeeded"}


# ---- the config's `notifications:` -------------------------------------------------------

# what a person cares to hear about; `events` of a notification picks among these
NotifyEvent = Literal["started", "stage", "paused", "approval", "drift", "router", "rolled_back",
                      "succeeded", "handover"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("started", "stage", "paused", "approval", "drift",
                                          "router", "rolled_back", "succeeded", "handover")


@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(
    extra="forbid", use_attribute_docstrings=True,
    # one of the two, given as text (url: null is neither, to canary and to the schema)
    json_schema_extra={"oneOf": [
        {"required": ["url"], "properties": {"url": {"type": "string"}}},
        {"required": ["url_env"], "properties": {"url_env": {"type": "string"}}}]}))
class Notification:
    """A receiver of rollout events (README: Chat notifications): a chat's incoming webhook
    (slack, teams) or any HTTP endpoint (webhook: the rollout's JSON and the event)."""

    name: Name
    """The receiver's name, unique among notifications (in metrics and logs)."""
    url: SendUrl | None = None
    """http(s) URL messages are POSTed to (a chat's incoming webhook, or any endpoint).
    One of url and url_env."""
    format: Literal["slack", "teams", "webhook"] = "webhook"
    """slack or teams (readable text), or webhook (the rollout's JSON and the event)."""
    events: Annotated[tuple[NotifyEvent, ...], Field(min_length=1)] = NOTIFY_EVENTS
    """The event types sent (default: every type)."""
    secret_env: EnvName | None = None
    """Environment variable holding the HMAC-SHA256 key: the body is signed in
    X-Canary-Signature."""
    timeout: PositiveDuration = 10.0
    """How long one delivery attempt may take (default 10s)."""
    url_env: EnvName | None = None
    """Environment variable holding the URL, instead of url: a chat's incoming-webhook URL
    is a secret, kept out of the config (read when sending, never logged)."""

    @model_validator(mode="after")
    def _one_url(self) -> Notification:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give url, or url_env naming the environment variable that "
                             "holds it (for a URL that is a secret), not both")
        return self

    def send_url(self) -> str:
        """Where messages go now: url, or url_env's value (DeliveryFailed-worthy
        ValueError naming only the variable when it is unset or not a URL)."""
        if self.url is not None:
            return self.url
        assert self.url_env is not None
        value = os.environ.get(self.url_env, "")
        if not re.match(r"^https?://", value):
            raise ValueError(f"environment variable {self.url_env} (the URL) is "
                             + ("not set" if not value else "not an http(s):// URL"))
        try:
            return send_url(value)
        except ValueError as e:
            raise ValueError(f"environment variable {self.url_env}: the URL {e}") from None


MESSAGES = {
    "notifications.name": "must be 1-63 letters, digits, '.', '_' or '-'",
    "format": "must be one of slack, teams, webhook",
    "events": f"must be a non-empty list of: {', '.join(NOTIFY_EVENTS)}",
    "events[]": f"{{value}} is not an event type; use one of {', '.join(NOTIFY_EVENTS)}",
    "notifications": "must be a list of receivers, each with name and url",
}


def category(event_type: str) -> str | None:
    if event_type in CATEGORIES:
        return CATEGORIES[event_type]
    if event_type.startswith(("handover", "promoting")):
        return "handover"
    return None


def numbered(r: Rollout) -> list[tuple[int, Event]]:
    """The rollout's events with their numbers since it started (its `trimmed` marker
    stands for the events dropped from the middle, which keep their numbers)."""
    out: list[tuple[int, Event]] = []
    n = 0
    for e in r.events:
        if e.type == "trimmed":
            n += int(e.message.split()[0])
            continue
        out.append((n, e))
        n += 1
    return out


@dataclass(frozen=True)
class Message:
    key: str          # the idempotency key
    seq: int          # the event's number (a reminder: its approval event's)
    category: str
    event: Event
    reminder: int = 0  # the how-manieth reminder of a waiting approval (0: not one)


REMINDER_COUNT = "#reminders"   # delivered[NAME + this]: reminders sent for ...
REMINDER_OF = "#reminder-of"    # delivered[NAME + this]: ... the approval event numbered so


def pending(rx: Notification, r: Rollout, now: float, reminder: float) -> tuple[list[Message], int]:
    """What `rx` has not been sent yet, oldest first, and the cursor once all of it is."""
    cursor = r.delivered.get(rx.name, 0)
    out: list[Message] = []
    end = cursor
    for seq, e in numbered(r):
        if seq < cursor:
            continue
        end = seq + 1
        cat = category(e.type)
        if cat is not None and cat in rx.events:
            out.append(Message(f"{r.id}-{seq}", seq, cat, e))
    if (r.state is Phase.PAUSED and r.pause_kind is PauseKind.APPROVAL
            and r.paused_at is not None and "approval" in rx.events):
        waiting = [(seq, e) for seq, e in numbered(r) if e.type == "approval"]
        if waiting:
            seq, e = waiting[-1]
            due = int((now - r.paused_at) // reminder)
            sent = (r.delivered.get(rx.name + REMINDER_COUNT, 0)
                    if r.delivered.get(rx.name + REMINDER_OF) == seq else 0)
            for k in range(sent + 1, due + 1):
                out.append(Message(f"{r.id}-{seq}-reminder-{k}", seq, "approval", e, k))
    return out, end


# ---- what a message says ------------------------------------------------------------------


def headline(r: Rollout, m: Message, now: float) -> str:
    e = m.event
    if m.reminder:
        waited = format_duration(round(now - (r.paused_at or now)))
        return (f"still waiting for approval at weight {r.weight}% (for {waited}): promote to "
                "continue, abort to roll back")
    if e.type == "start":
        return f"rollout started by {e.actor}: {e.message}"
    if e.type == "approval":
        return (f"waiting for approval at stage {r.stage}: promote to continue, abort to "
                "roll back")
    if e.type == "pause":
        return f"paused by {e.actor}: {e.message}"
    if e.type == "rollback":
        return f"rolling back: {e.message}"
    if e.type == "rolled_back":
        return f"rolled back ({e.message}): {r.reason or 'no reason recorded'}"
    if e.type == "succeeded":
        return f"succeeded: {e.message}"
    if e.type == "drift":
        return f"paused, drift: {e.message}"
    if e.type.startswith("router"):
        return f"router: {e.message}"
    return e.message


def text(r: Rollout, m: Message, now: float, link: str) -> list[str]:
    versions = f"{r.stable_version or '?'} → {r.canary_version}"
    lines = [f"canary: {r.target} {versions}: {headline(r, m, now)}",
             f"stage {r.stage}, weight {r.weight}%, state {r.state.value}"]
    if r.reason and m.event.type not in ("rollback", "rolled_back"):
        lines.append(f"reason: {r.reason}")
    lines.append(link)
    return lines


def body(rx: Notification, r: Rollout, m: Message, now: float, link: str) -> bytes:
    lines = text(r, m, now, link)
    data: dict[str, Any]
    if rx.format == "slack":
        data = {"text": "\n".join(lines[:-1]) + f"\n<{link}|rollout {r.id}>"}
    elif rx.format == "teams":
        data = {"@type": "MessageCard", "@context": "https://schema.org/extensions",
                "summary": lines[0], "title": f"canary: {r.target} {r.canary_version}",
                "text": "\n\n".join(lines[:-1]),
                "potentialAction": [{"@type": "OpenUri", "name": f"Open rollout {r.id}",
                                     "targets": [{"os": "default", "uri": link}]}]}
    else:
        data = {"idempotency_key": m.key, "receiver": rx.name, "link": link,
                "event": {"seq": m.seq, "at": iso(m.event.at), "type": m.event.type,
                          "category": m.category, "message": m.event.message,
                          "actor": m.event.actor, "reminder": m.reminder or None,
                          "text": lines[0]},
                "rollout": r.to_api()}
    return json.dumps(data, ensure_ascii=False).encode()


def signature(secret: str, payload: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class DeliveryFailed(Exception):
    pass


# ---- told hooks: a policy's post-rollout and rollback webhooks, through the same outbox ----

TOLD = "hook:"  # delivered[TOLD + name] = 1 once that hook was told (answered 2xx)


def told_hooks(r: Rollout) -> tuple[Webhook, ...]:
    """The hooks a finished rollout still has to tell."""
    if r.state is Phase.SUCCEEDED:
        when = "post-rollout"
    elif r.state is Phase.ROLLED_BACK:
        when = "rollback"
    else:
        return ()
    hooks_ = [h for h in r.policy_spec.get("webhooks", ()) if isinstance(h, dict)
              and h.get("when") == when and not r.delivered.get(TOLD + str(h.get("name")))]
    if not hooks_:
        return ()
    try:
        return policy_mod.from_dict(r.policy_spec).hooks(when)
    except ValidationFailed:
        return ()  # (the controller says so loudly; nothing to tell by)


def template_values(tgt: Target, r: Rollout) -> dict[str, str]:
    """What a hook's URL may use: as the controller fills a query's (controller.py)."""
    values = dict(tgt.vars)
    values.update(target=tgt.name, canary_version=r.canary_version, rollout_id=r.id,
                  interval=str(r.policy_spec.get("interval", "")))
    if r.stable_version is not None:
        values["stable_version"] = r.stable_version
    return values


# ---- delivery -------------------------------------------------------------------------------


class Notifier:
    def __init__(self, receivers: Sequence[Notification], store: Store, *, clock: Clock,
                 metrics: Metrics, reminder: float = 1800.0, link: str = "",
                 targets: Mapping[str, Target] | None = None) -> None:
        self.receivers = tuple(receivers)
        self.targets: Mapping[str, Target] = targets or {}
        self._told: OrderedDict[str, None] = OrderedDict()  # finished rollouts with hooks due
        self.store, self.clock, self.metrics = store, clock, metrics
        self.reminder = reminder
        self.link = link.rstrip("/")
        self._backlog: dict[str, OrderedDict[str, None]] = {rx.name: OrderedDict()
                                                            for rx in self.receivers}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._tasks:
            return
        self._session = aiohttp.ClientSession(headers={"User-Agent": "canary"})
        for rx in self.receivers:
            self._wake[rx.name] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._deliver(rx), name=f"notify-{rx.name}"))
        self._wake[TOLD] = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._tell(), name="notify-hooks"))
        self._tasks.append(asyncio.create_task(self._watch(), name="notify-watch"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10.0)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def saved(self, r: Rollout) -> None:
        """The controller saved `r`: whatever it added is due to every receiver."""
        if not self._tasks:
            return
        now = self.clock.now()
        for rx in self.receivers:
            msgs, end = pending(rx, r, now, self.reminder)
            if msgs or r.delivered.get(rx.name, 0) < end:
                self._due(rx, r.id)
        if told_hooks(r):
            self._hooks_due(r.id)

    def _hooks_due(self, rollout_id: str) -> None:
        self._told[rollout_id] = None
        while len(self._told) > MAX_BACKLOG:
            dropped, _ = self._told.popitem(last=False)
            self.metrics.notify_dropped.labels(TOLD).inc()
            log.error("told-hook backlog full: a rollout's post-rollout or rollback hooks "
                      "given up", extra={"rollout": dropped})
        self._wake[TOLD].set()

    def _due(self, rx: Notification, rollout_id: str) -> None:
        backlog = self._backlog[rx.name]
        if rollout_id not in backlog:
            backlog[rollout_id] = None
            while len(backlog) > MAX_BACKLOG:
                dropped, _ = backlog.popitem(last=False)
                self.metrics.notify_dropped.labels(rx.name).inc()
                log.error("notification backlog full: messages of a rollout given up",
                          extra={"receiver": rx.name, "rollout": dropped})
        self.metrics.notify_backlog.labels(rx.name).set(len(backlog))
        self._wake[rx.name].set()

    async def _watch(self) -> None:
        """At start: recent rollouts with messages still due. Then, now and then: approvals
        still waiting, whose reminders come due with time alone."""
        first = True
        while True:
            try:
                rollouts = await self.store.list(active_only=not first, limit=None if not first
                                                 else 1000)
                now = self.clock.now()
                for r in rollouts:
                    if first and r.state.final and now - r.updated_at > RECENT:
                        continue
                    for rx in self.receivers:
                        if pending(rx, r, now, self.reminder)[0]:
                            self._due(rx, r.id)
                    if first and told_hooks(r):
                        self._hooks_due(r.id)
                first = False
                if not self.receivers:
                    return  # (no reminders to send: the start's scan was all)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store is down: try again at the next turn
                log.warning(f"notifications cannot read the state store: {e}")
            await self.clock.sleep(max(0.5, min(self.reminder / 4, 30.0)))

    async def _deliver(self, rx: Notification) -> None:
        """Every rollout's messages to `rx`, each rollout's in order. A failure backs off the
        receiver (one try at a time while it is down) and that rollout (its own retry
        time): a message the receiver keeps refusing never holds back other rollouts'."""
        backlog, wake = self._backlog[rx.name], self._wake[rx.name]
        failures = 0
        tries: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        while True:
            if not backlog:
                tries.clear()
                retry_at.clear()
                await wake.wait()
                wake.clear()
                continue
            now = self.clock.now()
            rollout_id = next((x for x in backlog if retry_at.get(x, now) <= now), None)
            if rollout_id is None:  # every one is waiting for its retry: until the first
                for x in [x for x in retry_at if x not in backlog]:  # (given up)
                    retry_at.pop(x)
                    tries.pop(x, None)
                await self.clock.sleep(min(retry_at.values()) - now, wake)
                continue
            try:
                done = await self._drain(rx, rollout_id)
            except asyncio.CancelledError:
                raise
            except (DeliveryFailed, TransientError) as e:
                failures += 1
                tries[rollout_id] = n = tries.get(rollout_id, 0) + 1
                retry_at[rollout_id] = self.clock.now() + min(
                    BACKOFF_CAP, BACKOFF_FIRST * 2 ** (n - 1))
                if rollout_id in backlog:
                    backlog.move_to_end(rollout_id)  # the other rollouts' turn first
                self.metrics.notify_failures.labels(rx.name).inc()
                delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (failures - 1))
                delay *= random.uniform(0.8, 1.2)
                log.warning(f"notification to {rx.name} failed ({e}); retrying in "
                            f"{delay:.1f}s", extra={"receiver": rx.name, "rollout": rollout_id})
                await self.clock.sleep(delay)
                continue
            except Exception:
                log.exception("notification delivery failed", extra={"receiver": rx.name})
                await self.clock.sleep(BACKOFF_CAP)
                continue
            failures = 0
            tries.pop(rollout_id, None)
            retry_at.pop(rollout_id, None)
            backlog.pop(rollout_id, None)
            if not done:
                backlog[rollout_id] = None  # more to send: after the other rollouts' turn
            self.metrics.notify_backlog.labels(rx.name).set(len(backlog))

    async def _tell(self) -> None:
        """Finished rollouts' post-rollout and rollback hooks, each told until it answers
        2xx (its own timeout and retries per try, backoff between tries). The backoff is
        each rollout's own: a hook that keeps failing never holds back another rollout's."""
        wake = self._wake[TOLD]
        failures: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        while True:
            if not self._told:
                failures.clear()
                retry_at.clear()
                await wake.wait()
                wake.clear()
                continue
            now = self.clock.now()
            rollout_id = next((x for x in self._told if retry_at.get(x, now) <= now), None)
            if rollout_id is None:  # every one is backing off: until the first is due
                for x in [x for x in retry_at if x not in self._told]:  # (given up)
                    retry_at.pop(x)
                    failures.pop(x, None)
                await self.clock.sleep(min(retry_at.values()) - now, wake)
                continue
            try:
                r = await self.store.load(rollout_id)
                tgt = self.targets.get(r.target)
                left = told_hooks(r) if tgt is not None else ()
                for h in left:
                    assert self._session is not None and tgt is not None
                    ok, what = await hooks.call(self._session, h, template_values(tgt, r),
                                                r.to_api())
                    if not ok:
                        raise DeliveryFailed(f"{h.when} hook {h.name}: {what}")
                    log.info(f"{h.when} hook {h.name}: {what}",
                             extra={"rollout": r.id, "hook": h.name})
                    await self._advance(rollout_id, {TOLD + h.name: 1})
            except asyncio.CancelledError:
                raise
            except NotFound:
                pass
            except (DeliveryFailed, TransientError) as e:
                failures[rollout_id] = n = failures.get(rollout_id, 0) + 1
                self.metrics.notify_failures.labels(TOLD).inc()
                delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (n - 1))
                log.warning(f"{e}; retrying in {delay:.1f}s", extra={"rollout": rollout_id})
                retry_at[rollout_id] = self.clock.now() + delay
                self._told.move_to_end(rollout_id)
                continue
            except Exception:
                log.exception("telling hooks failed", extra={"rollout": rollout_id})
                retry_at[rollout_id] = self.clock.now() + BACKOFF_CAP
                self._told.move_to_end(rollout_id)
                continue
            failures.pop(rollout_id, None)
            retry_at.pop(rollout_id, None)
            self._told.pop(rollout_id, None)

    async def _drain(self, rx: Notification, rollout_id: str) -> bool:
        """Send up to BATCH of what `rx` has not had from this rollout, in order, moving
        its cursor after each. True when nothing is left."""
        try:
            r = await self.store.load(rollout_id)
        except NotFound:
            return True
        now = self.clock.now()
        msgs, end = pending(rx, r, now, self.reminder)
        for m in msgs[:BATCH]:
            await self._send(rx, r, m, now)
            if m.reminder:
                await self._advance(rollout_id, {rx.name + REMINDER_OF: m.seq,
                                                 rx.name + REMINDER_COUNT: m.reminder})
            else:
                await self._advance(rollout_id, {rx.name: m.seq + 1})
        if len(msgs) > BATCH:
            return False
        await self._advance(rollout_id, {rx.name: end})  # (events it does not want)
        return True

    async def _send(self, rx: Notification, r: Rollout, m: Message, now: float) -> None:
        link = f"{self.link}/api/v1/rollouts/{r.id}"
        payload = body(rx, r, m, now, link)
        headers = {"Content-Type": "application/json", "Idempotency-Key": m.key,
                   "X-Canary-Event": m.category}
        if rx.secret_env is not None:
            secret = os.environ.get(rx.secret_env)
            if not secret:
                raise DeliveryFailed(f"environment variable {rx.secret_env} (the signing "
                                     "secret) is not set; not sending unsigned")
            headers["X-Canary-Signature"] = signature(secret, payload)
        assert self._session is not None
        try:
            url = rx.send_url()
        except ValueError as e:
            raise DeliveryFailed(str(e)) from None
        try:
            async with asyncio.timeout(rx.timeout):
                async with self._session.post(url, data=payload, headers=headers,
                                              allow_redirects=False) as resp:
                    answer = (await resp.content.read(SHOWN)).decode("utf-8", "replace")
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {format_duration(rx.timeout)}") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:  # (ValueError: UnicodeError
            # from a host the client cannot encode: a failed delivery, retried, never a crash)
            raise DeliveryFailed(f"no connection: {type(e).__name__}") from None
        if not 200 <= resp.status < 300:
            raise DeliveryFailed(f"HTTP {resp.status}: {answer.strip()[:SHOWN]!r}")
        self.metrics.notify_sent.labels(rx.name).inc()

    async def _advance(self, rollout_id: str, cursor: dict[str, int]) -> None:
        """Write the cursor into the rollout's record (never moving it back)."""
        for _ in range(20):
            r = await self.store.load(rollout_id)
            new = dict(r.delivered)
            for k, v in cursor.items():
                # an event cursor only moves on; a reminder count starts again per wait
                new[k] = v if "#" in k else max(v, new.get(k, 0))
            if new == r.delivered:
                return
            with contextlib.suppress(StoreConflict):
                await self.store.save(rollout=replace(r, delivered=new),
                                      expected_version=r.version)
                return
        raise StoreConflict(f"rollout {rollout_id} kept changing; cursor not yet written")
