"""Carrying a release through (interface.md section 5): the sides take turns (swap), or
traffic returns to the stable side once it runs the new version (return); which side
serves survives restarts; version_probe refuses a start that would send traffic to a
server running another version."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import yaml
from aiohttp import web

from canary import config as config_mod
from canary import targets, yamlsrc
from canary.demo.procs import free_port, serve_app
from canary.engine import decide
from canary.errors import Conflict, ValidationFailed
from canary.gates.kinds import ThresholdGate
from canary.model import Command, CommandKind, PauseKind, Phase, Sides
from canary.policy import NoData, Policy
from canary.routers.nginx import parse_weight
from canary.stages import Stage
from canary.store.sqlite import SqliteStore
from tests.helpers import controller, eventually, simple_policy


def pol(**kw: object) -> Policy:
    base: dict[str, object] = dict(name="p", interval=10.0, failure_limit=2, no_data=NoData.HOLD,
                                   progress_deadline=600.0,
                                   stages=(Stage(10, 30.0), Stage(100, 30.0)),
                                   gates=(ThresholdGate("e", "q", max=0.1),))
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


class Sim:
    def __init__(self, promotion: str = "return", to_side: str = "canary") -> None:
        self.pol = pol()
        self.now = 1000.0
        self.r = decide.start(rollout_id="r1", target="web", policy=self.pol,
                              canary_version="v2", stable_version="v1", now=self.now,
                              actor="pipeline", to_side=to_side, promotion=promotion)
        self.apply()

    def apply(self) -> None:
        if self.r.weight != self.r.applied_weight:
            self.r = decide.applied(self.r, self.r.weight, self.now)

    def step(self, seconds: float = 10.0) -> None:
        from canary.model import Reading, Readings, Verdict
        self.now += seconds
        self.r = decide.readings(self.r, self.pol, Readings(self.now, self.r.stage, (
            Reading("e", Verdict.PASS, value=0.0),)), self.now)
        self.r = decide.tick(self.r, self.pol, self.now)
        self.apply()

    def to_100(self) -> None:
        for _ in range(20):
            if self.r.state is not Phase.PROGRESSING:
                return
            self.step()

    def cmd(self, kind: CommandKind) -> None:
        self.r = decide.command(self.r, self.pol, Command(kind, "pipeline", "why"), self.now)
        self.apply()


# ---- the state machine ------------------------------------------------------------------


def test_return_mode_is_promoting_at_100_until_handover_then_succeeds_with_canary_side_at_0():
    s = Sim("return")
    s.to_100()
    assert s.r.state is Phase.PROMOTING and s.r.weight == 100 and not s.r.state.final
    for _ in range(5):
        s.step()
    assert s.r.state is Phase.PROMOTING, "a hand-over waits for the pipeline"
    s.cmd(CommandKind.HANDOVER)
    assert s.r.state is Phase.SUCCEEDED and s.r.weight == 0 and s.r.applied_weight == 0
    assert Sides.after(s.r) == Sides(serving="stable", stable_runs="v2", canary_runs="v2",
                                     rollout="r1")


def test_swap_mode_succeeds_at_100_and_the_side_at_100_becomes_the_serving_side():
    s = Sim("swap")
    s.to_100()
    assert s.r.state is Phase.SUCCEEDED and s.r.weight == 100
    sides = Sides.after(s.r)
    assert (sides.serving, sides.deploy_to, sides.canary_runs, sides.stable_runs) == (
        "canary", "stable", "v2", "v1")
    s2 = Sim("swap", to_side=sides.deploy_to)
    s2.to_100()
    assert Sides.after(s2.r).serving == "stable"


def test_a_rolled_back_rollout_leaves_the_old_side_serving():
    s = Sim("swap", to_side="stable")
    s.cmd(CommandKind.ABORT)
    assert s.r.state is Phase.ROLLED_BACK
    sides = Sides.after(s.r)
    assert sides.serving == "canary" and sides.runs("canary") == "v1"
    assert sides.runs("stable") == "v2" and sides.deploy_to == "stable"


def test_handover_outside_promoting_is_a_conflict_naming_the_state():
    s = Sim("return")
    with pytest.raises(Conflict, match="progressing at weight 10"):
        s.cmd(CommandKind.HANDOVER)
    s = Sim("swap")
    s.to_100()
    with pytest.raises(Conflict, match="already succeeded"):
        s.cmd(CommandKind.HANDOVER)
    s = Sim("swap")
    with pytest.raises(Conflict, match="promotion swap"):
        s.cmd(CommandKind.HANDOVER)


def test_abort_during_promoting_returns_traffic_to_the_old_side():
    s = Sim("return")
    s.to_100()
    s.cmd(CommandKind.ABORT)
    assert s.r.state is Phase.ROLLED_BACK and s.r.applied_weight == 0


def test_abort_after_handover_is_refused_no_side_runs_the_old_version():
    s = Sim("return")
    s.to_100()
    s.r = decide.command(s.r, s.pol, Command(CommandKind.HANDOVER, "p", "done"), s.now)
    assert s.r.state is Phase.PROMOTING and s.r.returning  # not applied yet
    with pytest.raises(Conflict, match="already runs v2"):
        s.cmd(CommandKind.ABORT)


def test_handover_not_complete_within_progress_deadline_pauses_and_keeps_the_traffic():
    s = Sim("return")
    s.to_100()
    s.step(601.0)
    assert s.r.state is Phase.PAUSED and s.r.pause_kind is PauseKind.HANDOVER
    assert s.r.weight == 100 and s.r.applied_weight == 100
    assert "hand-over not complete within 10m" in (s.r.reason or "")
    s.cmd(CommandKind.RESUME)
    assert s.r.state is Phase.PROMOTING and s.r.weight == 100
    s.r = replace(s.r, state=Phase.PAUSED, pause_kind=PauseKind.HANDOVER)
    s.cmd(CommandKind.HANDOVER)  # a late hand-over still completes it
    assert s.r.state is Phase.SUCCEEDED


def test_pause_and_promote_during_promoting_say_what_to_do_instead():
    s = Sim("return")
    s.to_100()
    for kind in (CommandKind.PAUSE, CommandKind.PROMOTE):
        with pytest.raises(Conflict, match="call handover"):
            s.cmd(kind)


def test_rollback_held_keeps_the_traffic_and_says_why_once():
    s = Sim("return")
    s.to_100()
    s.r = decide.command(s.r, s.pol, Command(CommandKind.ABORT, "p", "bad"), s.now)
    r = decide.rollback_held(s.r, "127.0.0.1:1 answered 'v2'", s.now)
    assert r.state is Phase.ROLLING_BACK and "held" in (r.reason or "")
    assert decide.rollback_held(r, "127.0.0.1:1 answered 'v2'", s.now + 1) == r


# ---- config -----------------------------------------------------------------------------


def _cfg(tmp_path, target_extra):
    (tmp_path / "policies").mkdir(exist_ok=True)
    t = {"router": "nginx", "file": "up.conf", "upstream": "web", "stable": ["127.0.0.1:1"],
         "canary": ["127.0.0.1:2"], **target_extra}
    doc = {"auth": {"tokens": [{"name": "a", "sha256": "0" * 64, "role": "viewer"}]},
           "policies": "policies", "targets": {"web": t}}
    raw = yaml.safe_dump(doc).encode()
    return config_mod.parse(yamlsrc.load(raw, "c.yaml"), base=tmp_path)


def test_config_takes_promotion_and_version_probe_with_defaults(tmp_path):
    t = _cfg(tmp_path, {}).targets["web"]
    assert targets.promotion_of(t) == "swap" and t.version_probe is None
    t = _cfg(tmp_path, {"promotion": "return", "version_probe": {"path": "/v"}}).targets["web"]
    assert targets.promotion_of(t) == "return"
    assert t.version_probe is not None and t.version_probe.timeout == 2.0


@pytest.mark.parametrize(("extra", "field", "message"), [
    ({"promotion": "flip"}, "targets.web.promotion", "must be swap"),
    ({"version_probe": {"path": "version"}}, "targets.web.version_probe.path",
     "absolute URL path"),
    ({"version_probe": {"timeout": "5m"}}, "targets.web.version_probe.timeout", "at most 60s"),
    ({"version_probe": {"paht": "/v"}}, "targets.web.version_probe.paht", "unknown field"),
])
def test_bad_promotion_or_probe_names_the_field_and_the_fix(tmp_path, extra, field, message):
    with pytest.raises(ValidationFailed) as e:
        _cfg(tmp_path, extra)
    assert any(p.field == field and message in p.message for p in e.value.problems), \
        e.value.problems


def test_workload_defaults_to_return_and_a_bad_deployment_name_is_named(tmp_path):
    base = {"router": "istio", "namespace": "prod", "virtual_service": "api",
            "stable": {"host": "api", "subset": "stable"},
            "canary": {"host": "api", "subset": "canary"}}
    doc = {"auth": {"tokens": [{"name": "a", "sha256": "0" * 64, "role": "viewer"}]},
           "targets": {"api": {**base, "workload": {"stable": "api-stable",
                                                    "canary": "api-canary"}}}}
    (tmp_path / "policies").mkdir()
    cfg = config_mod.parse(yamlsrc.load(yaml.safe_dump(doc).encode(), "c.yaml"), base=tmp_path)
    t = cfg.targets["api"]
    assert targets.promotion_of(t) == "return"
    doc["targets"]["api"]["workload"]["stable"] = "Api_Stable"
    with pytest.raises(ValidationFailed) as e:
        config_mod.parse(yamlsrc.load(yaml.safe_dump(doc).encode(), "c.yaml"), base=tmp_path)
    assert [(p.field, p.message) for p in e.value.problems] == [
        ("targets.api.workload.stable", "must be the name of a Deployment (lowercase letters, "
                                        "digits, '-' and '.')")]


# ---- the controller, its API and its store ------------------------------------------------


class VersionServer:
    """A server answering its version at /version (or never, or garbage)."""

    def __init__(self, version: str | None) -> None:
        self.version = version
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        if self.version is None:
            return web.Response(status=503, text="starting")
        return web.json_response({"version": self.version})

    async def __aenter__(self) -> VersionServer:
        app = web.Application()
        app.router.add_get("/version", self.handle)
        self.runner = await serve_app(app, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def nginx_target(tmp_path, stable, canary, **kw):
    from canary.targets import NginxTarget, VersionProbe
    kw.setdefault("version_probe", VersionProbe("/version", 1.0))
    return NginxTarget(name="web", file=tmp_path / "upstream.conf", upstream="web",
                       stable=tuple(stable), canary=tuple(canary), test=("true",),
                       reload=("true",), policy="p", vars={"service": "web"},
                       stable_version="v1", **kw)


FAST = simple_policy(hold=0.3, interval=0.1)


@contextlib.asynccontextmanager
async def probed(tmp_path, stable, canary) -> AsyncIterator[tuple[Any, Any]]:
    """A controller whose nginx target probes these servers' versions."""
    from canary.routers.nginx import NginxRouter
    target = nginx_target(tmp_path, stable, canary)
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, _ctl, _t):
        yield api, target


