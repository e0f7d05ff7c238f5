"""The pure state machine: (rollout, policy, time, what happened) -> new rollout.

No I/O and no clock of its own. The loop persists what this returns, then makes the
router carry `weight`; everything it learns (readings, the router's weight, an apply
that failed, an on-call command) comes back through here.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import replace

from canary import shapes
from canary.errors import Conflict
from canary.fields import format_duration
from canary.gates import sequential
from canary.gates.kinds import ErrorsGate, ThresholdGate
from canary.hooks import HOOK_PREFIX
from canary.model import (
    Command,
    CommandKind,
    Event,
    GateStatus,
    PauseKind,
    Phase,
    Reading,
    Readings,
    Rollout,
    Verdict,
)
from canary.policy import NoData, Policy
from canary.stages import stage_shape

# A rollout's events are bounded in number and in text, so its stored record (rewritten at
# every evaluation) stays small however often on-call pauses and resumes with long
# reasons: its first events (how it began), a `trimmed` marker, and the latest ones.
MAX_EVENTS = 1000
FIRST_EVENTS = 100
MAX_EVENT_TEXT = 64 * 1024     # characters of messages and actors, all events together
FIRST_EVENT_TEXT = 16 * 1024   # ... of which the first events take at most this
MAX_MESSAGE = 2000             # one event's message (a reason is at most 1,000)


def _event(r: Rollout, now: float, type_: str, message: str, actor: str = "controller") -> Rollout:
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    events = (*r.events, Event(at=now, type=type_, message=message, actor=actor))
    return replace(r, events=_trim(events), updated_at=now)


def _text_size(text: str) -> int:
    """Characters as stored: the store's JSON writes a non-ASCII one as \\uXXXX."""
    return len(text) if text.isascii() else len(json.dumps(text)) - 2


def _size(e: Event) -> int:
    return _text_size(e.message) + _text_size(e.actor)


def events_recorded(r: Rollout) -> int:
    """How many events the rollout has recorded, those its `trimmed` marker stands for
    included (and the marker itself not)."""
    for e in r.events:
        if e.type == "trimmed":
            return len(r.events) - 1 + int(e.message.split()[0])
    return len(r.events)


def _trim(events: tuple[Event, ...]) -> tuple[Event, ...]:
    """Keep how the rollout began (who started it, its first stages) and what happened
    last; say how many in between were dropped, in one `trimmed` event."""
    sizes = [_size(e) for e in events]
    if len(events) <= MAX_EVENTS and sum(sizes) <= MAX_EVENT_TEXT:
        return events
    mark = next((i for i, e in enumerate(events) if e.type == "trimmed"), None)
    # the head: a prefix of the events before the marker (all but the newest if none yet)
    head_n, used = 0, 0
    while (head_n < min(FIRST_EVENTS, len(events) - 1 if mark is None else mark)
           and used + sizes[head_n] <= FIRST_EVENT_TEXT):
        used += sizes[head_n]
        head_n += 1
    if mark is not None:
        dropped = int(events[mark].message.split()[0]) + (mark - head_n)
        rest = events[mark + 1:]
        rest_sizes = sizes[mark + 1:]
    else:
        dropped = 0
        rest = events[head_n:]
        rest_sizes = sizes[head_n:]
    room_n = MAX_EVENTS - head_n - 1
    room_text = MAX_EVENT_TEXT - used - 200  # (the marker's own text)
    keep, kept = 0, 0
    while keep < len(rest) and keep < room_n and kept + rest_sizes[-1 - keep] <= room_text:
        kept += rest_sizes[-1 - keep]
        keep += 1
    keep = max(keep, 1)  # the newest event is always kept
    dropped += len(rest) - keep
    at = rest[-keep - 1].at if len(rest) > keep else events[mark].at if mark is not None \
        else rest[-keep].at
    marker = Event(at=at, type="trimmed", actor="controller",
                   message=f"{dropped} events omitted here (a rollout keeps its first "
                           f"{head_n} and its latest {keep}, within {MAX_EVENTS} events and "
                           f"{MAX_EVENT_TEXT // 1024} KiB of text)")
    return (*events[:head_n], marker, *rest[-keep:])


