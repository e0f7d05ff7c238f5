"""The pure state machine, on a clock the test drives: every rule of a rollout's life."""

from __future__ import annotations

from dataclasses import replace

import pytest

from canary.engine import decide
from canary.errors import Conflict
from canary.gates.kinds import ThresholdGate
from canary.model import (
    Command,
    CommandKind,
    PauseKind,
    Phase,
    Reading,
    Readings,
    Rollout,
    Verdict,
)
from canary.policy import NoData, Policy
from canary.stages import Stage

ERR = ThresholdGate(name="error-rate", query="q_err", max=0.01)
LAT = ThresholdGate(name="p99", query="q_lat", max=0.5)


def policy(**kw: object) -> Policy:
    base: dict[str, object] = dict(
        name="p", interval=10.0, failure_limit=2, no_data=NoData.HOLD, progress_deadline=600.0,
        stages=(Stage(5, 60.0), Stage(25, 60.0), Stage(50, 60.0, approval=True,
                                                    gates=(ThresholdGate("p99", "q_lat", max=0.3),)),
                Stage(100, 60.0)),
        gates=(ERR, LAT))
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


class Sim:
    """A rollout and a clock; the router applies whatever is asked at once."""

    def __init__(self, pol: Policy | None = None) -> None:
        self.pol = pol or policy()
        self.router_works = True
        self.now = 1000.0
        self.r = decide.start(rollout_id="r1", target="web", policy=self.pol, canary_version="v2",
                              stable_version="v1", now=self.now, actor="pipeline")
        self.apply()

    def apply(self) -> None:
        if self.router_works and self.r.weight != self.r.applied_weight:
            self.r = decide.applied(self.r, self.r.weight, self.now)

    def read(self, **values: float | str | None) -> None:
        items = []
        for g in self.pol.gates_for(self.r.stage):
            v = values.get(g.name.replace("-", "_"), 0.0)
            if v == "error":
                items.append(Reading(g.name, Verdict.ERROR, detail="down"))
            elif v is None:
                items.append(Reading(g.name, Verdict.NO_DATA))
            else:
                assert isinstance(v, float)
                bad = (g.max is not None and v > g.max) or (g.min is not None and v < g.min)
                items.append(Reading(g.name, Verdict.FAIL if bad else Verdict.PASS, value=v))
        self.r = decide.readings(self.r, self.pol, Readings(self.now, self.r.stage, tuple(items)),
                                 self.now)

    def step(self, seconds: float = 10.0, **values: float | str | None) -> Rollout:
        """One interval: time passes, gates are read, time rules run, weights applied."""
        self.now += seconds
        self.read(**values)
        self.r = decide.tick(self.r, self.pol, self.now)
        self.apply()
        return self.r

    def cmd(self, kind: CommandKind, *, full: bool = False, actor: str = "alice") -> Rollout:
        self.r = decide.command(self.r, self.pol, Command(kind, actor, "because", full), self.now)
        self.apply()
        return self.r


def test_start_asks_for_first_stage_weight():
    s = Sim()
    assert s.r.state is Phase.PROGRESSING
    assert (s.r.stage, s.r.weight, s.r.applied_weight) == (0, 5, 5)
    assert s.r.events[0].type == "start" and s.r.events[0].actor == "pipeline"


def test_stage_advances_only_after_its_hold_with_passing_gates():
    s = Sim()
    for _ in range(5):
        assert s.step().stage == 0
    assert s.step().stage == 1  # 60 s held
    assert s.r.weight == 25


def test_healthy_rollout_waits_for_approval_then_succeeds_after_promote():
    s = Sim()
    while s.r.state is Phase.PROGRESSING:
        s.step()
    assert s.r.state is Phase.PAUSED and s.r.pause_kind is PauseKind.APPROVAL
    assert s.r.stage == 2 and "approval" in (s.r.reason or "")
    for _ in range(20):
        s.step()
    assert s.r.state is Phase.PAUSED and s.r.stage == 2, "approval waits however long it takes"
    s.cmd(CommandKind.PROMOTE)
    assert (s.r.stage, s.r.weight, s.r.state) == (3, 100, Phase.PROGRESSING)
    while not s.r.state.final:
        s.step()
    assert s.r.state is Phase.SUCCEEDED and s.r.weight == 100


def test_consecutive_failures_roll_back_at_failure_limit_naming_gate_value_and_bound():
    s = Sim()
    s.step(error_rate=0.05)
    assert s.r.state is Phase.PROGRESSING and s.r.gates[0].failures == 1
    s.step(error_rate=0.07)
    assert s.r.state is Phase.ROLLED_BACK and s.r.weight == 0 and s.r.applied_weight == 0
    assert "error-rate" in s.r.reason and "0.07" in s.r.reason and "max 0.01" in s.r.reason