async def post_start(api, version: str = "v2") -> tuple[int, Any]:
    return await api.call("POST", "/api/v1/rollouts",
                          {"target": "web", "canary_version": version}, role="pipeline")


@pytest.mark.e2e
async def test_two_releases_in_a_row_swap_sides_and_the_serving_side_survives_a_restart(
        tmp_path):
    from canary.routers.nginx import NginxRouter
    target = nginx_target(tmp_path, ["127.0.0.1:9001"], ["127.0.0.1:9002"],
                          version_probe=None)
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        assert (r["stable_version"], r["to_side"]) == ("v1", "canary")
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
        status, t = await api.call("GET", "/api/v1/targets/web", role="viewer")
        assert status == 200, t
        assert (t["serving"], t["deploy_to"], t["live_weight"]) == ("canary", "stable", 100)
        assert t["runs"] == {"stable": "v1", "canary": "v2"} and t["promotion"] == "swap"
    # a new controller on the same state file: the canary side still serves
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, ctl, _t):
        assert await ctl.unexplained() == {}, "100% on the serving side is explained"
        r = await api.start(canary_version="v3")
        assert (r["stable_version"], r["to_side"]) == ("v2", "stable")
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        text = target.file.read_text()
        assert parse_weight(target, text) == 90, "10% to the stable side, 90% stays on canary"
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
        status, t = await api.call("GET", "/api/v1/targets/web", role="viewer")
        assert (t["serving"], t["deploy_to"], t["live_weight"]) == ("stable", "canary", 0)
        assert t["runs"] == {"stable": "v3", "canary": "v2"}
    store = SqliteStore(str(tmp_path / "state.db"))
    try:
        stored = await store.sides("web")
    finally:
        await store.close()
    assert stored is not None and stored.serving == "stable" and stored.stable_runs == "v3"