def fresh_gates(policy: Policy, stage: int,
                previous: tuple[GateStatus, ...] = ()) -> tuple[GateStatus, ...]:
    """The stage's gates, unjudged. A sequential gate keeps its evidence across stages
    (its false-rollback budget is per rollout)."""
    kept = {g.name: g.state for g in previous if g.state is not None}
    out = []
    for h in policy.gating_hooks(stage):
        out.append(GateStatus(name=HOOK_PREFIX + h.name, min=None, max=None))
    for g in policy.gates_for(stage):
        if isinstance(g, ErrorsGate):
            out.append(GateStatus(name=g.name, min=None, max=math.log10(1 / g.alpha),
                                  state=kept.get(g.name, {})))
        elif isinstance(g, ThresholdGate):
            out.append(GateStatus(name=g.name, min=g.min, max=g.max))
        else:
            out.append(GateStatus(name=g.name, min=None, max=None))
    return tuple(out)


def start(*, rollout_id: str, target: str, policy: Policy, canary_version: str,
          stable_version: str | None, now: float, actor: str, to_side: str = "canary",
          promotion: str = "swap") -> Rollout:
    """`to_side`: the configured side the new version runs on (the other one serves);
    `promotion`: how the release is carried through at 100% (swap | return)."""
    first = policy.stages[0]
    r = Rollout(id=rollout_id, target=target, policy=policy.name, policy_spec=policy.to_dict(),
                canary_version=canary_version, stable_version=stable_version,
                state=Phase.PROGRESSING, stage=0, weight=first.weight, started_at=now,
                updated_at=now, gates=fresh_gates(policy, 0), shape=_shape_key(policy, 0),
                to_side=to_side, promotion=promotion)
    sides = "" if to_side == "canary" else f" (on the {to_side} side; the canary side serves)"
    asked = policy.hooks("pre-rollout")
    if asked:
        # no traffic moves (no weight, no match rule, no mirror) before every pre-rollout
        # hook has said yes
        r = replace(r, weight=0, shape=None, pre_rollout=True, gates=tuple(
            GateStatus(name=HOOK_PREFIX + h.name, min=None, max=None) for h in asked))
        return _event(r, now, "start",
                      f"rollout of {canary_version} on {target} with policy {policy.name}; "
                      f"weight 0 until the pre-rollout hooks "
                      f"({', '.join(h.name for h in asked)}) answer 2xx{sides}", actor)
    return _event(r, now, "start",
                  f"rollout of {canary_version} on {target} with policy {policy.name}, "
                  f"{_traffic(r)}{sides}", actor)


def _shape_key(policy: Policy, stage: int) -> str | None:
    shape = stage_shape(policy.stages[stage]) if 0 <= stage < len(policy.stages) else None
    return shape.key() if shape else None


def _traffic(r: Rollout) -> str:
    """What the stage sends to the canary, in words."""
    if r.shape is None:
        return f"weight {r.weight}"
    return f"weight 0 for users, {shapes.describe(r.shape)}"


def _from_side(r: Rollout) -> str:
    return "stable" if r.to_side == "canary" else "canary"


def _enter_stage(r: Rollout, policy: Policy, stage: int, now: float, actor: str,
                 why: str) -> Rollout:
    weight = policy.stages[stage].weight
    r = replace(r, stage=stage, weight=weight, stage_since=None, state=Phase.PROGRESSING,
                pre_rollout=False,
                pause_kind=None, paused_at=None, reason=None,
                gates=fresh_gates(policy, stage, r.gates), shape=_shape_key(policy, stage))
    return _event(r, now, "stage", f"stage {stage}: {_traffic(r)} ({why})", actor)


def _roll_back(r: Rollout, now: float, reason: str, actor: str = "controller") -> Rollout:
    r = replace(r, state=Phase.ROLLING_BACK, weight=0, reason=reason, pause_kind=None,
                paused_at=None, finishing=False, shape=None)
    r = _event(r, now, "rollback", reason, actor)
    return _finish_if_done(r, now)


def _pause(r: Rollout, now: float, kind: PauseKind, reason: str) -> Rollout:
    return replace(r, state=Phase.PAUSED, pause_kind=kind, paused_at=now, reason=reason,
                   updated_at=now)


