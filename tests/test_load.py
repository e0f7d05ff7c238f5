"""Guarantee 7, the behaviour half: one controller runs 200 rollouts at once while the API
serves reads and aborts; every rollout keeps being evaluated and every abort lands. The
timing half (lateness, abort latency) is bench/load.py, recorded in docs/guarantees.md."""

from __future__ import annotations

import logging

import pytest

from bench.load import run

pytestmark = [pytest.mark.e2e, pytest.mark.serial]


async def test_two_hundred_concurrent_rollouts_progress_and_every_abort_lands():
    logging.disable(logging.WARNING)
    try:
        # holds long enough that every abort meets a rollout still in flight; after the
        # 12 s of reads and aborts, it runs on until every rollout reached its third stage
        # (or finished) - a busy CI machine gets there later, not differently
        result = await run(200, interval=1.0, duration=12.0, aborts=10, hold=6.0, reads_per_s=20,
                           wait_stage=2)
    finally:
        logging.disable(logging.NOTSET)
    states = result["states"]
    assert sum(states.values()) == 200
    accepted = result["aborts_accepted"]
    assert accepted >= 5, result  # (an abort that meets a finished rollout is a 409)
    assert states.get("rolled_back") == accepted == result["abort_to_weight0_ms"]["n"]
    assert set(states) <= {"progressing", "succeeded", "rolled_back"}
    healthy = 200 - accepted
    assert sum(n for stage, n in result["stages"].items() if stage >= 2) >= healthy, \
        "every healthy rollout moves through its stages"
    assert result["evaluations"] >= 200 * 4, "every rollout is evaluated again and again"
    # reads are answered throughout (how fast is bench/load.py's business, not a test's)
    assert result["read_latency_ms"]["n"] >= 10 and result["reads_failed"] == 0


async def test_identical_queries_across_rollouts_are_sent_once_per_window():
    import asyncio

    from canary.errors import MetricsError
    from canary.gates.prometheus import CoalescingSource

    class Counting:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.fail = False

        async def query(self, promql: str) -> float | None:
            self.calls.append(promql)
            await asyncio.sleep(0.01)
            if self.fail:
                raise MetricsError("down")
            return float(len(promql))

    now = [0.0]
    inner = Counting()
    source = CoalescingSource(inner, window=1.0, clock=lambda: now[0])
    got = await asyncio.gather(*(source.query("up") for _ in range(50)),
                               source.query("down"))
    assert got == [2.0] * 50 + [4.0] and inner.calls == ["up", "down"]
    now[0] = 1.5  # the next tick asks again
    inner.fail = True
    results = await asyncio.gather(source.query("up"), source.query("up"),
                                   return_exceptions=True)
    assert all(isinstance(r, MetricsError) for r in results), "every waiter sees the error"
    assert inner.calls == ["up", "down", "up"]