async def test_version_probe_refuses_a_start_naming_each_server_and_what_it_answered(tmp_path):
    async with VersionServer("v1") as s1, VersionServer("v1") as c1, \
            VersionServer("v2") as c2, VersionServer(None) as c3:
        async with probed(tmp_path, [s1.addr], [c1.addr, c2.addr, c3.addr]) as (api, target):
            status, data = await post_start(api)
            assert status == 400, data
            msg = data["error"]
            assert f"{c1.addr} answered 'v1'" in msg and "HTTP 503" in msg and c3.addr in msg
            assert c2.addr not in msg, "a server that runs the right version is not named"
            assert "canary side must run v2" in msg
            status, data = await api.call("GET", "/api/v1/rollouts", role="viewer")
            assert data["rollouts"] == [], "a refused start changes nothing"
            assert not target.file.exists(), "nor any traffic"
            c1.version, c3.version = "v2", "v2"
            s1.version = "v0"
            status, data = await post_start(api)
            assert status == 400 and f"{s1.addr} answered 'v0'" in data["error"]
            assert "stable side must run v1" in data["error"]
            s1.version = "v1"
            r = await api.start(canary_version="v2")
            assert r["state"] == "progressing"


@pytest.mark.e2e
async def test_a_server_that_never_answers_the_probe_is_named_within_its_timeout(tmp_path):
    from canary.demo.procs import Blackhole
    async with VersionServer("v1") as s1, Blackhole() as url:
        hole = url.removeprefix("http://")
        async with probed(tmp_path, [s1.addr], [hole]) as (api, _target):
            status, data = await post_start(api)
            assert status == 400
            assert f"{hole} did not answer a version (no answer within 1s)" in data["error"]