def _finish_if_done(r: Rollout, now: float) -> Rollout:
    """Final states are reported only once the router carries their weight."""
    if r.state is Phase.ROLLING_BACK and r.applied_weight == 0 and r.applied_shape is None:
        return _event(replace(r, state=Phase.ROLLED_BACK), now, "rolled_back",
                      "all traffic on stable")
    if r.finishing and r.applied_weight == 100 and r.weight == 100 and not r.state.final:
        if r.promotion == "return":
            # the release is done only once the serving side runs it and has the traffic back
            r = replace(r, state=Phase.PROMOTING, reason=None, pause_kind=None, paused_at=None,
                        finishing=False, promoting_since=now)
            return _event(r, now, "promoting",
                          f"all traffic on {r.canary_version} ({r.to_side} side); hand-over: "
                          f"deploy {r.canary_version} on the {_from_side(r)} side, then call "
                          "handover (or let version_probe see it)")
        r = replace(r, state=Phase.SUCCEEDED, reason=None, pause_kind=None, paused_at=None,
                    finishing=False)
        return _event(r, now, "succeeded", f"all traffic on {r.canary_version}")
    if (r.returning and r.state is Phase.PROMOTING and r.weight == 0
            and r.applied_weight == 0):
        r = replace(r, state=Phase.SUCCEEDED, reason=None, pause_kind=None, paused_at=None)
        return _event(r, now, "succeeded",
                      f"handed over: all traffic on the {_from_side(r)} side, running "
                      f"{r.canary_version}; the {r.to_side} side carries 0%")
    return r


def policy_unreadable(r: Rollout, error: str, now: float) -> Rollout:
    """The policy stored with the rollout no longer validates (a rule tightened by an
    upgrade, or a value that did not survive the store): no gate can be judged by it, so
    the rollout goes the safe way, back to stable."""
    if r.state.final or r.state is Phase.ROLLING_BACK:
        return r
    return _roll_back(r, now, f"the policy stored with this rollout can no longer be read "
                              f"({error}); rolled back: start it again with a valid policy")


# ---- commands from on-call and the pipeline --------------------------------------------