def test_a_pass_between_failures_resets_the_count():
    s = Sim(policy(stages=(Stage(5, 1000.0), Stage(100, 10.0)), progress_deadline=2000.0))
    for _ in range(10):
        s.step(error_rate=0.05)
        s.step(error_rate=0.0)
    assert s.r.state is Phase.PROGRESSING


def test_stage_gate_tightens_a_policy_wide_bound():
    s = Sim()
    while s.r.stage < 2:
        s.step()
    s.step(p99=0.4)  # passes the policy-wide 0.5, fails stage 2's 0.3
    s.step(p99=0.4)
    assert s.r.state is Phase.ROLLED_BACK and "p99" in s.r.reason


@pytest.mark.parametrize("no_data,expect", [(NoData.HOLD, Phase.PROGRESSING),
                                            (NoData.FAIL, Phase.ROLLED_BACK)])
def test_no_data_counts_as_the_policy_says(no_data, expect):
    s = Sim(policy(no_data=no_data))
    for _ in range(10):
        s.step(error_rate=None)
    assert s.r.state is expect
    if expect is Phase.PROGRESSING:
        assert s.r.stage == 0, "missing data never promotes"


def test_no_data_pass_promotes_but_a_query_error_never_passes():
    s = Sim(policy(no_data=NoData.PASS))
    for _ in range(7):
        s.step(error_rate=None)
    assert s.r.stage == 1
    s = Sim(policy(no_data=NoData.PASS))
    for _ in range(20):
        s.step(error_rate="error")
    assert s.r.stage == 0 and s.r.state is Phase.PROGRESSING


def test_progress_deadline_rolls_back_a_rollout_that_cannot_progress():
    s = Sim(policy(progress_deadline=120.0))
    for _ in range(12):
        s.step(error_rate=None)
    assert s.r.state is Phase.PROGRESSING
    s.step(error_rate=None)
    assert s.r.state is Phase.ROLLED_BACK
    assert "no progress" in s.r.reason and "error-rate" in s.r.reason


def test_pause_holds_weight_and_judges_nothing():
    s = Sim()
    s.cmd(CommandKind.PAUSE)
    for _ in range(100):
        s.step(error_rate=0.5)
    assert (s.r.state, s.r.stage, s.r.weight) == (Phase.PAUSED, 0, 5)
    assert "alice" in s.r.reason


def test_resume_continues_the_hold_where_it_stopped():
    s = Sim()
    for _ in range(3):
        s.step()  # 30 of 60 s held
    s.cmd(CommandKind.PAUSE)
    s.now += 5000
    s.cmd(CommandKind.RESUME)
    assert s.step().stage == 0 and s.step().stage == 0
    assert s.step().stage == 1


def test_promote_skips_the_hold_and_full_goes_to_100_and_succeeds():
    s = Sim()
    assert s.cmd(CommandKind.PROMOTE).stage == 1
    s.cmd(CommandKind.PROMOTE, full=True)
    assert s.r.state is Phase.SUCCEEDED and s.r.weight == 100
    assert [e.type for e in s.r.events][-2:] == ["promote", "succeeded"]


def test_abort_rolls_back_at_once_and_final_states_refuse_overrides():
    s = Sim()
    s.step()
    s.cmd(CommandKind.ABORT, actor="pipeline")
    assert s.r.state is Phase.ROLLED_BACK and s.r.weight == 0
    assert "pipeline" in s.r.reason
    for kind in CommandKind:
        with pytest.raises(Conflict):
            s.cmd(kind)


def test_rollback_is_not_final_until_the_router_carries_weight_0():
    s = Sim()
    s.r = decide.command(s.r, s.pol, Command(CommandKind.ABORT, "bob", "bad"), s.now)
    assert s.r.state is Phase.ROLLING_BACK and s.r.weight == 0
    s.r = decide.apply_failed(s.r, s.pol, "reload failed", s.now)
    assert s.r.state is Phase.ROLLING_BACK and "reload failed" in s.r.reason
    s.r = decide.tick(s.r, s.pol, s.now + 100)
    assert s.r.state is Phase.ROLLING_BACK
    s.r = decide.applied(s.r, 0, s.now + 101)
    assert s.r.state is Phase.ROLLED_BACK