@pytest.mark.e2e
async def test_return_mode_hands_over_on_the_pipelines_call_and_start_wait_exits_only_then(
        tmp_path):
    from canary.routers.nginx import NginxRouter
    async with VersionServer("v1") as s1, VersionServer("v2") as c1:
        target = nginx_target(tmp_path, [s1.addr], [c1.addr], promotion="return",
                              version_probe=None)  # (the pipeline says, not a probe)
        async with controller(tmp_path, policies=[FAST], target=target,
                              router=NginxRouter(target)) as (api, _ctl, _t):
            r = await api.start(canary_version="v2")
            r = await api.until(r["id"], lambda x: x["state"] == "promoting")
            assert r["applied_weight"] == 100 and r["promotion"] == "return"
            status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/handover",
                                          {"reason": "v2 deployed on stable"}, role="viewer")
            assert status == 403
            status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/handover",
                                          {"reason": "v2 deployed on stable"}, role="pipeline")
            assert status == 200, data
            r = await api.until(r["id"], lambda x: x["state"] == "succeeded")
            assert r["applied_weight"] == 0
            assert parse_weight(target, target.file.read_text()) == 0
            status, t = await api.call("GET", "/api/v1/targets/web", role="viewer")
            assert (t["serving"], t["deploy_to"]) == ("stable", "canary")
            assert t["runs"] == {"stable": "v2", "canary": "v2"}
            # called again (a pipeline retrying, or racing the version_probe): the
            # release is handed over, so that is a success that changes nothing
            status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/handover",
                                          {"reason": "again"}, role="pipeline")
            assert status == 200 and data["state"] == "succeeded", data
            assert [e["type"] for e in data["events"]].count("handover") == 1