def command(r: Rollout, policy: Policy, cmd: Command, now: float) -> Rollout:
    """Apply an override, or raise Conflict saying why it does not fit the state."""
    who = f"{cmd.actor}: {cmd.reason}"
    if cmd.kind is CommandKind.HANDOVER and r.promotion == "return" and (
            r.returning or r.state is Phase.SUCCEEDED):
        # already handed over, or handing over: what the caller wants is so. A pipeline
        # that deploys the stable side and then calls handover races the version_probe,
        # which may have seen the deploy first; its call must not fail the release.
        return r
    if r.state.final:
        raise Conflict(f"rollout {r.id} is already {r.state.value}; nothing to {cmd.kind.value}")
    if cmd.kind is CommandKind.HANDOVER:
        return _handover(r, cmd, now)
    if cmd.kind is CommandKind.ABORT and r.returning:
        raise Conflict(f"rollout {r.id} is handing over: the {_from_side(r)} side already runs "
                       f"{r.canary_version} and traffic is going back to it; no side runs "
                       f"{r.stable_version} to roll back to")
    if cmd.kind is CommandKind.ABORT:
        if r.state is Phase.ROLLING_BACK:
            raise Conflict(f"rollout {r.id} is already rolling back")
        r = _event(r, now, "abort", cmd.reason, cmd.actor)
        return _roll_back(r, now, f"aborted by {who}", cmd.actor)
    if r.state is Phase.ROLLING_BACK:
        raise Conflict(f"rollout {r.id} is rolling back; it cannot {cmd.kind.value}")
    if r.state is Phase.PROMOTING:
        raise Conflict(f"rollout {r.id} is promoting (100% on {r.canary_version}, hand-over "
                       f"in progress); it cannot {cmd.kind.value}: call handover once the "
                       f"{_from_side(r)} side runs {r.canary_version}, or abort")
    if cmd.kind is CommandKind.PAUSE:
        if r.state is Phase.PAUSED:
            raise Conflict(f"rollout {r.id} is already paused ({r.reason}); "
                           "resume, promote or abort it")
        r = _pause(r, now, PauseKind.MANUAL, f"paused by {who}")
        return _event(r, now, "pause", cmd.reason, cmd.actor)
    if cmd.kind is CommandKind.RESUME:
        if r.state is not Phase.PAUSED:
            raise Conflict(f"rollout {r.id} is not paused; it is {r.state.value}")
        if r.pause_kind is PauseKind.APPROVAL:
            raise Conflict(f"rollout {r.id} waits for approval at weight {r.weight}; "
                           "promote it to continue, or abort it")
        target_weight = stage_weight(r, policy)
        if r.shape is None and not r.finishing:
            r = replace(r, shape=_shape_key(policy, r.stage))
        if (r.weight != target_weight or r.applied_weight != r.weight
                or r.applied_shape != r.shape):
            # the weight in force is not this stage's: re-apply it and serve the hold anew
            r = replace(r, weight=target_weight, stage_since=None)
        elif r.stage_since is not None and r.paused_at is not None:
            # time spent paused is not time held under watch
            r = replace(r, stage_since=r.stage_since + (now - r.paused_at))
        r = replace(r, state=Phase.PROGRESSING, pause_kind=None, paused_at=None, reason=None)
        if r.promoting_since is not None:  # back to the hand-over, with a new deadline
            r = replace(r, state=Phase.PROMOTING, promoting_since=now)
        return _event(r, now, "resume", cmd.reason, cmd.actor)
    # promote
    if r.promoting_since is not None:
        raise Conflict(f"rollout {r.id} is already at 100% and handing over; call handover "
                       "once the other side runs the new version")
    last = len(policy.stages) - 1
    if cmd.full or r.stage >= last:
        r = replace(r, stage=last, weight=100, finishing=True, state=Phase.PROGRESSING,
                    pause_kind=None, paused_at=None, reason=None, pre_rollout=False, shape=None,
                    stage_since=r.stage_since if r.weight == 100 else None)
        r = _event(r, now, "promote", f"{cmd.reason} (to 100%)", cmd.actor)
        return _finish_if_done(r, now)
    r = _event(r, now, "promote", cmd.reason, cmd.actor)
    if r.pre_rollout:  # past the pre-rollout hooks, to the first stage
        return _enter_stage(r, policy, 0, now, cmd.actor, f"promoted by {cmd.actor}")
    return _enter_stage(r, policy, r.stage + 1, now, cmd.actor, f"promoted by {cmd.actor}")


# ---- what the router says ---------------------------------------------------------------


def decision_note(r: Rollout) -> str:
    """What the router keeps beside weight 0 when the store cannot record a rollback:
    enough for a controller that restarts to record it (see `adopt_rollback`)."""
    return f"rollback {r.id}: {r.reason or 'rolled back'}"


def roll_back_for(r: Rollout, reason: str, now: float) -> Rollout:
    """Record a rollback decided while the store could not take it."""
    if r.state.final or r.state is Phase.ROLLING_BACK:
        return r
    return _roll_back(r, now, reason)


def adopt_rollback(r: Rollout, note: str, now: float) -> Rollout:
    """The router carries weight 0 with a rollback decision for this rollout, made while
    the state store could not record it (by this process before a restart, or before
    the store came back): record it now. Traffic never goes back to the canary."""
    prefix = f"rollback {r.id}: "
    if r.state.final or not note.startswith(prefix):
        return r
    if r.state is not Phase.ROLLING_BACK:
        r = _roll_back(r, now, note[len(prefix):] + " (decided while the state store could "
                                                   "not be written)")
    return applied(r, 0, now, shape=None)  # (a write of weight 0 removes every shape)




class _Keep(enum.Enum):
    KEEP = 0


KEEP = _Keep.KEEP


def applied(r: Rollout, weight: int, now: float, *,
            shape: str | _Keep | None = KEEP) -> Rollout:
    """The router confirmed it carries `weight` (and `shape`, when given: the match rule
    or mirror it carries, None for none)."""
    if r.state.final:
        return r
    r = replace(r, applied_weight=weight, updated_at=now,
                applied_shape=r.applied_shape if shape is KEEP else shape)
    if r.waiting_since is not None:
        r = replace(r, waiting_since=None,
                    reason=None if r.state is Phase.PROGRESSING else r.reason)
    if weight == r.weight and r.applied_shape == r.shape and r.stage_since is None:
        r = replace(r, stage_since=now)
    return _finish_if_done(r, now)


