"""An approval stage has a deadline: waiting longer than the policy's `approval_timeout`
for a promote rolls the rollout back, with a reason that says so."""

from __future__ import annotations

import pytest

from canary.engine import decide
from canary.model import CommandKind, PauseKind, Phase
from tests.clocks import DrivenClock
from tests.helpers import controller, eventually, simple_policy
from tests.test_state_machine import Sim, policy


def to_approval(s: Sim) -> None:
    for _ in range(40):
        if s.r.pause_kind is PauseKind.APPROVAL:
            return
        s.step()
    raise AssertionError(f"never waited for approval: {s.r}")


def test_an_approval_stage_waiting_past_approval_timeout_is_rolled_back():
    s = Sim(policy(approval_timeout=3600.0))
    to_approval(s)
    waiting_since = s.now
    while s.now + 10 < waiting_since + 3600:
        assert s.step().state is Phase.PAUSED
    s.step(20.0)
    assert s.r.state is Phase.ROLLED_BACK and s.r.weight == 0
    assert s.r.reason is not None and "approval timed out" in s.r.reason
    assert "approval_timeout 1h" in s.r.reason and "stage 2 (weight 50)" in s.r.reason


def test_without_approval_timeout_an_approval_waits_however_long_it_takes():
    s = Sim(policy())
    to_approval(s)
    s.step(30 * 24 * 3600.0)
    assert s.r.state is Phase.PAUSED and s.r.pause_kind is PauseKind.APPROVAL


def test_a_promote_before_the_deadline_carries_on():
    s = Sim(policy(approval_timeout=600.0))
    to_approval(s)
    s.step(590.0)
    s.cmd(CommandKind.PROMOTE)
    s.step(20.0)
    assert s.r.state is Phase.PROGRESSING and s.r.stage == 3


def test_time_paused_by_hand_before_approval_does_not_count():
    s = Sim(policy(approval_timeout=600.0))
    to_approval(s)
    assert decide.tick(s.r, s.pol, s.now + 599).state is Phase.PAUSED


@pytest.mark.e2e
async def test_the_controller_rolls_back_an_approval_nobody_gave_on_its_clock(tmp_path):
    pol = simple_policy(hold=1.0, interval=0.5, approval=True, approval_timeout=120.0)
    async with controller(tmp_path, policies=[pol]) as (api, ctl, _t):
        clock = DrivenClock()
        ctl.clock = clock

        async def waiting() -> bool:
            clock.advance(0.5)
            return (await api.rollout(rid))["paused_for"] == "approval"

        rid = (await api.start(canary_version="v2"))["id"]
        await eventually(waiting, what="waiting for approval")
        clock.advance(100.0)
        r = await api.rollout(rid)
        assert r["state"] == "paused", "not before the deadline"

        async def rolled_back() -> dict | None:
            clock.advance(1.0)
            r = await api.rollout(rid)
            return r if r["state"] == "rolled_back" else None

        r = await eventually(rolled_back, what="rolled back at the deadline")
        assert "approval timed out" in r["reason"] and "approval_timeout 2m" in r["reason"]