@contextlib.asynccontextmanager
async def promoting_return_release(tmp_path) -> AsyncIterator[tuple[Any, ...]]:
    """A return-mode release on real nginx with a version probe, at `promoting`: two
    stable servers still on v1, the canary server on v2. Yields (api, rollout, the two
    stable servers, target); setting a server's `version` is the pipeline deploying."""
    from canary.routers.nginx import NginxRouter
    async with VersionServer("v1") as s1, VersionServer("v1") as s2, \
            VersionServer("v2") as c1:
        target = nginx_target(tmp_path, [s1.addr, s2.addr], [c1.addr], promotion="return")
        async with controller(tmp_path, policies=[FAST], target=target,
                              router=NginxRouter(target)) as (api, _ctl, _t):
            r = await api.start(canary_version="v2")
            await api.until(r["id"], lambda x: x["state"] == "promoting")
            yield api, r, s1, s2, target


@pytest.mark.e2e
async def test_version_probe_sees_the_stable_side_updated_and_hands_over_by_itself(tmp_path):
    async with promoting_return_release(tmp_path) as (api, r, s1, s2, _target):
        s1.version = "v2"  # half the stable side updated: not yet
        await api.until(r["id"], lambda x: x["state"] == "promoting")
        s2.version = "v2"
        r = await api.until(r["id"], lambda x: x["state"] == "succeeded")
        handover = [e for e in r["events"] if e["type"] == "handover"]
        assert handover and handover[0]["actor"] == "controller"
        assert "version_probe" in handover[0]["message"]


@pytest.mark.e2e
async def test_rollback_during_promoting_never_returns_traffic_to_an_updated_server(tmp_path):
    async with promoting_return_release(tmp_path) as (api, r, s1, _s2, target):
        s1.version = "v2"  # the pipeline has started updating the stable side
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort",
                                      {"reason": "bad"}, role="pipeline")
        assert status == 200, data
        r = await api.until(r["id"], lambda x: "held" in (x["reason"] or ""))
        assert r["state"] == "rolling_back" and s1.addr in r["reason"]
        assert parse_weight(target, target.file.read_text()) == 100, \
            "traffic stays on the canary side"
        s1.version = "v1"  # the pipeline put v1 back
        r = await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert parse_weight(target, target.file.read_text()) == 0


def test_a_workload_with_promotion_swap_is_refused_saying_why(tmp_path):
    doc = {"auth": {"tokens": [{"name": "a", "sha256": "0" * 64, "role": "viewer"}]},
           "targets": {"api": {"router": "istio", "namespace": "prod", "virtual_service": "api",
                               "stable": {"host": "api", "subset": "stable"},
                               "canary": {"host": "api", "subset": "canary"},
                               "promotion": "swap",
                               "workload": {"stable": "api-stable", "canary": "api-canary"}}}}
    (tmp_path / "policies").mkdir()
    with pytest.raises(ValidationFailed) as e:
        config_mod.parse(yamlsrc.load(yaml.safe_dump(doc).encode(), "c.yaml"), base=tmp_path)
    assert any("hands over with return" in p.message for p in e.value.problems), \
        e.value.problems