def observed_shape(r: Rollout, shape: str | None, now: float) -> Rollout:
    """The match rule or mirror the router carries, read back every interval. As with
    weights, a change made outside canary (someone removed canary's match rule) is drift:
    recorded and paused, never fought, except while rolling back."""
    if r.state.final or shape == r.applied_shape:
        return r
    if shape == r.shape and r.applied_weight is not None:
        # a write that landed before a crash
        return applied(r, r.applied_weight, now, shape=shape)
    expected = r.applied_shape
    r = replace(r, applied_shape=shape, updated_at=now)
    if r.state is Phase.ROLLING_BACK:
        return _event(r, now, "drift", f"router carries {shapes.describe(shape)} while rolling "
                                       "back; removing it")
    message = (f"router carries {shapes.describe(shape)}, expected "
               f"{shapes.describe(expected)}; changed outside canary. Resume to re-apply "
               f"{shapes.describe(r.shape)}, or abort to roll back")
    r = _event(r, now, "drift", message)
    if r.state is Phase.PAUSED and r.pause_kind is not PauseKind.DRIFT:
        return replace(r, pause_kind=PauseKind.DRIFT, reason=f"drift: {message}; "
                                                            f"before that: {r.reason}")
    if r.state is Phase.PAUSED:
        return r
    return _pause(r, now, PauseKind.DRIFT, f"drift: {message}")


def wanted_shape(r: Rollout, policy: Policy) -> str | None:
    """The shape the router should carry with the weight `apply` writes: the stage's
    while it runs; none while rolling back, finishing or once final."""
    if r.state.final or r.state is Phase.ROLLING_BACK or r.finishing:
        return None
    if r.state is Phase.PAUSED and r.pause_kind is PauseKind.ROUTER:
        return _shape_key(policy, r.stage)
    return r.shape


def apply_failed(r: Rollout, policy: Policy, error: str, now: float) -> Rollout:
    """The router could not apply `r.weight`. A rollback keeps trying; anything else pauses
    at the weight still in force, says why, and is retried by the loop."""
    if r.state.final:
        return r
    if r.state is Phase.ROLLING_BACK:
        reason = f"rolling back; the router has not yet taken weight 0: {error}"
        if r.reason != reason:
            r = _event(replace(r, reason=reason), now, "router_error", error)
        return r
    if r.state is Phase.PAUSED and r.pause_kind is PauseKind.ROUTER:
        # still failing while paused for it: say so only when the error changes
        if error in (r.reason or ""):
            return r
        r = replace(r, reason=f"router still cannot apply weight {stage_weight(r, policy)}: "
                              f"{error}; weight {r.weight} stays in force; retrying")
        return _event(r, now, "router_error", error)
    wanted = r.weight
    in_force = r.applied_weight if r.applied_weight is not None else wanted
    r = replace(r, weight=in_force, stage_since=r.stage_since if in_force == wanted else None)
    reason = (f"router could not apply weight {wanted}: {error}; weight {in_force} stays in "
              "force; retrying with backoff, or fix the router and resume")
    r = _pause(r, now, PauseKind.ROUTER, reason)
    return _event(r, now, "router_error", error)


def stage_weight(r: Rollout, policy: Policy) -> int:
    """The weight the rollout's current stage asks for."""
    if r.pre_rollout:
        return 0
    if r.returning:
        return 0
    if r.promoting_since is not None:
        return 100
    return 100 if r.finishing else policy.stages[r.stage].weight


def _handover(r: Rollout, cmd: Command, now: float) -> Rollout:
    """The serving side now runs the canary version: return the traffic to it in one step;
    the rollout succeeds once the router carries it."""
    if r.promotion != "return":
        raise Conflict(f"rollout {r.id} uses promotion swap: the side at 100% becomes the "
                       "stable side by itself; there is nothing to hand over")
    if r.returning:
        raise Conflict(f"rollout {r.id} is already handing over")
    handing = r.state is Phase.PROMOTING or (
        r.state is Phase.PAUSED and r.promoting_since is not None
        and r.pause_kind in (PauseKind.HANDOVER, PauseKind.MANUAL))
    if not handing:
        raise Conflict(f"rollout {r.id} is {r.state.value} at weight {r.weight}; handover "
                       "fits only once it is promoting (at 100%, gates passed)")
    r = replace(r, state=Phase.PROMOTING, returning=True, weight=0, pause_kind=None,
                paused_at=None, reason=None)
    return _event(r, now, "handover", f"{cmd.reason}: traffic returns to the {_from_side(r)} "
                                      f"side, now running {r.canary_version}", cmd.actor)


