"""End to end on real nginx and Prometheus: where requests really go at each step of a
rollout, and what the controller does when the canary, nginx or Prometheus misbehave."""

from __future__ import annotations

import asyncio

import pytest

from canary.demo.playground import fast_policy, sequential_policy
from canary.demo.procs import split
from tests.e2e import (
    canary_share,
    file_weight,
    gate_verdicts,
    playground,
    running,
    traffic_settles_at,
)
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

FAST = fast_policy("fast", interval="1s", holds=("3s", "3s", "3s", "2s"))


async def steady(api, rid, seconds: float, **expect):
    """The rollout keeps `expect` for `seconds` (a negative check needs time to pass)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        r = await api.rollout(rid)
        for k, v in expect.items():
            assert r[k] == v, (k, r)
        await asyncio.sleep(0.2)


async def test_healthy_canary_is_promoted_through_every_stage_and_traffic_follows(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, load):
        rid = (await api.start(canary_version="v2", stable_version="v1"))["id"]
        seen = {}
        for weight in (5, 25, 50, 100):
            await api.until(rid, lambda r, w=weight: r["applied_weight"] == w, what=f"weight {weight}")
            seen[weight] = await traffic_settles_at(pg, weight)
        r = await api.until(rid, lambda r: r["state"] == "succeeded")
        assert [e["message"].split(" (")[0] for e in r["events"] if e["type"] == "stage"] == [
            "stage 1: weight 25", "stage 2: weight 50", "stage 3: weight 100"]
        assert await canary_share(pg) == 1.0
        assert file_weight(pg) == 100
        assert load.codes[("v2", 500)] == 0 and load.versions["v2"] > 0


# serial: 'none after the rollback' counts the load's answers for a second after the split
# settles; a request in flight on a worker slowed by another test's load lands late
@pytest.mark.serial
async def test_canary_failing_requests_is_rolled_back_by_the_error_rate_gate(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 25)
        pg.canary.error_rate = 0.5
        r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=60)
        assert "error-rate" in r["reason"] and "above max 0.05" in r["reason"]
        assert r["weight"] == 0
        # rolled back at the failure_limit-th failing evaluation, not later
        assert await gate_verdicts(api, "error-rate", "fail") == 2
        await traffic_settles_at(pg, 0, tolerance=0)
        assert file_weight(pg) == 0
        failed = load.codes[("v2", 500)]
        assert failed > 0, "the breach was real: clients saw the canary's errors"
        await asyncio.sleep(1)
        assert load.codes[("v2", 500)] == failed, "and none after the rollback"


async def test_slow_canary_is_rolled_back_by_the_latency_gate(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 25)
        pg.canary.latency = 0.4
        r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=60)
        assert "p99-latency" in r["reason"] and "above max 0.25" in r["reason"]
        assert await gate_verdicts(api, "p99-latency", "fail") == 2
        await traffic_settles_at(pg, 0, tolerance=0)


async def test_pause_holds_the_weight_and_resume_finishes(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 25)
        status, r = await api.call("POST", f"/api/v1/rollouts/{rid}/pause",
                                   {"reason": "watching a dashboard"})
        assert status == 200 and r["state"] == "paused"
        await steady(api, rid, 6, state="paused", stage=1, weight=25)  # two holds' time
        await traffic_settles_at(pg, 25)
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/resume", {"reason": "fine"})
        assert status == 200
        await api.until(rid, lambda r: r["state"] == "succeeded", deadline=60)


async def test_promote_skips_a_hold_and_full_goes_straight_to_100(tmp_path):
    slow = fast_policy("slow", interval="1s", holds=("10m",) * 4, progress_deadline="1h")
    async with playground(tmp_path) as pg, running(pg, [slow]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 5)
        status, r = await api.call("POST", f"/api/v1/rollouts/{rid}/promote", {"reason": "ok"})
        assert status == 200 and r["stage"] == 1 and r["weight"] == 25
        await traffic_settles_at(pg, 25)
        status, r = await api.call("POST", f"/api/v1/rollouts/{rid}/promote",
                                   {"reason": "ship it", "full": True})
        assert status == 200
        await api.until(rid, lambda r: r["state"] == "succeeded")
        await traffic_settles_at(pg, 100, tolerance=0)


async def test_approval_stage_waits_for_promote(tmp_path):
    pol = fast_policy("gated", interval="1s", holds=("2s",) * 4, approval_at=2)
    async with playground(tmp_path) as pg, running(pg, [pol]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        r = await api.until(rid, lambda r: r["state"] == "paused", deadline=60)
        assert r["stage"] == 2 and r["weight"] == 50 and r["paused_for"] == "approval"
        assert "promote" in r["reason"]
        await steady(api, rid, 4, state="paused", stage=2)
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/resume", {"reason": "go"})
        assert status == 409 and "approval" in data["error"]
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/promote", {"reason": "approved"})
        assert status == 200
        await api.until(rid, lambda r: r["state"] == "succeeded", deadline=60)


async def test_abort_returns_all_traffic_to_stable(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 50, deadline=60)
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                   {"reason": "customer reports"}, role="pipeline")
        assert status == 200
        r = await api.until(rid, lambda r: r["state"] == "rolled_back")
        assert "customer reports" in r["reason"]
        await traffic_settles_at(pg, 0, tolerance=0)


async def test_failing_nginx_test_keeps_the_old_upstream_and_pauses_with_the_reason(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 5)
        broken = pg.nginx.dir / "conf.d" / "broken.conf"
        broken.write_text("this is not nginx syntax;\n")
        r = await api.until(rid, lambda r: r["state"] == "paused", deadline=30)
        assert r["paused_for"] == "router" and "nginx test failed" in r["reason"]
        assert "broken.conf" in r["reason"], "nginx's own words say what is wrong"
        assert r["weight"] == 5 and file_weight(pg) == 5
        await traffic_settles_at(pg, 5)
        broken.unlink()
        # retried with backoff: once nginx accepts the config again the rollout goes on
        r = await api.until(rid, lambda r: r["state"] == "succeeded", deadline=60)
        assert "router_recovered" in [e["type"] for e in r["events"]]


async def test_prometheus_down_means_no_promotion_until_it_is_back(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 25)
        pg.prometheus.stop()
        try:
            await api.until(rid, lambda r: all(g["status"] == "error" for g in r["gates"]))
            before = await gate_verdicts(api, "error-rate", "error")
            await eventually(lambda: _more(api, before + 4), what="four more evaluations")
            r = await api.rollout(rid)
            assert (r["state"], r["stage"], r["weight"]) == ("progressing", 1, 25)
            assert "prometheus query failed" in r["gates"][0]["detail"]
        finally:
            pg.prometheus.start()
        await pg.prometheus.ready()
        await api.until(rid, lambda r: r["state"] == "succeeded", deadline=90)


async def _more(api, n):
    return await gate_verdicts(api, "error-rate", "error") >= n


async def test_sequential_gate_promotes_a_healthy_canary_and_rolls_back_a_failing_one(tmp_path):
    policy = sequential_policy(alpha=0.01, detect_rate=0.05, final_gross=5)
    async with playground(tmp_path) as pg, running(pg, [policy], rate=40) as (api, load):
        rid = (await api.start(canary_version="v2", stable_version="v1"))["id"]
        r = await api.until(rid, lambda r: r["state"] == "succeeded", deadline=120)
        assert r["gates"][0]["status"] == "pass"
        # the pipeline deploys v3 where the controller says: after a swap, the idle
        # stable side (v2 now serves from the canary side)
        bad = await pg.redeploy("stable", "v3")
        bad.error_rate = 0.3
        rid = (await api.start(canary_version="v3", stable_version="v2"))["id"]
        r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=60)
        assert "gate errors" in r["reason"] and "above stable's" in r["reason"]
        assert r["stage"] == 0, "caught at the first stage"

        async def all_on_v2() -> bool:
            return (await split(pg.url, 40)) == {"v2": 40}
        await eventually(all_on_v2, deadline=20, what="all traffic back on v2")
        assert load.codes[("v3", 500)] > 0


async def test_sequential_gate_reads_counter_queries_per_series_from_prometheus(tmp_path):
    # the counters written without sum(): each series read on its own (so a pod restart
    # resets only its own count), the readings the same rollout as with sum()
    policy = sequential_policy(alpha=0.01, detect_rate=0.05, final_gross=5)
    for g in policy["gates"]:
        for key in ("requests", "errors"):
            g[key] = g[key].replace("sum(http_requests_total", "(http_requests_total")
    async with playground(tmp_path) as pg, running(pg, [policy], rate=40) as (api, _load):
        rid = (await api.start(canary_version="v2", stable_version="v1"))["id"]
        r = await api.until(rid, lambda r: r["state"] == "succeeded", deadline=120)
        assert r["gates"][0]["status"] == "pass"
        assert "shown no worse" in r["gates"][0]["detail"] or r["stage"] == 2


async def test_weights_changed_outside_canary_are_drift_not_a_fight(tmp_path):
    from canary.routers.nginx import render

    slow = fast_policy("slow", interval="1s", holds=("10m",) * 4, progress_deadline="1h")
    async with playground(tmp_path) as pg, running(pg, [slow]) as (api, _load):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 5)
        # someone edits the upstream by hand and reloads nginx
        pg.nginx.upstream_file.write_text(render(pg.target(), 40))
        import subprocess

        subprocess.run(pg.nginx.reload_cmd, check=True, capture_output=True)
        r = await api.until(rid, lambda r: r["state"] == "paused")
        assert r["paused_for"] == "drift"
        assert "router carries canary weight 40, expected 5" in r["reason"]
        assert any(e["type"] == "drift" for e in r["events"])
        await steady(api, rid, 3, state="paused")
        assert file_weight(pg) == 40, "canary does not fight the change"
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/resume",
                                   {"reason": "that was a test; carry on"})
        assert status == 200
        await api.until(rid, lambda r: r["state"] == "progressing" and r["applied_weight"] == 5)
        assert file_weight(pg) == 5
        await traffic_settles_at(pg, 5)
