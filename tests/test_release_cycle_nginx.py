"""End to end on real nginx and Prometheus: a release pipeline carrying releases through
(interface.md section 5). Services are redeployed on the side the controller names, and
the traffic that really reaches each version is counted after every release."""

from __future__ import annotations

import pytest

from canary.demo.playground import fast_policy
from canary.demo.procs import split
from tests.e2e import file_weight, playground, running, traffic_settles_at
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

FAST = fast_policy("fast", interval="1s", holds=("2s", "2s", "2s", "2s"))
PROBE = {"version_probe": {"path": "/version", "timeout": "1s"}}


async def all_on(pg, version: str, n: int = 40) -> None:
    """Every one of n real requests through nginx is answered by `version` (polled:
    nginx reloads asynchronously)."""
    async def check() -> bool:
        return (await split(pg.url, n)) == {version: n}
    await eventually(check, deadline=20, what=f"all traffic on {version}")


async def target(api) -> dict:
    status, t = await api.call("GET", "/api/v1/targets/web", role="viewer")
    assert status == 200, t
    return t


async def test_two_releases_in_a_row_in_swap_mode_each_end_with_all_traffic_on_the_new_version(
        tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST], target_extra=PROBE) as (api, _):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["state"] == "succeeded", deadline=60)
        await all_on(pg, "v2", 40)
        t = await target(api)
        assert (t["serving"], t["deploy_to"]) == ("canary", "stable")
        assert t["runs"] == {"stable": "v1", "canary": "v2"}
        # the pipeline deploys v3 where the controller says, then starts it: the stable
        # version (v2) is inferred, and the start checks what each side runs
        await pg.redeploy(t["deploy_to"], "v3")
        r = await api.start(canary_version="v3")
        assert (r["stable_version"], r["to_side"]) == ("v2", "stable")
        await api.until(r["id"], lambda x: x["applied_weight"] == 25)
        await traffic_settles_at(pg, 75)  # (the share of the configured canary side: v2)
        await api.until(r["id"], lambda x: x["state"] == "succeeded", deadline=60)
        await all_on(pg, "v3", 40)
        assert file_weight(pg) == 0, "the stable side carries everything again"
        t = await target(api)
        assert (t["serving"], t["deploy_to"]) == ("stable", "canary")
        assert t["runs"] == {"stable": "v3", "canary": "v2"}


async def test_return_mode_hands_the_release_back_to_the_stable_side(tmp_path):
    async with playground(tmp_path) as pg, running(
            pg, [FAST], target_extra={"promotion": "return"}) as (api, _):
        r = await api.start(canary_version="v2")
        r = await api.until(r["id"], lambda x: x["state"] == "promoting", deadline=60)
        await all_on(pg, "v2", 20)  # at 100% the canary side serves
        await pg.redeploy("stable", "v2")
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/handover",
                                      {"reason": "v2 deployed on the stable side"},
                                      role="pipeline")
        assert status == 200, data
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
        assert file_weight(pg) == 0

        async def canary_side_idle() -> bool:  # (nginx reloads asynchronously)
            before = pg.canary.served.get("v2", 0)
            got = await split(pg.url, 40)
            return got == {"v2": 40} and pg.canary.served.get("v2", 0) == before
        assert await eventually(canary_side_idle, deadline=20, what="canary side at 0%")
        t = await target(api)
        assert (t["serving"], t["deploy_to"], t["live_weight"]) == ("stable", "canary", 0)


async def test_a_start_is_refused_when_a_side_does_not_run_the_expected_version(tmp_path):
    async with playground(tmp_path) as pg, running(pg, [FAST], target_extra=PROBE) as (api, _):
        status, data = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v3"},
                                      role="pipeline")
        assert status == 400, data
        assert f"127.0.0.1:{pg.canary.port} answered 'v2'" in data["error"]
        assert "canary side must run v3" in data["error"]
        await all_on(pg, "v1", 20)  # no traffic moved


async def test_a_rollback_during_promoting_returns_all_traffic_to_the_old_version(tmp_path):
    async with playground(tmp_path) as pg, running(
            pg, [FAST], target_extra={"promotion": "return", **PROBE}) as (api, _):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["state"] == "promoting", deadline=60)
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort",
                                      {"reason": "customer reports"}, role="pipeline")
        assert status == 200, data
        await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        await traffic_settles_at(pg, 0, tolerance=0)
        await all_on(pg, "v1", 40)
        t = await target(api)
        assert (t["serving"], t["runs"]["stable"]) == ("stable", "v1")
