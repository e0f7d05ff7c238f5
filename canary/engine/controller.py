"""Runs rollouts: one asyncio task each, resumed from the store at start.

Every change goes through `_update`: load the stored rollout, run a pure step of
`decide` on it, save it with its expected version. The router is told only what was
saved first, so a controller killed at any point re-applies the stored weight when it
starts again.

One exception, in the safe direction: while the store cannot be written, a rollout
keeps judging its gates from memory, and a rollback (a breach, or an abort) goes to
the router at once, with the decision written into the router's own state
(`decide.decision_note`). It is saved as soon as the store takes writes again, or
adopted from the router by a controller that restarts in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import aiohttp

from canary import faults, history, hooks, probe, shapes
from canary import policy as policy_mod
from canary import workload as workload_mod
from canary.clock import Clock
from canary.engine import decide
from canary.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    NotLeader,
    RouterError,
    StoreConflict,
    StoreUnavailable,
    ValidationFailed,
)
from canary.fields import format_duration, render
from canary.gates.kinds import CompareGate
from canary.gates.prometheus import MetricSource, measure
from canary.metrics import Metrics
from canary.model import (
    VERSION_PATTERN,
    Command,
    CommandKind,
    PauseKind,
    Phase,
    Reading,
    Readings,
    Rollout,
    Sides,
    Verdict,
)
from canary.notify import Notifier
from canary.routers import Router, toward
from canary.stages import stage_shape
from canary.store import Store, no_such_rollout
from canary.targets import NginxTarget, Target, promotion_of
from canary.text import is_control

log = logging.getLogger("canary.controller")
STOP_TIMEOUT = 10.0  # seconds stop() waits for the rollout tasks to end
STORE_RETRY = 1.0    # seconds between write attempts while the store is failing
STORE_CHECK = 2.0    # seconds between background checks that the store takes writes
_ROLLBACK = (Phase.ROLLING_BACK, Phase.ROLLED_BACK)
_LOUD_EVENTS = {"router_error", "drift", "rollback", "rolled_back"}
_VERSION = re.compile(VERSION_PATTERN)  # used with fullmatch: "v2\n" does not pass


def _every_target(target: str) -> bool:
    return True


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
    # per target with a `workload:`, its Deployment pair (canary/workload.py)
    workloads: Mapping[str, workload_mod.Workloads] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _wakeups: dict[str, asyncio.Event] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _policy_cache: dict[str, policy_mod.Policy] = field(default_factory=dict)
    _unreadable: dict[str, str] = field(default_factory=dict)  # rollout id -> why
    _stopping: bool = False
    # why the state store cannot be written now (None: it can), and per target, canary
    # traffic that no rollout in the store explains (e.g. the state file went missing)
    store_error: str | None = None
    warnings: dict[str, str] = field(default_factory=dict)
    _last: dict[str, Rollout] = field(default_factory=dict)      # last stored, per task
    _unsaved: dict[str, Rollout] = field(default_factory=dict)   # a rollback not yet saved
    _pending_abort: dict[str, Command] = field(default_factory=dict)
    # what a rollout is while the store cannot record it (a rollback in force, unsaved)
    unsaved_view: dict[str, Rollout] = field(default_factory=dict)
    _monitor: asyncio.Task[None] | None = None
    _http: aiohttp.ClientSession | None = None          # webhooks' client, made when needed
    # tells people about events, and finished rollouts' told hooks (canary/notify.py);
    # made at start when not given
    notifier: Notifier | None = None
    # told of every saved change, on the control loop; each must return at once (the
    # API's watchers: canary/api/watch.py)
    listeners: list[Callable[[Rollout], None]] = field(default_factory=list)
    _idle_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        active = await self.store.list(active_only=True)
        if active:  # stored times never go back, even after a wall-clock step
            self.clock.not_before(max(r.updated_at for r in active))
        for r in active:
            log.info("resuming rollout", extra={"rollout": r.id, "target": r.target,
                                                "state": r.state.value, "stage": r.stage,
                                                "weight": r.weight})
            self._spawn(r.id)
        self.metrics.active.set(len(self._tasks))
        busy = {r.target for r in active}
        for name in self.routers:
            if name not in busy:
                await self._check_unexplained(name)
        for name, wl in self.workloads.items():
            if name not in busy:  # a scale-down a previous controller did not get to
                self._idle_tasks.append(asyncio.create_task(
                    self._idle_scale_down(name, wl), name=f"scale-down-{name}"))
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch_store(), name="store-health")
        if self.notifier is None:
            self.notifier = Notifier((), self.store, clock=self.clock, metrics=self.metrics,
                                     targets=self.targets)
        await self.notifier.start()

    async def stop(self) -> None:
        """Cancel every rollout task and wait for them (bounded). asyncio.wait neither
        raises the tasks' CancelledError nor swallows one aimed at the caller."""
        self._stopping = True
        for idle in self._idle_tasks:
            idle.cancel()
        await asyncio.gather(*self._idle_tasks, return_exceptions=True)
        self._idle_tasks.clear()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            _done, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for t in stuck:
                log.error("rollout task did not stop within %gs; leaving it", STOP_TIMEOUT,
                          extra={"task": t.get_name()})
        self._tasks.clear()
        # (after the rollouts: they are what acts; what they said waits in their records
        # for whichever controller delivers next)
        if self.notifier is not None:
            await self.notifier.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                headers={"User-Agent": "canary", "Content-Type": "application/json"},
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=8))
        return self._http

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
                     policy: str | None, actor: str,
                     scope: Callable[[str], bool] = _every_target) -> Rollout:
        """`scope`: the targets the caller may see; any other is answered exactly as an
        unknown one."""
        self._must_lead()
        tgt = self.targets.get(target) if scope(target) else None
        if tgt is None:
            raise NotFound(f"no target named {target!r}; configured: "
                           f"{', '.join(sorted(t for t in self.targets if scope(t))) or 'none'}")
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
            if value is not None and not _VERSION.fullmatch(value):
                raise InvalidInput(f"{field_name}: {value!r} must be 1-128 letters, digits or "
                                   "._:+- starting with a letter or digit")
        wl = self.workloads.get(target)
        if getattr(tgt, "workload", None) is not None and wl is None:
            raise InvalidInput(f"target {target!r} has a workload but this controller has no "
                               "Kubernetes client for it")
        await self.routers[target].check()
        sides = await self.target_sides(target)
        to_side = sides.deploy_to
        wanted = [sh for sh in (stage_shape(s) for s in pol.stages) if sh]
        if wanted:
            await toward(self.routers[target], to_side).check_shapes(wanted)
        if stable_version is None:
            stable_version = sides.runs(sides.serving) or tgt.stable_version
        await self._probe_start(tgt, sides, canary_version, stable_version)
        if wl is not None:
            await self._workload_start(wl, tgt, stable_version)
        if target in self.warnings:
            message = await self._check_unexplained(target)
            if message:
                raise Conflict(message)
        async with self._start_lock:
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
                             now=now, actor=actor, to_side=to_side,
                             promotion=promotion_of(tgt))
            r = await self.store.create(rollout=r)
        self.metrics.started.labels(target).inc()
        self._log_new_events(None, r)
        if self.notifier is not None:
            self.notifier.saved(r)
        self._spawn(r.id)
        self.metrics.active.set(len(self._tasks))
        return r

    async def target_sides(self, target: str) -> Sides:
        """Which side of `target` serves and what each runs: as stored with the target,
        or rebuilt from its last finished rollout when that is newer (a controller that
        stopped between ending a rollout and storing the sides)."""
        stored = await self.store.sides(target)
        last = await self.store.list(target=target, limit=1, events=False,
                                     state=(Phase.SUCCEEDED, Phase.ROLLED_BACK))
        if last and (stored is None or stored.rollout != last[0].id):
            sides = Sides.after(last[0])
            with contextlib.suppress(Exception):  # kept next time; derived the same meanwhile
                await self.store.save_sides(target, sides)
            return sides
        if stored is not None:
            return stored
        tgt = self.targets.get(target)
        return Sides(serving="stable", stable_runs=tgt.stable_version if tgt else None)

    async def _probe_start(self, tgt: Target, sides: Sides, canary_version: str,
                           stable_version: str | None) -> None:
        """With a version_probe, the side about to receive traffic must run the canary
        version and the serving side the stable one; else the start is refused, naming
        each server and what it answered."""
        if not isinstance(tgt, NginxTarget) or tgt.version_probe is None:
            return
        servers = {"stable": tgt.stable, "canary": tgt.canary}
        checks = [(sides.deploy_to, canary_version, "canary_version")]
        if stable_version is not None:
            checks.append((sides.serving, stable_version, "stable_version"))
        problems: list[str] = []
        answers = await asyncio.gather(*(probe.ask(servers[side], tgt.version_probe)
                                         for side, _, _ in checks))
        for (side, want, name), got in zip(checks, answers, strict=True):
            bad = probe.mismatches(got, want)
            if bad:
                problems.append(f"the {side} side must run {want} ({name}): "
                                + "; ".join(a.describe() for a in bad))
        if problems:
            raise InvalidInput(f"target {tgt.name}: version_probe {tgt.version_probe.path}: "
                               + ". ".join(problems) + ". Deploy the expected versions (the "
                               f"next version goes on the {sides.deploy_to} side) and start "
                               "again")

    async def _last_stable(self, target: str) -> str | None:
        last = await self.store.list(target=target, state=Phase.SUCCEEDED, limit=1,
                                     events=False)
        return last[0].canary_version if last else None

    async def command(self, rollout_id: str, cmd: Command, *,
                      scope: Callable[[str], bool] = _every_target) -> Rollout:
        """Record an override and wake the rollout's task; Conflict if it does not fit. A
        rollout whose target is outside `scope` is answered as an unknown id. An abort
        that the store cannot record is carried out all the same (StoreUnavailable says
        so): the rollout's task takes the traffic to 0 and saves it later."""
        self._must_lead()
        now = self.clock.now()

        def step(r: Rollout) -> Rollout:
            if not scope(r.target):
                raise no_such_rollout(rollout_id)
            pol = self._policy_of(r)
            why = self._unreadable.get(r.id)
            if why is not None and cmd.kind is not CommandKind.ABORT and not r.state.final:
                raise Conflict(f"rollout {r.id}'s stored policy can no longer be read "
                               f"({why}); it can only be aborted")
            return decide.command(r, pol, cmd, now)

        if cmd.kind is CommandKind.HANDOVER:
            await self._check_handover(rollout_id, scope)
        try:
            r = await self._update(rollout_id, step)
        except StoreUnavailable as e:
            if cmd.kind is not CommandKind.ABORT or rollout_id not in self._tasks:
                raise
            self._pending_abort[rollout_id] = cmd
            self.wake(rollout_id)
            raise StoreUnavailable(f"{e}. The abort is carried out anyway: the canary's "
                                   "traffic goes to 0 now, and the rollback is saved as soon "
                                   "as the store can be written") from e
        faults.point("after_command")
        self.wake(rollout_id)
        return r

    async def _check_handover(self, rollout_id: str, scope: Callable[[str], bool]) -> None:
        """With a version_probe, the pipeline's handover is checked like a start: traffic
        returns only to a serving side whose every server answers the canary version."""
        r = await self.store.load(rollout_id)
        if not scope(r.target) or r.state.final or r.returning or r.promotion != "return":
            return  # (decide.command says why it does not fit)
        found = self._from_servers(r)
        if found is None:
            return
        servers, tgt = found
        assert tgt.version_probe is not None
        bad = probe.mismatches(await probe.ask(servers, tgt.version_probe), r.canary_version)
        if bad:
            serving = "stable" if r.to_side == "canary" else "canary"
            raise Conflict(
                f"rollout {r.id}: version_probe {tgt.version_probe.path}: the {serving} "
                f"side must run {r.canary_version} before handover: "
                + "; ".join(a.describe() for a in bad)
                + f". Traffic stays on the {r.to_side} side; call handover again once "
                  "every server runs it")

    async def alerts(self, firing: Sequence[tuple[Mapping[str, str], Mapping[str, str]]], *,
                     actor: str, scope: Callable[[str], bool] = _every_target) -> list[str]:
        """Alertmanager's firing alerts (labels, annotations): every active rollout whose
        policy has an `alerts` rule that an alert's labels satisfy (each matcher rendered
        with the rollout's values, compared for equality) is aborted, the reason naming
        the alert and its summary. The ids of the rollouts rolled back."""
        self._must_lead()
        if not firing:
            return []
        out: list[str] = []
        # every firing alert under each of its (label, value) pairs, so a rule is matched
        # against the few alerts holding its rarest pair: a message of thousands of alerts
        # costs the control loop little per active rollout
        index: dict[tuple[str, str], list[int]] = {}
        for i, (labels, _) in enumerate(firing):
            for pair in labels.items():
                index.setdefault(pair, []).append(i)

        def first_match(rule: Mapping[str, str]) -> int | None:
            rarest = min(rule.items(), key=lambda kv: len(index.get(kv, ())))
            for i in index.get(rarest, ()):
                if all(firing[i][0].get(k) == v for k, v in rule.items()):
                    return i
            return None

        for r in await self.store.list(active_only=True, events=False):
            tgt = self.targets.get(r.target)
            if tgt is None or not scope(r.target) or r.state is Phase.ROLLING_BACK:
                continue
            pol = self._policy_of(r)
            if not pol.alerts:
                continue
            values = self._template_values(tgt, r.canary_version, r.stable_version, r.id, pol)
            try:
                rules = [{k: render(v, values) for k, v in a.matchers.items()}
                         for a in pol.alerts]
            except InvalidInput:
                continue  # (checked at start; a var gone from the config matches nothing)
            hits = [i for i in map(first_match, rules) if i is not None]
            if not hits:
                continue
            labels, notes = firing[min(hits)]  # the first alert that matches, as before
            name = labels.get("alertname", "(no alertname)")
            summary = notes.get("summary") or notes.get("description") or "no summary"
            # (Alertmanager's text, shown to on-call: one plain line, bounded)
            reason = " ".join("".join(" " if is_control(c) else c for c in
                                      f"alert {name[:200]} firing: {summary[:500]}").split())
            try:
                await self.command(r.id, Command(CommandKind.ABORT, actor, reason), scope=scope)
            except Conflict:
                continue  # it ended or started rolling back meanwhile
            except StoreUnavailable:
                pass   # the abort is carried out all the same (see command)
            out.append(r.id)
        return out

    # ---- the state store's health, and traffic nobody explains ---------------------------

    def _store_failed(self, error: str) -> None:
        self.metrics.store_failures.inc()
        self.metrics.store_writable.set(0)
        if self.store_error is None:
            log.error(f"state store cannot be written: {error}; rollbacks still reach the "
                      "router, everything else waits for the store", extra={"store": "down"})
        self.store_error = error

    def _store_ok(self) -> None:
        if self.store_error is not None:
            log.warning("state store takes writes again", extra={"store": "up"})
            self.store_error = None
            self.metrics.store_writable.set(1)

    async def check_store(self) -> str | None:
        """Write to the store (reads succeed on a full, read-only or deleted file); None
        when it worked, else why not."""
        try:
            await self.store.ping()
        except Exception as e:  # every store failure means "not ready"
            self._store_failed(str(e) or type(e).__name__)
        else:
            self._store_ok()
        return self.store_error

    async def _watch_store(self) -> None:
        while True:
            await self.check_store()
            await asyncio.sleep(STORE_CHECK)

    async def _check_unexplained(self, target: str) -> str | None:
        """A target with no active rollout whose router carries canary traffic that its
        last rollout does not explain (100 after a success, else 0): say so loudly, and
        leave the traffic alone. Re-checked on every start and readiness probe."""
        router = self.routers.get(target)
        live = await router.get_weight() if router else None
        leftover = await self._leftover_shape(router) if router is not None and not live \
            else None
        if leftover is not None:
            message = (f"target {target} carries {shapes.describe(leftover)} that canary added, "
                       "but no active rollout: the state store may be missing or replaced. "
                       "canary leaves it alone; remove it by hand (see README: Traffic shapes) "
                       "before starting a rollout here")
            if self.warnings.get(target) != message:
                log.error(message, extra={"target": target})
            self.warnings[target] = message
            return message
        last = None
        expected = 0
        if live is not None:
            finished = await self.store.list(target=target, limit=1, events=False,
                                             state=(Phase.SUCCEEDED, Phase.ROLLED_BACK))
            last = finished[0] if finished else None
            if last is not None:
                # the configured canary side carries everything when it is the serving side
                expected = 100 if (await self.target_sides(target)).serving == "canary" else 0
        if live is None or live == expected:
            if self.warnings.pop(target, None):
                log.warning("target's canary traffic is explained again", extra={"target": target})
            return None
        assert router is not None
        note = await router.decision()
        known = (f"its last rollout {last.id} ended {last.state.value}" if last is not None
                 else "the state store has no rollout of it")
        if expected == 100:
            known += (", which left the canary side serving (it runs the stable version "
                      "now), so 100% is expected there")
        message = (f"target {target} carries {live}% canary traffic, but no active rollout "
                   f"and {known}" + (f" (the router notes: {note})" if note else "")
                   + ": the state store may be missing or replaced. canary leaves this "
                   "traffic alone; set the router back by hand (or restore the state file "
                   "and restart) before starting a rollout here")
        if self.warnings.get(target) != message:
            log.error(message, extra={"target": target})
        self.warnings[target] = message
        return message

    @staticmethod
    async def _leftover_shape(router: Router) -> str | None:
        """A match rule or mirror canary added, still in the router (None: none, or
        unreadable now)."""
        try:
            key = await router.get_shape()
        except RouterError:
            return None
        return None if key is None or key.startswith(shapes.EDITED) else key

    async def unexplained(self) -> dict[str, str]:
        """The current warnings, each re-checked (on-call may have fixed the router)."""
        for target in list(self.warnings):
            await self._check_unexplained(target)
        return dict(self.warnings)

    # ---- the loop -------------------------------------------------------------------

    def _history(self, old: Rollout, new: Rollout, rd: Readings | None) -> list[history.Point]:
        """What this change adds to the rollout's reading history (canary/history.py)."""
        if new.applied_weight == old.applied_weight and new.stage == old.stage and rd is None:
            return []
        kinds: dict[str, str] = {}
        bounds: dict[str, dict[str, float | None]] = {}
        if rd is not None:
            for g in self._policy_of(new).gates_for(new.stage):
                kinds[g.name] = g.kind
                if isinstance(g, CompareGate):
                    bounds[g.name] = {"max_increase": g.max_increase, "max_ratio": g.max_ratio}
        return history.points(old, new, at=self.clock.now(), kinds=kinds, bounds=bounds,
                              rd=rd)

    async def _update(self, rollout_id: str, step: Callable[[Rollout], Rollout], *,
                      rd: Readings | None = None) -> Rollout:
        lock = self._locks.setdefault(rollout_id, asyncio.Lock())
        async with lock:
            for _ in range(20):
                try:
                    old = await self.store.load(rollout_id)
                except StoreUnavailable as e:
                    self._store_failed(str(e))
                    raise
                if rollout_id in self._tasks:
                    self._last[rollout_id] = old
                new = step(old)
                if new == old:
                    return old
                faults.point("before_save")
                try:
                    points = self._history(old, new, rd)
                    if points:
                        saved = await self.store.save(rollout=new, expected_version=old.version,
                                                      readings=points)
                    else:
                        saved = await self.store.save(rollout=new,
                                                      expected_version=old.version)
                except StoreConflict:
                    continue
                except StoreUnavailable as e:
                    self._store_failed(str(e))
                    if (rollout_id in self._tasks and new.state in _ROLLBACK
                            and old.state not in _ROLLBACK):
                        self._unsaved[rollout_id] = new  # the safe direction goes ahead
                    raise
                self._store_ok()
                if rollout_id in self._tasks:
                    self._last[rollout_id] = saved
                faults.point("after_save")
                self._log_new_events(old, saved)
                if self.notifier is not None:
                    self.notifier.saved(saved)
                self.metrics.observe(saved)
                for listener in self.listeners:
                    listener(saved)
                if saved.state.final and not old.state.final:
                    self.metrics.outcomes.labels(saved.target, saved.state.value).inc()
                    await self._store_sides(saved)
                return saved
        raise StoreConflict(f"rollout {rollout_id} kept changing under us; try again")

    async def _store_sides(self, r: Rollout) -> None:
        """Where the finished rollout left its target. Best effort: `target_sides` rebuilds
        the same from the rollout if this write is lost."""
        try:
            await self.store.save_sides(r.target, Sides.after(r))
        except Exception as e:  # the rollout is saved; its sides can be derived from it
            log.warning(f"could not store the target's sides: {e}",
                        extra={"rollout": r.id, "target": r.target})

    def _policy_of(self, r: Rollout) -> policy_mod.Policy:
        """The policy the rollout started with, parsed once: its spec never changes, and
        re-validating it every interval of every rollout is wasted work."""
        pol = self._policy_cache.get(r.id)
        if pol is None:
            try:
                pol = policy_mod.from_dict(r.policy_spec)
            except ValidationFailed as e:
                # stored by an older version, or a value that did not survive the store:
                # nothing can be judged by it, but an abort (and the rollback the loop
                # then makes) needs no policy
                why = "; ".join(f"{p.field}: {p.message}" for p in e.problems)
                log.error("the policy stored with this rollout can no longer be read: %s", why,
                          extra={"rollout": r.id, "target": r.target})
                self._unreadable[r.id] = why
                pol = policy_mod.Policy(name=r.policy, stages=(),
                                        interval=policy_mod.MIN_INTERVAL)
            self._policy_cache[r.id] = pol
        return pol

    def _log_new_events(self, old: Rollout | None, new: Rollout) -> None:
        fresh = new.events
        if old is not None:  # (counted with the trimmed ones: a long rollout's count stays flat)
            added = decide.events_recorded(new) - decide.events_recorded(old)
            fresh = new.events[len(new.events) - added:] if added > 0 else ()
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
                      interval=format_duration(pol.interval))
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
                self._last[rollout_id] = r
                if r.state.final:
                    break
                pol = self._policy_of(r)
                if r.id in self._unreadable and r.state is not Phase.ROLLING_BACK:
                    r = await self._update(rollout_id, partial(
                        decide.policy_unreadable, error=self._unreadable[r.id],
                        now=self.clock.now()))
                router = toward(self.routers[r.target], r.to_side)
                cmd = self._pending_abort.get(rollout_id)
                if cmd is not None:  # an abort the store could not take before
                    with contextlib.suppress(Conflict):
                        r = await self._update(rollout_id, partial(
                            decide.command, policy=pol, cmd=cmd, now=self.clock.now()))
                    self._pending_abort.pop(rollout_id, None)
                live = await router.get_weight()
                if live == 0 and (r.weight != 0 or r.shape is not None):
                    # a rollback made while the store could not record it, kept by the router
                    note = await router.decision()
                    if note:
                        r = await self._update(rollout_id, partial(
                            decide.adopt_rollback, note=note, now=self.clock.now()))
                        if r.state.final:
                            break
                r = await self._update(rollout_id, partial(decide.observed, weight=live,
                                                           now=self.clock.now()))
                try:
                    live_shape = await router.get_shape()
                except RouterError:
                    pass  # unreadable now: the weight's read-back already says so
                else:
                    r = await self._update(rollout_id, partial(
                        decide.observed_shape, shape=live_shape, now=self.clock.now()))
                now = self.clock.now()
                router_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.ROUTER
                # weights changed outside canary are on-call's call: never fight them
                drift_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.DRIFT
                want_shape = decide.wanted_shape(r, pol)
                if not drift_paused and (router_paused or r.weight != r.applied_weight
                                         or want_shape != r.applied_shape or not forced):
                    want = decide.stage_weight(r, pol) if router_paused else r.weight
                    wl = self.workloads.get(r.target)
                    probed = self._to_servers(r)
                    if ((wl is not None or probed is not None)
                            and r.state is Phase.PROGRESSING
                            and want > (r.applied_weight or 0)):
                        # more traffic goes only to a side that runs the canary version
                        why = (await self._workload_not_ready(wl, r, want) if wl is not None
                               else await self._servers_not_ready(r))
                        if why is not None:
                            r = await self._update(rollout_id, partial(
                                decide.workload_waiting, policy=pol, why=why,
                                now=self.clock.now(),
                                what="the canary workload" if wl is not None
                                else "the canary servers"))
                            if r.state is not Phase.ROLLING_BACK:
                                await self.clock.sleep(pol.interval, wakeup)
                            continue
                    if (r.state is Phase.ROLLING_BACK and r.promoting_since is not None
                            and r.applied_weight != 0):
                        held = await self._old_side_updated(r)
                        if held:
                            r = await self._update(rollout_id, partial(
                                decide.rollback_held, why=held, now=self.clock.now()))
                            await self.clock.sleep(pol.interval, wakeup)
                            continue
                    if not router_paused or now >= next_router_try:
                        faults.point("before_apply")
                        try:
                            await router.set_weight(want, shape=want_shape)
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
                                    if router_paused else partial(decide.applied,
                                                                  shape=want_shape))
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
                    rd = await self._measure(r, pol, now, wakeup)
                    if rd is None:
                        continue  # a command came first: act on it, measure again later
                    for x in rd.items:
                        self.metrics.verdicts.labels(r.target, x.gate, x.verdict.value).inc()
                    before = {g.name: g.status for g in r.gates}
                    r = await self._update(rollout_id, partial(
                        decide.readings, policy=pol, rd=rd, now=self.clock.now()), rd=rd)
                    self._log_gate_changes(r, before)
                if (r.state is Phase.PROMOTING and not r.returning
                        and r.applied_weight == r.weight and now >= next_eval):
                    next_eval = now + pol.interval
                    wl = self.workloads.get(r.target)
                    done = (await self._workload_handover(wl, r) if wl is not None
                            else "version_probe: every server of the serving side answers "
                                 f"{r.canary_version}" if await self._handed_over(r, wakeup)
                            else None)
                    if done is not None:
                        with contextlib.suppress(Conflict):
                            r = await self._update(rollout_id, partial(
                                decide.command, policy=pol, now=self.clock.now(),
                                cmd=Command(CommandKind.HANDOVER, "controller", done)))
                        continue
                r = await self._update(rollout_id, partial(decide.tick, policy=pol,
                                                           now=self.clock.now()))
                if r.state.final:
                    break
                router_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.ROUTER
                drift_paused = r.state is Phase.PAUSED and r.pause_kind is PauseKind.DRIFT
                if (r.weight != r.applied_weight or decide.wanted_shape(r, pol) != r.applied_shape) \
                        and not (router_paused or drift_paused):
                    continue
                now = self.clock.now()
                if next_eval <= now:
                    next_eval = now + pol.interval
                wake_at = min(next_eval, next_router_try) if router_paused else next_eval
                await self.clock.sleep(wake_at - now, wakeup)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:
                await self._store_down(rollout_id, wakeup)
            except Exception:
                # A bug or an unexpected failure must not end the rollout's task: say so
                # loudly, back off, and try again from the stored state.
                log.exception("rollout loop failed; retrying", extra={"rollout": rollout_id})
                await self.clock.sleep(backoff.next(), wakeup)
        last = self._last.get(rollout_id)
        wl = self.workloads.get(last.target) if last is not None else None
        if wl is not None and last is not None and last.state.final and not self._stopping:
            await self._scale_down_later(wl, last)
        for cache in (self._locks, self._wakeups, self._policy_cache, self._last, self._unsaved,
                      self._pending_abort, self._unreadable, self.unsaved_view):
            cache.pop(rollout_id, None)
        self.metrics.active.set(max(0, len(self._tasks) - 1))

    async def _store_down(self, rollout_id: str, wakeup: asyncio.Event) -> None:
        """The store cannot be written. Keep judging the gates from the last stored state;
        a rollback (a breach, or an abort sent meanwhile) goes to the router at once with
        the decision in the router's own state; nothing else moves. Return as soon as the
        store takes a write again, having saved any rollback made meanwhile."""
        r = self._unsaved.pop(rollout_id, None) or self._last.get(rollout_id)
        if r is None or r.state.final:
            await self.clock.sleep(STORE_RETRY, wakeup)
            return
        pol = self._policy_of(r)
        router = toward(self.routers[r.target], r.to_side)
        next_eval = self.clock.now() + pol.interval
        log.warning("rollout held while the state store cannot be written; its gates are "
                    "still judged and a rollback still reaches the router",
                    extra={"rollout": rollout_id, "target": r.target})
        while not self._stopping:
            now = self.clock.now()
            cmd = self._pending_abort.pop(rollout_id, None)
            if cmd is not None:
                with contextlib.suppress(Conflict):
                    r = decide.command(r, pol, cmd, now)
            watching = r.state is Phase.PROGRESSING or r.pause_kind is PauseKind.APPROVAL
            if watching and now >= next_eval and r.stage_since is not None:
                next_eval = now + pol.interval
                rd = await self._measure(r, pol, now, wakeup)
                if rd is not None:
                    r = decide.readings(r, pol, rd, self.clock.now())
                else:
                    next_eval = now  # an abort came first; measure again after it
            if r.state is Phase.ROLLING_BACK and (r.applied_weight != 0
                                                  or r.applied_shape is not None):
                try:
                    await router.set_weight(0, decision=decide.decision_note(r))
                except RouterError as e:
                    self.metrics.router_errors.labels(r.target).inc()
                    log.error(f"rollback could not reach the router either: {e}",
                              extra={"rollout": rollout_id, "target": r.target})
                else:
                    r = decide.applied(r, 0, self.clock.now(), shape=None)
                    log.warning(f"rolled back while the state store cannot be written: "
                                f"{r.reason}; saved once the store is back",
                                extra={"rollout": rollout_id, "target": r.target})
            if r.state in _ROLLBACK:
                self.unsaved_view[rollout_id] = replace(r, reason=(
                    f"{r.reason} (not saved yet: the state store cannot be written; saved "
                    "as soon as it can)"))
            if await self.check_store() is None:
                break
            wait = STORE_RETRY if r.state.final else min(STORE_RETRY, next_eval - now)
            await self.clock.sleep(max(0.0, wait), wakeup)
        self.unsaved_view.pop(rollout_id, None)
        if r.state in _ROLLBACK:
            note = decide.decision_note(r)
            if r.applied_weight == 0:
                await self._update(rollout_id, partial(decide.adopt_rollback, note=note,
                                                       now=self.clock.now()))
            else:  # decided, not yet in force: the loop applies it as usual
                await self._update(rollout_id, partial(decide.roll_back_for, reason=r.reason
                                                       or note, now=self.clock.now()))

    def _from_servers(self, r: Rollout) -> tuple[tuple[str, ...], NginxTarget] | None:
        """The servers of the side a rollout shifts traffic away from, when a version_probe
        can ask them."""
        tgt = self.targets.get(r.target)
        if not isinstance(tgt, NginxTarget) or tgt.version_probe is None:
            return None
        return (tgt.canary if r.to_side == "stable" else tgt.stable), tgt

    def _to_servers(self, r: Rollout) -> tuple[tuple[str, ...], NginxTarget] | None:
        """The servers of the side a rollout shifts traffic to, when a version_probe can
        ask them."""
        tgt = self.targets.get(r.target)
        if not isinstance(tgt, NginxTarget) or tgt.version_probe is None:
            return None
        return (tgt.stable if r.to_side == "stable" else tgt.canary), tgt

    async def _servers_not_ready(self, r: Rollout) -> str | None:
        """version_probe before each step up: every server about to get more traffic
        still answers the canary version; else which do not."""
        found = self._to_servers(r)
        if found is None:
            return None
        servers, tgt = found
        assert tgt.version_probe is not None
        bad = probe.mismatches(await probe.ask(servers, tgt.version_probe), r.canary_version)
        return "; ".join(a.describe() for a in bad) or None

    async def _race(self, work: asyncio.Future[list[probe.Answer]],
                    wakeup: asyncio.Event) -> list[probe.Answer] | None:
        """`work`'s answers, or None when a command wakes the rollout first."""
        woken: asyncio.Future[object] = asyncio.ensure_future(wakeup.wait())
        waiting: set[asyncio.Future[object]] = {woken, work}  # type: ignore[arg-type]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        return None if work.cancelled() else work.result()

    async def _handed_over(self, r: Rollout, wakeup: asyncio.Event) -> bool:
        """version_probe: does every server of the serving side run the canary version?"""
        found = self._from_servers(r)
        if found is None:
            return False
        servers, tgt = found
        assert tgt.version_probe is not None
        answers = await self._race(asyncio.ensure_future(probe.ask(servers, tgt.version_probe)),
                                   wakeup)
        return answers is not None and not probe.mismatches(answers, r.canary_version)

    async def _old_side_updated(self, r: Rollout) -> str | None:
        """A rollback from the hand-over goes back to the serving side only if none of its
        servers runs the new version already; else why not."""
        found = self._from_servers(r)
        if found is None:
            return None
        servers, tgt = found
        assert tgt.version_probe is not None
        # not cut short by a command: the rollback is decided, only its direction is asked
        answers = await probe.ask(servers, tgt.version_probe)
        updated = [a for a in answers if a.version == r.canary_version]
        if not updated:
            return None
        return "; ".join(a.describe() for a in updated)

    # ---- the Deployment pair of a target with a `workload:` -------------------------------

    async def _workload_start(self, wl: workload_mod.Workloads, tgt: Target,
                              stable_version: str | None) -> None:
        """Before a start: both Deployments exist, and the stable one runs the stable
        version (the canary one may still be rolling out: the rollout waits for it)."""
        stable = await wl.state(wl.workload.stable)
        await wl.state(wl.workload.canary)
        if stable_version is not None and stable.version != stable_version:
            raise InvalidInput(f"target {tgt.name}: the stable side must run {stable_version} "
                               f"(stable_version): {stable.describe()} (label "
                               f"{wl.workload.version_label})")

    async def _workload_not_ready(self, wl: workload_mod.Workloads, r: Rollout,
                                  weight: int) -> str | None:
        """Size the canary Deployment for `weight` (proportional) and say what is missing
        before traffic may move there; None when it is ready."""
        try:
            stable = await wl.state(wl.workload.stable)
            canary = await wl.state(wl.workload.canary)
            if wl.workload.scale_canary == "proportional":
                want = workload_mod.canary_replicas(stable.replicas, weight)
                if canary.replicas != want:
                    await wl.scale(wl.workload.canary, want)
                    canary = await wl.state(wl.workload.canary)
            else:
                want = max(1, canary.replicas)
        except (RouterError, NotFound) as e:
            return str(e)
        return workload_mod.ready_for(canary, r.canary_version, want)

    async def _workload_handover(self, wl: workload_mod.Workloads, r: Rollout) -> str | None:
        """Hand-over for a workload: copy the canary's pod template to the stable
        Deployment, then, once its rollout is complete, say so (None until then)."""
        try:
            stable = await wl.state(wl.workload.stable)
            if stable.version != r.canary_version:
                await wl.copy_template()
                return None
            if stable.rolled_out:
                return (f"the stable Deployment runs {r.canary_version}: "
                        f"{stable.describe()}")
        except (RouterError, NotFound) as e:
            log.warning(f"hand-over: {e}; retrying", extra={"rollout": r.id,
                                                           "target": r.target})
        return None

    async def _idle_scale_down(self, target: str, wl: workload_mod.Workloads) -> None:
        """At start: a target with no active rollout whose canary Deployment still runs
        the last finished rollout's version with replicas is scaled to 0 once
        scale_down_delay has passed since that rollout ended. A canary Deployment that
        runs another version was deployed since, for the next release: left alone."""
        try:
            last = await self.store.list(target=target, limit=1, events=False,
                                         state=(Phase.SUCCEEDED, Phase.ROLLED_BACK))
            if not last:
                return
            canary = await wl.state(wl.workload.canary)
            if canary.replicas == 0 or canary.version != last[0].canary_version:
                return
            await self.clock.sleep(last[0].updated_at + wl.workload.scale_down_delay
                                   - self.clock.now())
            if await self.store.list(target=target, active_only=True, limit=1, events=False):
                return  # a release started meanwhile: its rollout sizes the canary
            await self._scale_down_later(wl, last[0], delay=0.0)
        except (RouterError, NotFound, StoreUnavailable) as e:
            log.warning(f"could not check the idle canary Deployment: {e}",
                        extra={"target": target})

    async def _scale_down_later(self, wl: workload_mod.Workloads, r: Rollout,
                                delay: float | None = None) -> None:
        """After a rollout ends, weight 0 on the canary is in force: scale the idle canary
        Deployment to 0 once scale_down_delay has passed."""
        await self.clock.sleep(wl.workload.scale_down_delay if delay is None else delay, None)
        try:
            await wl.scale(wl.workload.canary, 0)
        except (RouterError, NotFound) as e:
            log.error(f"could not scale the idle canary Deployment to 0: {e}",
                      extra={"rollout": r.id, "target": r.target})
        else:
            log.info(f"canary Deployment {wl.workload.canary} scaled to 0",
                     extra={"rollout": r.id, "target": r.target})

    async def _measure(self, r: Rollout, pol: policy_mod.Policy, now: float,
                       wakeup: asyncio.Event) -> Readings | None:
        """The stage's gates, or None when a command (an abort) wakes the rollout first: a
        slow or hung Prometheus must never stand between on-call and the router."""
        tgt = self.targets[r.target]
        values = self._template_values(tgt, r.canary_version, r.stable_version, r.id, pol)
        gates = () if r.pre_rollout else pol.gates_for(r.stage)
        asked = pol.gating_hooks(r.stage, pre_rollout=r.pre_rollout)

        async def both() -> tuple[Reading, ...]:
            # the hooks are asked beside the queries, inside this cancellable measurement:
            # a hung hook costs its own timeout, and an abort does not wait for it
            got = await asyncio.gather(
                measure(self.source, gates, values,
                        budget=max(1.0, min(10.0, pol.interval / 2))),
                hooks.ask(self._session(), asked, values, r.to_api()) if asked
                else asyncio.sleep(0, ()))
            return (*got[0], *got[1])

        task = asyncio.ensure_future(both())
        woken = asyncio.ensure_future(wakeup.wait())
        try:
            await asyncio.wait({task, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            wakeup.clear()
            return None
        return Readings(at=now, stage=r.stage, items=task.result())

