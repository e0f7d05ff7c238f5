"""Runs rollouts: one asyncio task each, resumed from the store at start.

Every change goes through `_update`: load the stored rollout, run a pure step of
`decide` on it, save it with its expected version. The router is told only what was
saved first, so a controller killed at any point re-applies the stored weight when it
starts again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from canary import faults
from canary import policy as policy_mod
from canary.clock import Clock
from canary.config import Target
from canary.engine import decide
from canary.errors import (
    InvalidInput,
    NotFound,
    NotLeader,
    RouterError,
    StoreConflict,
)
from canary.gates.prometheus import MetricSource, measure
from canary.metrics import Metrics
from canary.model import Command, PauseKind, Phase, Readings, Rollout, Verdict
from canary.routers import Router
from canary.store import Store

log = logging.getLogger("canary.controller")
STOP_TIMEOUT = 10.0  # seconds stop() waits for the rollout tasks to end
_LOUD_EVENTS = {"router_error", "drift", "rollback", "rolled_back"}
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


class Backoff:
    """0.5 s doubling up to `cap`; reset after a success."""

    def __init__(self, cap: float, first: float = 0.5) -> None:
        self.cap, self.first, self.delay = cap, first, first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return d

    def reset(self) -> None:
        self.delay = self.first


@dataclass
class Controller:
    store: Store
    policies: Mapping[str, policy_mod.Policy]
    targets: Mapping[str, Target]
    routers: Mapping[str, Router]
    source: MetricSource
    clock: Clock
    metrics: Metrics = field(default_factory=Metrics)
    retry_max: float = 30.0
    leading: bool = True   # only the leader runs rollouts and accepts writes
    leader: Callable[[], str | None] = lambda: None  # who leads, for followers' answers
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _wakeups: dict[str, asyncio.Event] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _policy_cache: dict[str, policy_mod.Policy] = field(default_factory=dict)
    _stopping: bool = False

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        for r in await self.store.list(active_only=True):
            log.info("resuming rollout", extra={"rollout": r.id, "target": r.target,
                                                "state": r.state.value, "stage": r.stage,
                                                "weight": r.weight})
            self._spawn(r.id)
        self.metrics.active.set(len(self._tasks))

    async def stop(self) -> None:
        """Cancel every rollout task and wait for them (bounded). asyncio.wait neither
        raises the tasks' CancelledError nor swallows one aimed at the caller."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            _done, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for t in stuck:
                log.error("rollout task did not stop within %gs; leaving it", STOP_TIMEOUT,
                          extra={"task": t.get_name()})
        self._tasks.clear()

    def running(self) -> int:
        return len(self._tasks)

    def _spawn(self, rollout_id: str) -> None:
        if rollout_id in self._tasks or self._stopping:
            return
        self._wakeups.setdefault(rollout_id, asyncio.Event())
        task = asyncio.create_task(self._run(rollout_id), name=f"rollout-{rollout_id}")
        self._tasks[rollout_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(rollout_id, None))

    def wake(self, rollout_id: str) -> None:
        ev = self._wakeups.get(rollout_id)
        if ev is not None:
            ev.set()

    # ---- requests -------------------------------------------------------------------

    def _must_lead(self) -> None:
        if not self.leading:
            leader = self.leader()
            raise NotLeader("this replica is not the leader"
                            + (f" ({leader} is)" if leader else "")
                            + "; writes go to the leader: retry, the Service will route you")

    async def create(self, *, target: str, canary_version: str, stable_version: str | None,
                     policy: str | None, actor: str) -> Rollout:
        self._must_lead()
        tgt = self.targets.get(target)
        if tgt is None:
            raise NotFound(f"no target named {target!r}; configured: "
                           f"{', '.join(sorted(self.targets))}")
        if target not in self.routers:
            raise InvalidInput(f"target {target!r} has no working router in this controller")
        policy_name = policy or tgt.policy
        if policy_name is None:
            raise InvalidInput(f"target {target!r} has no default policy; pass \"policy\"")
        pol = self.policies.get(policy_name)
        if pol is None:
            raise NotFound(f"no policy named {policy_name!r}; loaded: "
                           f"{', '.join(sorted(self.policies))}")
        for field_name, value in (("canary_version", canary_version),
                                  ("stable_version", stable_version)):
            if value is not None and not _VERSION.match(value):
                raise InvalidInput(f"{field_name}: {value!r} must be 1-128 letters, digits or "
                                   "._:+- starting with a letter or digit")
        await self.routers[target].check()
        async with self._start_lock:
            if stable_version is None:
                stable_version = await self._last_stable(target) or tgt.stable_version
            if stable_version == canary_version:
                raise InvalidInput(f"canary_version and stable_version are both "
                                   f"{canary_version!r}; nothing to roll out")
            values = self._template_values(tgt, canary_version, stable_version, "x", pol)
            missing = sorted(pol.template_names() - set(values))
            if missing:
                hint = ("; pass stable_version" if "stable_version" in missing
                        else f"; add them to targets.{target}.vars")
                raise InvalidInput(f"policy {pol.name!r} uses {', '.join(missing)}, which "
                                   f"target {target!r} does not define{hint}")
            now = self.clock.now()
            rid = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)
            r = decide.start(rollout_id=rid, target=target, policy=pol,
                             canary_version=canary_version, stable_version=stable_version,
                             now=now, actor=actor)
            r = await self.store.create(rollout=r)
        self.metrics.started.labels(target).inc()
        self._log_new_events(None, r)
        self._spawn(r.id)
        self.metrics.active.set(len(self._tasks))
        return r

    async def _last_stable(self, target: str) -> str | None:
        last = await self.store.list(target=target, state=Phase.SUCCEEDED, limit=1,
                                     events=False)
        return last[0].canary_version if last else None

    async def command(self, rollout_id: str, cmd: Command) -> Rollout:
        """Record an override and wake the rollout's task; Conflict if it does not fit."""
        self._must_lead()
        now = self.clock.now()
        r = await self._update(rollout_id, lambda r: decide.command(
            r, self._policy_of(r), cmd, now))
        faults.point("after_command")
        self.wake(rollout_id)
        return r

    # ---- the loop -------------------------------------------------------------------

    async def _update(self, rollout_id: str, step: Callable[[Rollout], Rollout]) -> Rollout:
        lock = self._locks.setdefault(rollout_id, asyncio.Lock())
        async with lock:
            for _ in range(20):
                old = await self.store.load(rollout_id)
                new = step(old)
                if new == old:
                    return old
                faults.point("before_save")
                try:
                    saved = await self.store.save(rollout=new, expected_version=old.version)
                except StoreConflict:
                    continue
                faults.point("after_save")
                self._log_new_events(old, saved)
                self.metrics.observe(saved)
                if saved.state.final and not old.state.final:
                    self.metrics.outcomes.labels(saved.target, saved.state.value).inc()
                return saved
        raise StoreConflict(f"rollout {rollout_id} kept changing under us; try again")

    def _policy_of(self, r: Rollout) -> policy_mod.Policy:
        """The policy the rollout started with, parsed once: its spec never changes, and
        re-validating it every interval of every rollout is wasted work."""
        pol = self._policy_cache.get(r.id)
        if pol is None:
            pol = self._policy_cache[r.id] = policy_mod.from_dict(r.policy_spec)
        return pol

    def _log_new_events(self, old: Rollout | None, new: Rollout) -> None:
        fresh = new.events[len(old.events):] if old is not None else new.events
        for e in fresh:
            level = logging.WARNING if e.type in _LOUD_EVENTS else logging.INFO
            log.log(level, e.message, extra={"rollout": new.id, "target": new.target,
                                       "event": e.type, "actor": e.actor,
                                       "state": new.state.value, "stage": new.stage,
                                       "weight": new.weight})

    def _log_gate_changes(self, r: Rollout, before: Mapping[str, Verdict]) -> None:
        for g in r.gates:
            if before.get(g.name) is not g.status and g.status is not Verdict.PENDING:
                level = logging.INFO if g.status is Verdict.PASS else logging.WARNING
                log.log(level, f"gate {g.name}: {g.status.value}"
                        + (f" ({g.detail})" if g.detail else ""),
                        extra={"rollout": r.id, "target": r.target, "gate": g.name,
                               "value": g.value, "status": g.status.value})

    def _template_values(self, tgt: Target, canary_version: str, stable_version: str | None,
                         rollout_id: str, pol: policy_mod.Policy) -> dict[str, str]:
        values = dict(tgt.vars)
        values.update(target=tgt.name, canary_version=canary_version, rollout_id=rollout_id,
                      interval=policy_mod.format_duration(pol.interval))
        if stable_version is not None:
            values["stable_version"] = stable_version
        return values

    async def _run(self, rollout_id: str) -> None:
        wakeup = self._wakeups[rollout_id]
        forced = False       # re-apply the stored weight once after every (re)start
        next_eval = 0.0
        next_router_try = 0.0
        backoff = Backoff(self.retry_max)
        while not self._stopping:  # (also ends a task whose cancellation got lost)
            try:
                r = await self.store.load(rollout_id)
                if r.state.final:
                    break
                pol = self._policy_of(r)
                router = self.routers[r.target]
                live = await router.get_weight()
                r = await self._update(rollout_id, partial(decide.observed, weight=live,
                                                           now=self.clock.now()))
                now = self.clock.now()
                router_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.ROUTER
                # weights changed outside canary are on-call's call: never fight them
                drift_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.DRIFT
                if not drift_paused and (router_paused or r.weight != r.applied_weight
                                         or not forced):
                    want = decide.stage_weight(r, pol) if router_paused else r.weight
                    if not router_paused or now >= next_router_try:
                        faults.point("before_apply")
                        try:
                            await router.set_weight(want)
                        except RouterError as e:
                            self.metrics.router_errors.labels(r.target).inc()
                            r = await self._update(rollout_id, partial(
                                decide.apply_failed, policy=pol, error=str(e),
                                now=self.clock.now()))
                            delay = backoff.next()
                            if r.state is Phase.ROLLING_BACK:
                                await self.clock.sleep(delay, wakeup)
                                continue
                            next_router_try = self.clock.now() + delay
                        else:
                            faults.point("after_apply")
                            forced = True
                            backoff.reset()
                            step = (partial(decide.router_recovered, policy=pol)
                                    if router_paused else decide.applied)
                            await self._update(rollout_id, partial(step, weight=want,
                                                                   now=self.clock.now()))
                            continue
                now = self.clock.now()
                watching = r.state is Phase.PROGRESSING or r.pause_kind is PauseKind.APPROVAL
                if not watching:
                    next_eval = 0.0  # time paused is not lateness
                if watching and now >= next_eval and r.stage_since is not None:
                    if next_eval:
                        late = now - next_eval
                        self.metrics.eval_delay.observe(late)
                        if late > pol.interval:
                            self.metrics.missed.inc()
                    next_eval = now + pol.interval
                    rd = await self._measure(r, pol, now)
                    for x in rd.items:
                        self.metrics.verdicts.labels(r.target, x.gate, x.verdict.value).inc()
                    before = {g.name: g.status for g in r.gates}
                    r = await self._update(rollout_id, partial(
                        decide.readings, policy=pol, rd=rd, now=self.clock.now()))
                    self._log_gate_changes(r, before)
                r = await self._update(rollout_id, partial(decide.tick, policy=pol,
                                                           now=self.clock.now()))
                if r.state.final:
                    break
                router_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.ROUTER
                drift_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.DRIFT
                if r.weight != r.applied_weight and not (router_paused or drift_paused):
                    continue
                now = self.clock.now()
                if next_eval <= now:
                    next_eval = now + pol.interval
                wake_at = min(next_eval, next_router_try) if router_paused else next_eval
                await self.clock.sleep(wake_at - now, wakeup)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or an unexpected failure must not end the rollout's task: say so
                # loudly, back off, and try again from the stored state.
                log.exception("rollout loop failed; retrying", extra={"rollout": rollout_id})
                await self.clock.sleep(backoff.next(), wakeup)
        self._locks.pop(rollout_id, None)
        self._wakeups.pop(rollout_id, None)
        self._policy_cache.pop(rollout_id, None)
        self.metrics.active.set(max(0, len(self._tasks) - 1))

    async def _measure(self, r: Rollout, pol: policy_mod.Policy, now: float) -> Readings:
        tgt = self.targets[r.target]
        values = self._template_values(tgt, r.canary_version, r.stable_version, r.id, pol)
        items = await measure(self.source, pol.gates_for(r.stage), values,
                              budget=max(1.0, min(10.0, pol.interval / 2)))
        return Readings(at=now, stage=r.stage, items=items)