@pytest.mark.e2e
async def test_start_wait_exits_0_only_once_the_handover_completes_and_targets_shows_the_sides(
        tmp_path):
    from canary.routers.nginx import NginxRouter
    from tests.test_restart_and_cli import cli
    target = nginx_target(tmp_path, ["127.0.0.1:9001"], ["127.0.0.1:9002"], version_probe=None,
                          promotion="return")
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, _ctl, _t):
        waiting = asyncio.create_task(cli("start", "web", "--canary-version", "v2", "--wait",
                                          server=api.base))

        async def promoting() -> str | None:
            _, data = await api.call("GET", "/api/v1/rollouts?state=promoting", role="viewer")
            return data["rollouts"][0]["id"] if data["rollouts"] else None
        rid = await eventually(promoting, what="promoting")
        assert not waiting.done(), "--wait does not end at 100%"
        code, out, err = await cli("targets", server=api.base, token="tok-viewer")
        assert code == 0, err
        assert "web: nginx, promotion return; serving: stable side (v1)" in out
        assert f"active rollout {rid}: promoting at weight 100 toward the canary side" in out
        code, out, err = await cli("handover", rid, "--reason", "v2 on stable",
                                   server=api.base)
        assert code == 0, err
        code, out, err = await waiting
        assert code == 0, err
        assert "succeeded stage 2 weight 0%" in out  # (it polls: it may not print promoting)
        code, out, err = await cli("targets", "web", "--json", server=api.base,
                                   token="tok-viewer")
        assert code == 0, err
        t = json.loads(out)
        assert (t["serving"], t["deploy_to"], t["runs"]) == (
            "stable", "canary", {"stable": "v2", "canary": "v2"})


@pytest.mark.e2e
async def test_the_cluster_store_keeps_which_side_serves_beside_the_targets_claim(tmp_path):
    from canary.kube import api_client
    from canary.store.kubernetes import KubernetesStore
    from tests.kubeapi import KubeApiDouble

    kube = KubeApiDouble()
    await kube.start()
    api = api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
    try:
        store = KubernetesStore("canary-system", api)
        assert await store.sides("web") is None
        sides = Sides(serving="canary", stable_runs="v1", canary_runs="v2", rollout="r1")
        await store.save_sides("web", sides)
        r = decide.start(rollout_id="r2", target="web", policy=simple_policy(),
                         canary_version="v3", stable_version="v2", now=1.0, actor="t",
                         to_side="stable")
        await store.create(rollout=r)  # claims the target in the same ConfigMap
        assert await KubernetesStore("canary-system", api).sides("web") == sides
        done = replace(await store.load("r2"), state=Phase.SUCCEEDED)
        await store.save_sides("web", Sides.after(done))
        again = await KubernetesStore("canary-system", api).sides("web")
        assert again is not None and (again.serving, again.stable_runs) == ("stable", "v3")
    finally:
        api.close()
        await kube.stop()


@pytest.mark.e2e
async def test_a_canary_server_that_changes_version_mid_rollout_gets_no_more_traffic(tmp_path):
    from canary.routers.nginx import NginxRouter
    async with VersionServer("v1") as s1, VersionServer("v2") as c1:
        target = nginx_target(tmp_path, [s1.addr], [c1.addr])
        pol = simple_policy(hold=0.5, interval=0.1)
        async with controller(tmp_path, policies=[pol], target=target,
                              router=NginxRouter(target)) as (api, _ctl, _t):
            r = await api.start(canary_version="v2")
            await api.until(r["id"], lambda x: x["applied_weight"] == 10)
            c1.version = "v9"  # someone deployed something else there
            r = await api.until(r["id"], lambda x: "waiting for the canary servers" in
                                (x["reason"] or ""))
            assert f"{c1.addr} answered 'v9'" in r["reason"]
            assert r["applied_weight"] == 10 and r["state"] == "progressing"
            assert parse_weight(target, target.file.read_text()) == 10
            c1.version = "v2"
            r = await api.until(r["id"], lambda x: x["state"] == "succeeded")