def test_conflicting_overrides_are_refused_with_a_reason():
    s = Sim()
    with pytest.raises(Conflict, match="not paused"):
        s.cmd(CommandKind.RESUME)
    s.cmd(CommandKind.PAUSE)
    with pytest.raises(Conflict, match="already paused"):
        s.cmd(CommandKind.PAUSE)
    while s.r.state is not Phase.PAUSED or s.r.pause_kind is not PauseKind.APPROVAL:
        if s.r.state is Phase.PAUSED and s.r.pause_kind is PauseKind.MANUAL:
            s.cmd(CommandKind.RESUME)
        s.step()
    with pytest.raises(Conflict, match="approval"):
        s.cmd(CommandKind.RESUME)


def test_failed_apply_pauses_at_the_weight_still_in_force():
    s = Sim()
    s.router_works = False
    for _ in range(6):
        s.step()
    assert s.r.stage == 1 and s.r.weight == 25 and s.r.applied_weight == 5  # apply pending
    s.r = decide.apply_failed(s.r, s.pol, "nginx test failed: bad config", s.now)
    assert (s.r.state, s.r.pause_kind, s.r.weight) == (Phase.PAUSED, PauseKind.ROUTER, 5)
    assert "nginx test failed" in s.r.reason and "weight 5 stays" in s.r.reason
    for _ in range(10):
        s.step()
    assert (s.r.state, s.r.weight) == (Phase.PAUSED, 5)
    events = len(s.r.events)
    s.r = decide.apply_failed(s.r, s.pol, "nginx test failed: bad config", s.now)
    assert len(s.r.events) == events, "the same failure again is not a new event"
    s.router_works = True
    s.cmd(CommandKind.RESUME)
    assert s.r.weight == 25 and s.r.applied_weight == 25 and s.r.stage == 1


def test_a_router_that_recovers_lets_the_rollout_continue_by_itself():
    s = Sim()
    s.router_works = False
    for _ in range(6):
        s.step()
    s.r = decide.apply_failed(s.r, s.pol, "reload failed", s.now)
    assert s.r.state is Phase.PAUSED and s.r.weight == 5
    s.now += 30
    s.r = decide.router_recovered(s.r, s.pol, 25, s.now)
    assert (s.r.state, s.r.stage, s.r.weight, s.r.applied_weight) == (Phase.PROGRESSING, 1, 25, 25)
    assert s.r.stage_since == s.now and s.r.events[-1].type == "router_recovered"


def test_drift_pauses_and_says_what_it_found_and_expected():
    s = Sim()
    s.r = decide.observed(s.r, 40, s.now)
    assert s.r.state is Phase.PAUSED and s.r.pause_kind is PauseKind.DRIFT
    assert "40" in s.r.reason and "expected 5" in s.r.reason
    assert s.r.events[-1].type == "drift"
    s.cmd(CommandKind.RESUME)
    assert s.r.applied_weight == 5, "resume re-applies the rollout's own weight"


def test_a_write_that_landed_before_a_crash_is_not_drift():
    s = Sim()
    s.r = replace(s.r, weight=25, stage=1, applied_weight=5, stage_since=None)
    s.r = decide.observed(s.r, 25, s.now)
    assert s.r.state is Phase.PROGRESSING and s.r.applied_weight == 25


def test_readings_taken_before_a_stage_was_in_force_are_ignored():
    s = Sim()
    old = Readings(s.now - 1, 0, (Reading("error-rate", Verdict.FAIL, value=1.0),
                                  Reading("p99", Verdict.FAIL, value=9.0)))
    s.r = decide.readings(s.r, s.pol, old, s.now)
    s.r = decide.readings(s.r, s.pol, old, s.now)
    assert s.r.state is Phase.PROGRESSING and all(g.failures == 0 for g in s.r.gates)


def test_a_long_rollout_keeps_its_beginning_and_its_latest_events_and_says_what_it_dropped():
    sim = Sim()
    first = sim.r.events[0]
    made = len(sim.r.events)
    for i in range(1200):  # an on-call engineer pausing and resuming all night
        before = len(sim.r.events)
        sim.cmd(CommandKind.PAUSE if i % 2 == 0 else CommandKind.RESUME)
        made += max(1, len(sim.r.events) - before)
    events = sim.r.events
    assert len(events) == decide.MAX_EVENTS
    assert events[0] == first and first.actor == "pipeline", "who started it is kept"
    marks = [e for e in events if e.type == "trimmed"]
    assert len(marks) == 1 and events[decide.FIRST_EVENTS] == marks[0]
    dropped = int(marks[0].message.split()[0])
    assert dropped == made - (decide.MAX_EVENTS - 1), "every event is kept or counted"
    assert events[-1].type == "resume" and events[-1].at == sim.now