def rollback_held(r: Rollout, why: str, now: float) -> Rollout:
    """A rollback from the hand-over cannot go to the serving side: some of its servers
    already run the new version. Traffic stays where it is; say why, once."""
    if r.state is not Phase.ROLLING_BACK:
        return r
    reason = (f"rolling back, held: {why}; traffic stays on the {r.to_side} side until the "
              f"{_from_side(r)} side runs {r.stable_version} again")
    if r.reason == reason:
        return r
    r = replace(r, reason=reason)
    return _event(r, now, "rollback_held", why)


def workload_waiting(r: Rollout, policy: Policy, why: str, now: float,
                     what: str = "the canary workload") -> Rollout:
    """The canary workload (or, with a version_probe, the canary servers) is not ready
    for the next weight: hold the weight in force (no more traffic moves) and say why;
    past the progress deadline, roll back."""
    if r.state is not Phase.PROGRESSING:
        return r
    since = r.waiting_since if r.waiting_since is not None else now
    if now - since > policy.progress_deadline:
        return _roll_back(replace(r, waiting_since=None), now,
                          f"{what} was not ready for weight {r.weight} within "
                          f"{format_duration(policy.progress_deadline)}: {why}")
    reason = f"waiting for {what} before weight {r.weight}: {why}"
    if r.reason == reason and r.waiting_since is not None:
        return r
    r = replace(r, waiting_since=since, reason=reason)
    return _event(r, now, "workload", why)


def handover_overdue(r: Rollout, policy: Policy, now: float) -> Rollout:
    """A hand-over that did not complete within the progress deadline: traffic stays on
    the new version (never back to an old one), and the rollout pauses to say so."""
    if (r.state is not Phase.PROMOTING or r.returning or r.promoting_since is None
            or now - r.promoting_since <= policy.progress_deadline):
        return r
    r = _pause(r, now, PauseKind.HANDOVER,
               f"hand-over not complete within {format_duration(policy.progress_deadline)}: "
               f"the {_from_side(r)} side does not run {r.canary_version} yet; traffic stays "
               f"on the {r.to_side} side. Deploy {r.canary_version} there and call handover, "
               "or resume to wait again")
    return _event(r, now, "handover_overdue", r.reason or "")


def router_recovered(r: Rollout, policy: Policy, weight: int, now: float) -> Rollout:
    """A rollout paused because the router failed got its stage's weight applied on a
    retry: carry on by itself, serving the stage's hold from now."""
    if r.state is not Phase.PAUSED or r.pause_kind is not PauseKind.ROUTER:
        return applied(r, weight, now)
    r = replace(r, state=Phase.PROGRESSING if r.promoting_since is None else Phase.PROMOTING,
                pause_kind=None, paused_at=None, reason=None,
                weight=weight, applied_weight=weight, stage_since=now,
                shape=_shape_key(policy, r.stage) if not r.finishing else None)
    r = replace(r, applied_shape=r.shape)
    r = _event(r, now, "router_recovered", f"weight {weight} applied; continuing")
    return _finish_if_done(r, now)


def observed(r: Rollout, weight: int | None, now: float) -> Rollout:
    """The router's live weight, read back every interval. A change made outside canary is
    drift: record it and pause; never fight it (except a rollback, which always wins)."""
    if r.state.final or weight is None:
        return r
    if weight == r.applied_weight:
        return r
    if r.applied_weight is None or weight == r.weight:
        # first look after a (re)start, or a write that landed before a crash
        return applied(r, weight, now)
    expected = r.applied_weight
    r = replace(r, applied_weight=weight, updated_at=now)
    if r.state is Phase.ROLLING_BACK:
        return _event(r, now, "drift", f"router carries weight {weight} while rolling back; "
                                       "re-applying 0")
    message = (f"router carries canary weight {weight}, expected {expected}; changed outside "
               f"canary. Resume to re-apply {r.weight}, or abort to roll back")
    r = _event(r, now, "drift", message)
    if r.state is Phase.PAUSED and r.pause_kind is not PauseKind.DRIFT:
        # already paused (by on-call, for approval, ...): now it is drift that holds it
        return replace(r, pause_kind=PauseKind.DRIFT, reason=f"drift: {message}; "
                                                            f"before that: {r.reason}")
    return _pause(r, now, PauseKind.DRIFT, f"drift: {message}")


