"""Guarantee 4: many overrides at once on one rollout give one consistent outcome, in the
order the events show."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

from tests.helpers import controller, simple_policy

KINDS = {"pause": "oncall", "resume": "oncall", "promote": "oncall", "abort": "pipeline"}


@pytest.mark.e2e
@pytest.mark.parametrize("seed", range(4))
async def test_racing_overrides_give_one_consistent_outcome(tmp_path, seed):
    rng = random.Random(seed)
    burst = [rng.choice(list(KINDS)) for _ in range(24)] + ["pause", "pause", "abort", "resume"]
    rng.shuffle(burst)
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        results = await asyncio.gather(*(
            api.call("POST", f"/api/v1/rollouts/{rid}/{kind}", {"reason": f"#{i} {kind}"},
                     role=KINDS[kind]) for i, kind in enumerate(burst)))
        assert {status for status, _ in results} <= {200, 409}, results
        accepted = [(kind, data) for kind, (status, data) in zip(burst, results, strict=True)
                    if status == 200]
        r = await api.until(rid, lambda r: r["state"] in ("rolled_back", "succeeded"))
    overrides = [e for e in r["events"] if e["actor"] != "controller" and e["type"] in KINDS]
    assert collections.Counter(e["type"] for e in overrides) == collections.Counter(
        kind for kind, _ in accepted), "every accepted call is one event, and only those"
    # replay the events: each was legal in the state the ones before it left
    paused, done = False, False
    for e in overrides:
        assert not done, f"an override after the rollout ended: {e}"
        if e["type"] == "pause":
            assert not paused, "two pauses without a resume between"
            paused = True
        elif e["type"] == "resume":
            assert paused, "resume of a rollout that was not paused"
            paused = False
        elif e["type"] == "promote":
            paused = False
        elif e["type"] == "abort":
            done = True
    # the abort in the burst is accepted unless a promote to 100% ended the rollout first
    assert done == (r["state"] == "rolled_back")
    assert [k for k, _ in accepted].count("abort") <= 1


async def test_a_rollout_task_woken_as_it_is_cancelled_still_stops():
    # Python 3.11's wait_for returns the result instead of raising when the cancellation
    # and the wakeup land together; a rollout task that lost its cancellation that way
    # kept the controller's shutdown waiting for ever (a hung test found it)
    from canary.clock import RealClock

    wakeup = asyncio.Event()
    task = asyncio.create_task(RealClock().sleep(3600, wakeup))
    await asyncio.sleep(0)  # the task is now waiting
    wakeup.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled()


async def test_stopping_the_controller_ends_every_rollout_task(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"reason": "x"})
        assert status == 200
        await asyncio.wait_for(ctl.stop(), 15)
        assert ctl.running() == 0