@pytest.mark.e2e
async def test_after_a_swap_all_traffic_moved_back_by_hand_is_unexplained_and_blocks_a_start(
        tmp_path):
    from canary.routers.nginx import NginxRouter, render
    target = nginx_target(tmp_path, ["127.0.0.1:9001"], ["127.0.0.1:9002"], version_probe=None)
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
    target.file.write_text(render(target, 0))  # someone sends everything to the old v1 side
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, ctl, _t):
        warnings = await ctl.unexplained()
        assert "left the canary side serving" in warnings["web"]
        status, data = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v3"},
                                      role="pipeline")
        assert status == 409 and "carries 0% canary traffic" in data["error"]


@pytest.mark.e2e
async def test_drift_and_abort_work_the_same_after_the_sides_have_swapped(tmp_path):
    from canary.routers.nginx import NginxRouter, render
    target = nginx_target(tmp_path, ["127.0.0.1:9001"], ["127.0.0.1:9002"], version_probe=None)
    slow = simple_policy(hold=3600, interval=0.1)
    async with controller(tmp_path, policies=[FAST], target=target,
                          router=NginxRouter(target)) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
    async with controller(tmp_path, policies=[slow], target=target,
                          router=NginxRouter(target)) as (api, _ctl, _t):
        r = await api.start(canary_version="v3", policy="p")
        assert r["to_side"] == "stable"
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        assert parse_weight(target, target.file.read_text()) == 90
        target.file.write_text(render(target, 50))  # someone edits the split by hand
        r = await api.until(r["id"], lambda x: x["state"] == "paused")
        assert r["paused_for"] == "drift" and "carries canary weight 50, expected 10" in r["reason"]
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort",
                                      {"reason": "no"}, role="pipeline")
        assert status == 200, data
        await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert parse_weight(target, target.file.read_text()) == 100, \
            "all traffic back on the canary side, which runs v2"
        _, t = await api.call("GET", "/api/v1/targets/web", role="viewer")
        assert (t["serving"], t["deploy_to"], t["runs"]) == (
            "canary", "stable", {"stable": "v3", "canary": "v2"})


async def test_a_match_stage_policy_after_a_swap_is_refused_with_how_to_fix(tmp_path):
    """After a swap the next version goes to the configured stable side, but match and
    mirror stages send their requests to the configured canary side: such a start is
    refused (400) saying what to change, and nothing is written."""
    from canary.routers.nginx import NginxRouter
    from tests.test_shapes import shaped_policy

    target = nginx_target(tmp_path, ["127.0.0.1:9001"], ["127.0.0.1:9002"],
                          version_probe=None)
    store = SqliteStore(str(tmp_path / "state.db"))
    await store.save_sides("web", Sides(serving="canary", stable_runs="v1", canary_runs="v2",
                                        rollout="r1"))
    async with controller(tmp_path, policies=[shaped_policy()], target=target,
                          router=NginxRouter(target), store=store) as (api, _ctl, _t):
        status, body = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v3"},
                                      role="pipeline")
        assert status == 400, body
        assert "promotion: return" in body["error"] and "match or mirror" in body["error"]
        status, listed = await api.call("GET", "/api/v1/rollouts", role="viewer")
        assert listed["rollouts"] == []
    assert not target.file.exists(), "nothing was written to nginx"