# ---- gates and time ---------------------------------------------------------------------


def _counts_as(verdict: Verdict, no_data: NoData, *, sequential: bool = False) -> Verdict:
    """pass, fail or no_data (hold). A query error is never a pass; an inconclusive
    sequential gate always holds, and so does one that read no counters (`sequential`):
    it has compared nothing, so `no_data: pass` does not make it pass (docs/verdicts.md,
    promise 3), while `no_data: fail` still makes it block."""
    if verdict in (Verdict.PASS, Verdict.FAIL):
        return verdict
    if verdict in (Verdict.INCONCLUSIVE, Verdict.PENDING):
        return Verdict.NO_DATA
    if no_data is NoData.FAIL:
        return Verdict.FAIL
    if no_data is NoData.PASS and verdict is Verdict.NO_DATA and not sequential:
        return Verdict.PASS
    return Verdict.NO_DATA


def _describe(g: GateStatus) -> str:
    if g.value is None:
        return f"gate {g.name}: {g.status.value}" + (f" ({g.detail})" if g.detail else "")
    bound = (f"above max {g.max:g}" if g.max is not None and g.value > g.max
             else f"below min {g.min:g}" if g.min is not None and g.value < g.min
             else "within bounds")
    if g.status is Verdict.INCONCLUSIVE and g.detail:
        return f"gate {g.name}: inconclusive ({g.detail})"
    if g.min is None and g.max is None:  # a comparison: its detail says against what
        return f"gate {g.name}: value {g.value:.6g} ({g.detail or g.status.value})"
    return f"gate {g.name}: value {g.value:.6g} {bound}"


def readings(r: Rollout, policy: Policy, rd: Readings, now: float) -> Rollout:
    """Fold one evaluation of the stage's gates into the rollout."""
    watching = r.state is Phase.PROGRESSING or (
        r.state is Phase.PAUSED and r.pause_kind is PauseKind.APPROVAL)
    if (not watching or rd.stage != r.stage or r.stage_since is None
            or r.applied_weight != r.weight or rd.at < r.stage_since):
        return r  # taken under another weight, or while nobody should judge
    by_name = {x.gate: x for x in rd.items}
    specs = {g.name: g for g in policy.gates_for(r.stage)}
    gates: list[GateStatus] = []
    breached: GateStatus | None = None
    fired: GateStatus | None = None
    hooks: list[str] = []  # the hooks' answers worth an event: a refusal, or a change
    for g in r.gates:
        x = by_name.get(g.name)
        if x is None:
            gates.append(g)
            continue
        spec = specs.get(g.name)
        if isinstance(spec, ErrorsGate) and x.raw is not None:
            ng = _sequential(g, spec, x, rd.at, before_full=r.stage == len(policy.stages) - 2,
                             weight=r.weight)
            gates.append(ng)
            if ng.status is Verdict.FAIL and fired is None:
                fired = ng
            continue
        if spec is not None and spec.kind == "compare" and r.weight == 100:
            # at 100% stable serves nothing (its series may be gone): a comparison with it
            # is not judged there; the stages before judged the canary against stable
            x = Reading(x.gate, Verdict.PASS, detail="not judged at 100%: stable serves no "
                                                     "traffic to compare with")
        counted = _counts_as(x.verdict, policy.no_data)
        failures = (g.failures + 1 if counted is Verdict.FAIL
                    else 0 if counted is Verdict.PASS else g.failures)
        ng = replace(g, status=x.verdict, value=x.value, failures=failures, at=rd.at,
                     detail=x.detail)
        gates.append(ng)
        if g.name.startswith(HOOK_PREFIX) and (x.verdict is not g.status
                                               or x.verdict is not Verdict.PASS):
            hooks.append(f"{g.name[len(HOOK_PREFIX):]}: {x.verdict.value} ({x.detail})")
        if failures >= policy.failure_limit and breached is None:
            breached = ng
    r = replace(r, gates=tuple(gates), updated_at=now)
    for message in hooks:
        r = _event(r, now, "hook", "hook " + message)
    if fired is not None:
        # sequential evidence already bounds false alarms: no failure_limit on top
        return _roll_back(r, now, f"gate {fired.name}: {fired.detail}")
    if breached is not None:
        return _roll_back(r, now, f"{_describe(breached)} for {breached.failures} consecutive "
                                  f"evaluations (failure_limit {policy.failure_limit})")
    return r


