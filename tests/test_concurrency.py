"""Guarantee 4: many overrides at once on one rollout give one consistent outcome, in the
order the events show."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

from tests.helpers import controller, simple_policy

KINDS = {"pause": "oncall", "resume": "oncall", "promote": "oncall", "abort": "pipeline"}


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
