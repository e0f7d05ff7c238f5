"""The HTTP API as the pipeline and on-call use it: roles, validation, conflicts, and that a
refused request changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import TOKENS, SetSource, controller, eventually, simple_policy


async def snapshot(api, target):
    status, data = await api.call("GET", "/api/v1/rollouts", role="viewer")
    assert status == 200 and data["next"] is None
    # a listing leaves events out: each rollout's own answer has them
    data["rollouts"] = [await api.rollout(r["id"]) for r in data["rollouts"]]
    text = target.file.read_text() if target.file.exists() else None
    return data, text


async def test_health_readiness_and_metrics_need_no_token_and_leak_nothing(tmp_path):
    async with controller(tmp_path) as (api, _ctl, _t):
        assert (await api.call("GET", "/healthz", role=None))[0] == 200
        status, data = await api.call("GET", "/readyz", role=None)
        assert status == 200 and data["status"] == "ready"
        await api.start(canary_version="v2")
        status, text = await api.call("GET", "/metrics", role=None)
        assert status == 200
        assert 'canary_rollouts_started_total{target="web"} 1.0' in text
        assert "tok-" not in text and "sha256" not in text


@pytest.mark.parametrize("method,path,body,role,token,status", [
    ("GET", "/api/v1/rollouts", None, None, None, 401),
    ("GET", "/api/v1/rollouts", None, None, "not-a-token", 401),
    ("POST", "/api/v1/rollouts", {"target": "web", "canary_version": "v2"}, "viewer", None, 403),
    ("GET", "/api/v1/targets", None, None, None, 401),
])
async def test_unknown_or_weak_tokens_are_refused(tmp_path, method, path, body, role, token, status):
    async with controller(tmp_path) as (api, _ctl, target):
        before = await snapshot(api, target)
        got, data = await api.call(method, path, body, role=role, token=token)
        assert got == status and "error" in data
        assert await snapshot(api, target) == before


async def test_roles_viewer_reads_pipeline_starts_and_aborts_oncall_overrides(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, _target):
        for path in ("/api/v1/targets", "/api/v1/policies", "/api/v1/rollouts"):
            assert (await api.call("GET", path, role="viewer"))[0] == 200
        r = await api.start(canary_version="v2")
        for kind in ("pause", "resume", "promote"):
            status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/{kind}",
                                          {"reason": "x"}, role="pipeline")
            assert status == 403, data
            assert "oncall" in data["error"]
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort",
                                      {"reason": "bad build"}, role="pipeline")
        assert status == 200 and data["state"] in ("rolling_back", "rolled_back")


@pytest.mark.parametrize("body,raw,status,words", [
    (None, b"{not json", 400, "not valid JSON"),
    (None, b"[1, 2]", 400, "JSON object"),
    ({"target": "web"}, None, 400, "canary_version: required"),
    ({"target": "web", "canary_version": 2}, None, 400, "canary_version: must be a string"),
    ({"target": "web", "canary_version": "v2", "colour": "red"}, None, 400, "colour: unknown field"),
    ({"target": "web", "canary_version": 'v2"} or vector(1)'}, None, 400, "canary_version"),
    ({"target": "web", "canary_version": "v1"}, None, 400, "both 'v1'"),
    ({"target": "nope", "canary_version": "v2"}, None, 404, "no target named 'nope'"),
    ({"target": "web", "canary_version": "v2", "policy": "nope"}, None, 404, "no policy named"),
    # (an empty policy used to start with the target's own, as if it were left out)
    ({"target": "web", "canary_version": "v2", "policy": ""}, None, 400,
     "policy: must name a policy"),
    (None, b'{"target": "web", "canary_version": "' + b"x" * 70000 + b'"}', 413, "larger than"),
])
async def test_bad_start_requests_get_a_clear_4xx_and_change_nothing(tmp_path, body, raw, status, words):
    async with controller(tmp_path) as (api, _ctl, target):
        before = await snapshot(api, target)
        got, data = await api.call("POST", "/api/v1/rollouts", body, role="pipeline", raw=raw)
        assert got == status, data
        assert words in data["error"]
        assert await snapshot(api, target) == before


async def test_a_query_template_the_target_cannot_fill_is_refused_at_start(tmp_path):
    pol = simple_policy()
    pol = type(pol)(**{**pol.__dict__, "gates": (type(pol.gates[0])(
        "errors", 'errors{team="{{ team }}"}', max=0.1),)})
    async with controller(tmp_path, policies=[pol]) as (api, _ctl, target):
        before = await snapshot(api, target)
        status, data = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v2"}, role="pipeline")
        assert status == 400 and "team" in data["error"] and "vars" in data["error"]
        assert await snapshot(api, target) == before


async def test_second_start_on_a_busy_target_is_409_and_unknown_ids_404(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, target):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda r: r["applied_weight"] == 10)
        before = await snapshot(api, target)
        status, data = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v3"}, role="pipeline")
        assert status == 409 and r["id"] in data["error"]
        status, data = await api.call("GET", "/api/v1/rollouts/nope", role="viewer")
        assert status == 404
        status, data = await api.call("POST", "/api/v1/rollouts/nope/pause", {"reason": "x"})
        assert status == 404
        assert await snapshot(api, target) == before


async def test_overrides_need_a_reason_and_clash_with_state_as_409(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, target):
        r = await api.start(canary_version="v2")
        rid = r["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        before = await snapshot(api, target)
        for body in (None, {}, {"reason": ""}, {"reason": 5}, {"reason": "x", "full": "yes"}):
            status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/promote", body)
            assert status == 400, (body, data)
            if body == {"reason": ""}:  # canary's words, not pydantic's ("at least 1 item")
                assert data["error"] == "reason: required, a non-empty string", data
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/resume", {"reason": "go"})
        assert status == 409 and "not paused" in data["error"]
        assert await snapshot(api, target) == before
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "stop"})
        assert status == 200
        await api.until(rid, lambda r: r["state"] == "rolled_back")
        before = await snapshot(api, target)
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "again"})
        assert status == 409 and "rolled_back" in data["error"]
        assert await snapshot(api, target) == before


async def test_every_override_is_an_event_with_the_token_name_and_reason(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        for kind, reason in (("pause", "checking dashboards"), ("resume", "looks fine"),
                             ("promote", "skip the wait")):
            status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/{kind}",
                                          {"reason": reason})
            assert status == 200, data
        r = await api.rollout(rid)
        mine = [(e["type"], e["actor"], e["message"]) for e in r["events"]
                if e["actor"] == "oncall-token"]
        assert mine[:3] == [("pause", "oncall-token", "checking dashboards"),
                            ("resume", "oncall-token", "looks fine"),
                            ("promote", "oncall-token", "skip the wait")]
        assert r["events"][0]["actor"] == "pipeline-token"


async def test_abort_wakes_the_rollout_instead_of_waiting_for_the_interval(tmp_path):
    pol = simple_policy(hold=7200, interval=3600, progress_deadline=20000)
    async with controller(tmp_path, policies=[pol]) as (api, _ctl, target):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "bad"},
                                   role="pipeline")
        assert status == 200
        # the next interval is an hour away: only a woken task can get here
        r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=20)
        assert r["weight"] == 0 and "pipeline-token: bad" in r["reason"]
        assert "server 127.0.0.1:9002 down;" in target.file.read_text()


async def test_racing_starts_on_one_target_yield_exactly_one_rollout(tmp_path):
    import asyncio

    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, _t):
        results = await asyncio.gather(*(
            api.call("POST", "/api/v1/rollouts", {"target": "web", "canary_version": f"v{i + 2}"},
                     role="pipeline") for i in range(8)))
        assert sorted(s for s, _ in results) == [201] + [409] * 7
        _, data = await api.call("GET", "/api/v1/rollouts", role="viewer")
        assert len(data["rollouts"]) == 1


async def test_a_write_sent_to_a_follower_is_503_with_retry_after_5_naming_the_leader(tmp_path):
    # README "State and replicas": a replica that does not hold the Lease is told so by
    # its elector as here (leading False, the Lease's holder as leader); every write it
    # gets is a 503 with `Retry-After: 5` and the leader's name, reads are served, and
    # nothing changes
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, ctl, target):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        ctl.leading, ctl.leader = False, lambda: "canary-7d9f-0"
        before = await snapshot(api, target)
        headers = {"Authorization": f"Bearer {TOKENS['oncall']}"}
        for path, body in (("/api/v1/rollouts", {"target": "web", "canary_version": "v3"}),
                           (f"/api/v1/rollouts/{rid}/pause", {"reason": "x"}),
                           (f"/api/v1/rollouts/{rid}/abort", {"reason": "x"})):
            async with api.s.post(api.base + path, json=body, headers=headers) as resp:
                data = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"] == "5", (path, data)
                assert "not the leader (canary-7d9f-0 is)" in data["error"], data
        assert await snapshot(api, target) == before


async def test_every_metric_the_readme_lists_is_on_metrics_with_a_sample(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = readme[readme.index("\nMetrics: "):]
    names = set(re.findall(r"`(canary_[a-z_]+)", listed[:listed.index("\n\n")]))
    assert len(names) == 14, names
    ok = tmp_path / "nginx-accepts"  # the router fails once: a router error to count
    async with controller(tmp_path, policies=[simple_policy(hold=3600, interval=0.1)],
                          test_cmd=("test", "-e", str(ok))) as (api, _ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r.get("paused_for") == "router")
        ok.touch()
        await api.until(rid, lambda r: r["applied_weight"] == 10 and r["state"] == "progressing"
                        and r["gates"][0]["status"] == "pass")
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"reason": "look"})
        assert status == 200
        _, live = await api.call("GET", "/metrics", role=None)
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "stop"})
        assert status == 200
        await api.until(rid, lambda r: r["state"] == "rolled_back")
        _, done = await api.call("GET", "/metrics", role=None)
    lines = (live + done).splitlines()
    missing = {n for n in names
               if not any(line.startswith((f"{n}{{", f"{n} ", f"{n}_bucket{{")) for line in lines)}
    assert not missing, missing


@pytest.mark.e2e
async def test_query_errors_hold_and_show_the_reason(tmp_path):
    source = SetSource(RuntimeError("connection refused"))
    async with controller(tmp_path, policies=[simple_policy(hold=0.2)], source=source) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        r = await api.until(rid, lambda r: r["gates"][0]["status"] == "error")
        assert "connection refused" in r["gates"][0]["detail"]
        await eventually(lambda: _count(source, 10), what="several evaluations")
        r = await api.rollout(rid)
        assert r["stage"] == 0 and r["state"] == "progressing"
        source.value = 0.0
        await api.until(rid, lambda r: r["state"] == "succeeded")


async def _count(source: SetSource, n: int) -> bool:
    return len(source.queries) >= n