def _sequential(g: GateStatus, spec: ErrorsGate, x: Reading, at: float, *,
                before_full: bool, weight: int) -> GateStatus:
    gate = sequential.ErrorGate(tolerance=spec.tolerance, alpha=spec.alpha, gross=spec.gross,
                                final_gross=spec.final_gross, detect_rate=spec.detect_rate,
                                warmup=spec.warmup, wander=spec.wander)
    state = sequential.State.from_json(g.state)
    out = sequential.update(gate, state, x.raw or {}, new_stage=g.at is None,
                            before_full=before_full, now=at, weight=weight)
    verdict = {"fail": Verdict.FAIL, "pass": Verdict.PASS, "no_data": Verdict.NO_DATA,
               "inconclusive": Verdict.INCONCLUSIVE}[out.verdict]
    return replace(g, status=verdict, value=out.value, at=at, detail=out.detail,
                   state=out.state.to_json(), failures=g.failures + (verdict is Verdict.FAIL))


def tick(r: Rollout, policy: Policy, now: float) -> Rollout:
    """Time-driven rules: move on after a passing hold, wait for approval, give up at the
    progress deadline."""
    r = _finish_if_done(r, now)
    if (r.state is Phase.PAUSED and r.pause_kind is PauseKind.APPROVAL
            and policy.approval_timeout is not None and r.paused_at is not None
            and now - r.paused_at >= policy.approval_timeout):
        return _roll_back(r, now, f"approval timed out: stage {r.stage} (weight {r.weight}) "
                                  f"waited {format_duration(now - r.paused_at)} for a promote, "
                                  f"longer than approval_timeout "
                                  f"{format_duration(policy.approval_timeout)}")
    if r.state is Phase.PROMOTING:
        return handover_overdue(r, policy, now)
    if (r.state is not Phase.PROGRESSING or r.finishing or r.stage_since is None
            or r.applied_weight != r.weight):
        return r
    stage = policy.stages[r.stage]
    held = now - r.stage_since
    judged = all(g.at is not None and g.at >= r.stage_since for g in r.gates)
    sequential_gates = {g.name for g in policy.gates_for(r.stage) if isinstance(g, ErrorsGate)}

    def counts_as(g: GateStatus) -> Verdict:
        return _counts_as(g.status, policy.no_data, sequential=g.name in sequential_gates)

    passing = judged and all(counts_as(g) is Verdict.PASS for g in r.gates)
    if r.pre_rollout and passing:
        return _enter_stage(r, policy, 0, now, "controller", "pre-rollout hooks answered 2xx")
    if held >= stage.hold and passing and not r.pre_rollout:
        if stage.approval:
            r = _pause(r, now, PauseKind.APPROVAL,
                       f"stage {r.stage} (weight {r.weight}) passed its hold; waiting for "
                       "approval: promote to continue, abort to roll back")
            return _event(r, now, "approval", "waiting for promote")
        if r.stage == len(policy.stages) - 1:
            return _finish_if_done(replace(r, finishing=True), now)
        return _enter_stage(r, policy, r.stage + 1, now, "controller",
                            f"gates passed for {format_duration(held)}")
    if held > policy.progress_deadline:
        blockers = [g for g in r.gates if counts_as(g) is not Verdict.PASS]
        why = "; ".join(_describe(g) for g in blockers) or "gates not evaluated"
        return _roll_back(r, now, f"no progress for {format_duration(policy.progress_deadline)} "
                                  f"at stage {r.stage} (weight {r.weight}): {why}")
    return r
