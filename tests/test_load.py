"""Guarantee 7, the behaviour half: one controller runs 200 rollouts at once while the API
serves reads and aborts; every rollout keeps being evaluated and every abort lands. The
timing half (lateness, abort latency) is bench/load.py, recorded in docs/guarantees.md."""

from __future__ import annotations

import logging

import pytest

from bench.load import run

pytestmark = pytest.mark.e2e


async def test_two_hundred_concurrent_rollouts_progress_and_every_abort_lands():
    logging.disable(logging.WARNING)
    try:
        # holds long enough that every abort meets a rollout still in flight
        result = await run(200, interval=1.0, duration=12.0, aborts=10, hold=6.0, reads_per_s=20)
    finally:
        logging.disable(logging.NOTSET)
    states = result["states"]
    assert sum(states.values()) == 200
    accepted = result["aborts_accepted"]
    assert accepted >= 5, result  # (an abort that meets a finished rollout is a 409)
    assert states.get("rolled_back") == accepted == result["abort_to_weight0_ms"]["n"]
    assert set(states) <= {"progressing", "succeeded", "rolled_back"}
    assert sum(n for stage, n in result["stages"].items() if stage >= 2) >= 150, \
        "healthy rollouts move through their stages"
    assert result["evaluations"] >= 200 * 4, "every rollout is evaluated again and again"
    assert result["read_latency_ms"]["n"] > 50