async def test_a_version_answered_in_pieces_is_read_whole_and_a_huge_body_is_no_version():
    """A server that writes its answer in two pieces (a streaming framework, a slow
    proxy) answers the version all the same; a body past the limit is named as such,
    not cut to a version it never said."""
    from canary.probe import ask
    from canary.targets import VersionProbe

    async def pieces(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"version": ')
        await asyncio.sleep(0.2)
        await resp.write(b'"v2"}')
        await resp.write_eof()
        return resp

    async def huge(request: web.Request) -> web.Response:
        return web.Response(text="v2" + " x" * 100_000)

    app = web.Application()
    app.router.add_get("/pieces", pieces)
    app.router.add_get("/huge", huge)
    port = free_port()
    runner = await serve_app(app, port)
    try:
        [a] = await ask([f"127.0.0.1:{port}"], VersionProbe("/pieces", 2.0))
        assert a.version == "v2", a.describe()
        [b] = await ask([f"127.0.0.1:{port}"], VersionProbe("/huge", 2.0))
        assert b.version is None and "longer than" in b.describe(), b.describe()
    finally:
        await runner.cleanup()


@pytest.mark.e2e
async def test_a_handover_while_a_stable_server_still_runs_the_old_version_is_refused(tmp_path):
    """With a version_probe, the pipeline's handover is checked like a start: traffic
    never returns to a stable server that does not answer the canary version."""
    async with promoting_return_release(tmp_path) as (api, r, s1, s2, target):
        s1.version = "v2"  # the pipeline updated one stable server of two, and calls
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/handover",
                                      {"reason": "deployed"}, role="pipeline")
        assert status == 409, data
        assert f"{s2.addr} answered 'v1'" in data["error"], data
        assert s1.addr not in data["error"]
        status, r = await api.call("GET", f"/api/v1/rollouts/{r['id']}", role="viewer")
        assert r["state"] == "promoting" and r["applied_weight"] == 100
        assert parse_weight(target, target.file.read_text()) == 100, "traffic stays"
        s2.version = "v2"
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/handover",
                                      {"reason": "deployed"}, role="pipeline")
        assert status == 200, data  # (even when the probe saw it first)
        await api.until(r["id"], lambda x: x["state"] == "succeeded")


def test_a_json_version_that_is_not_a_version_is_named_as_no_version():
    """`{"version": true}` or `{"version": NaN}` is no version at all: read as "True" or
    "nan" it would never match a deploy and the refusal would name a made-up version."""
    from canary.probe import version_of

    assert version_of(b'{"version": "v2"}') == "v2"
    assert version_of(b'{"version": 7}') == "7"
    assert version_of(b"v2\n") == "v2"
    for body in (b'{"version": true}', b'{"version": false}', b'{"version": NaN}',
                 b'{"version": "  "}', b'{"version": null}', b'{"version": ["v2"]}'):
        assert version_of(body) is None, body


async def test_a_json_body_nested_too_deep_is_no_version_and_the_start_a_400(tmp_path):
    """A body of 4 KB can nest JSON two thousand deep: Python's parser then raises
    RecursionError, not ValueError. It escaped the probe and the start was a 500 with a
    traceback in the log; it is a server that did not answer a version, named in a 400."""
    from canary.probe import version_of

    deep = b'{"version": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert len(deep) < 4096
    deep_server = VersionServer("v2")

    async def answer_deep(request: web.Request) -> web.Response:
        return web.Response(body=deep)

    deep_server.handle = answer_deep  # type: ignore[method-assign]
    async with VersionServer("v1") as s1, deep_server as c1:
        async with probed(tmp_path, [s1.addr], [c1.addr]) as (api, _target):
            status, data = await post_start(api)
            assert status == 400, data
            assert f"{c1.addr} did not answer a version (the body is not a version)" \
                in data["error"], data
    assert version_of(deep) is None


async def test_a_server_answering_a_longer_version_is_not_taken_for_the_canary_version(
        tmp_path):
    """A version may be 128 characters long; a server answering that version and one
    character more runs something else. The answer was cut to 128 characters before it
    was compared, so the start went ahead and the canary side got traffic though its
    server does not run the canary version."""

    want = "v" + "1234567890" * 12 + "abcdefg"
    assert len(want) == 128
    async with VersionServer("v1") as s1, VersionServer(want + "-rc1") as c1:
        async with probed(tmp_path, [s1.addr], [c1.addr]) as (api, target):
            status, data = await post_start(api, want)
            assert status == 400, data
            assert c1.addr in data["error"] and "longer than a version" in data["error"], data
            assert not target.file.exists(), "no traffic moved"
            c1.version = want
            r = await api.start(canary_version=want)
            assert r["state"] == "progressing"
