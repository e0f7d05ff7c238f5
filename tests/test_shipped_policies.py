"""The policies canary ships (policies/*.yaml), each run whole - every gate of every
stage, threshold, compare and `errors` alike - through the controller's state machine on
simulated traffic (bench/verdicts/policies.py: 0.5% errors on both versions, a latency
histogram, 15 s scrapes, fixed seeds)."""

from __future__ import annotations

import pytest

from bench.verdicts.policies import CASES, run, shipped, summary

POLICIES = {p.name: p for p in shipped()}
HEALTHY, STABLE_GONE, X5, _X2, SHARE = CASES


def test_every_shipped_policy_is_run_here():
    assert set(POLICIES) == {"cautious", "fast", "sequential", "standard"}


@pytest.mark.e2e
@pytest.mark.parametrize("rps", [20, 200])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_shipped_policy_promotes_healthy_canaries_even_when_stable_is_gone_at_100(
        name, rps):
    # stable's series vanish at 100% (scaled to zero after hand-over, or by an
    # autoscaler): a comparison with it is not judged there, an errors gate passes on
    # the stages before - no healthy rollout waits for the deadline at full traffic
    s = summary(run(POLICIES[name], STABLE_GONE, rps, seed) for seed in range(200))
    assert s["promoted"] >= 0.99, (name, rps, s)


@pytest.mark.e2e
@pytest.mark.parametrize("rps", [20, 200])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_shipped_policy_rolls_back_a_canary_with_five_times_the_errors(name, rps):
    s = summary(run(POLICIES[name], X5, rps, seed) for seed in range(40))
    assert s["rolled_back"] >= 0.9, (name, rps, s)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["cautious", "sequential"])
def test_a_canary_that_gets_a_tenth_of_its_weight_is_never_promoted(name):
    # its errors gates see the canary serving far less than its weight and hold, saying
    # so, until the progress deadline rolls the rollout back
    s = summary(run(POLICIES[name], SHARE, 200, seed) for seed in range(20))
    assert s["promoted"] == 0 and s["reached_50"] == 0, s
