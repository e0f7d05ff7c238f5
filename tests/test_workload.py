"""A Kubernetes target with a `workload:` (interface.md section 5), against the wire-level
API double (tests/kubeapi.py) with apps/v1 Deployments whose rollouts the test drives:
canary waits at weight 0 for the canary Deployment, sizes it before each step, hands the
release over to the stable Deployment and scales the idle one to 0. Every Deployment and
Scale canary writes is checked against Kubernetes' own schema."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from canary.routers.istio import IstioRouter
from canary.targets import Workload
from canary.workload import Workloads, canary_replicas, ready_for, state_of
from tests.helpers import controller, eventually, simple_policy
from tests.test_istio import DR, NS, cluster, target, weights

SUBSETS = copy.deepcopy(DR)
SUBSETS["spec"]["subsets"] = [{"name": "stable", "labels": {"track": "stable"}},
                              {"name": "canary", "labels": {"track": "canary"}}]
WORKLOAD = Workload(stable="api-stable", canary="api-canary", scale_down_delay=0.2)


def deployment(name: str, track: str, version: str, replicas: int) -> dict[str, Any]:
    labels = {"app": "api", "track": track}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": {**labels, "version": version}},
                                  "spec": {"containers": [{"name": "api",
                                                           "image": f"api:{version}"}]}}}}


def replicas(kube, name: str) -> int:
    return int(kube.get("deployments", NS, name)["spec"]["replicas"])


async def setup(kube, *, canary_mode: str = "completes") -> None:
    kube.rollout["api-canary"] = canary_mode
    kube.put("deployments", NS, deployment("api-stable", "stable", "v1", 4))
    kube.put("deployments", NS, deployment("api-canary", "canary", "v2", 0))


def workload_target():
    return target(workload=WORKLOAD)


def test_canary_replicas_follow_the_weight_and_never_drop_below_one():
    assert [canary_replicas(4, w) for w in (1, 10, 25, 50, 100)] == [1, 1, 1, 2, 4]
    assert canary_replicas(0, 50) == 1


def test_a_canary_deployment_labelled_with_another_version_is_not_ready():
    dep = deployment("api-canary", "canary", "v3", 1)
    dep["metadata"]["generation"] = 1
    dep["status"] = {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1}
    assert "must be labelled v2" in (ready_for(state_of(dep, "version"), "v2", 1) or "")
    assert ready_for(state_of(dep, "version"), "v3", 1) is None
    dep["metadata"]["generation"] = 2
    assert "not yet observed" in (ready_for(state_of(dep, "version"), "v3", 1) or "")


@pytest.mark.e2e
async def test_weights_move_only_once_the_canary_deployment_is_sized_and_available(tmp_path):
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        await setup(kube, canary_mode="never")
        t = workload_target()
        async with controller(tmp_path, policies=[simple_policy(hold=0.3, interval=0.1)],
                              target=t, router=IstioRouter(t, api)) as (http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            r = await http.start(canary_version="v2")
            r = await http.until(r["id"], lambda x: "waiting for the canary workload"
                                 in (x["reason"] or ""))
            assert r["state"] == "progressing" and "0/1 available" in r["reason"]
            assert weights(kube) == [100, 0], "no traffic before the canary is available"
            assert replicas(kube, "api-canary") == 1
            kube.set_rollout(NS, "api-canary", "completes")
            seen = {}
            for w in (10, 50, 100):
                await http.until(r["id"], lambda x, w=w: x["applied_weight"] == w)
                seen[w] = (replicas(kube, "api-canary"), weights(kube))
            assert seen == {10: (1, [90, 10]), 50: (2, [50, 50]), 100: (4, [0, 100])}
            # each scale-up was written before the weight that needs it
            order = [p for _, m, p, n, _ in kube.writes if p in ("deployments",
                                                                  "virtualservices")]
            assert order.index("virtualservices") > order.index("deployments")
        assert kube.invalid == []


@pytest.mark.e2e
async def test_hand_over_copies_the_canary_template_returns_traffic_and_scales_canary_to_0(
        tmp_path):
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        await setup(kube)
        t = workload_target()
        async with controller(tmp_path, policies=[simple_policy(hold=0.3, interval=0.1)],
                              target=t, router=IstioRouter(t, api)) as (http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            r = await http.start(canary_version="v2")
            assert r["promotion"] == "return"
            r = await http.until(r["id"], lambda x: x["state"] == "succeeded")
            assert weights(kube) == [100, 0]
            stable = kube.get("deployments", NS, "api-stable")
            labels = stable["spec"]["template"]["metadata"]["labels"]
            assert labels == {"app": "api", "track": "stable", "version": "v2"}, \
                "the canary's template, with the stable Deployment's own selector labels"
            assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "api:v2"
            assert stable["metadata"]["generation"] == 2
            handover = [e for e in r["events"] if e["type"] == "handover"]
            assert handover and "4/4 available" in handover[0]["message"]

            async def scaled_down() -> bool:
                return replicas(kube, "api-canary") == 0
            await eventually(scaled_down, what="canary Deployment scaled to 0")
            _, tv = await http.call("GET", "/api/v1/targets/web", role="viewer")
            assert (tv["serving"], tv["runs"]["stable"]) == ("stable", "v2")
        assert kube.invalid == []


@pytest.mark.e2e
async def test_a_stalled_stable_rollout_keeps_traffic_on_the_canary_and_pauses(tmp_path):
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        await setup(kube)
        kube.rollout["api-stable"] = "stalls"
        t = workload_target()
        pol = simple_policy(hold=0.3, interval=0.1, progress_deadline=1.5)
        async with controller(tmp_path, policies=[pol], target=t,
                              router=IstioRouter(t, api)) as (http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            r = await http.start(canary_version="v2")
            r = await http.until(r["id"], lambda x: x["state"] == "paused", deadline=30)
            assert r["paused_for"] == "handover" and "hand-over not complete" in r["reason"]
            assert weights(kube) == [0, 100], "never back to a side that is not ready"
            assert replicas(kube, "api-canary") == 4
        assert kube.invalid == []


@pytest.mark.e2e
async def test_a_canary_deployment_never_available_is_rolled_back_and_scaled_to_0(tmp_path):
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        await setup(kube, canary_mode="never")
        t = workload_target()
        pol = simple_policy(hold=0.3, interval=0.1, progress_deadline=1.0)
        async with controller(tmp_path, policies=[pol], target=t,
                              router=IstioRouter(t, api)) as (http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            r = await http.start(canary_version="v2")
            r = await http.until(r["id"], lambda x: x["state"] == "rolled_back")
            assert "the canary workload was not ready for weight 10 within 1s" in r["reason"]
            assert weights(kube) == [100, 0]

            async def scaled_down() -> bool:
                return replicas(kube, "api-canary") == 0
            await eventually(scaled_down, what="canary Deployment scaled to 0")
        assert kube.invalid == []


async def test_a_start_is_refused_when_the_stable_deployment_runs_another_version(tmp_path):
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        await setup(kube)
        t = workload_target()
        async with controller(tmp_path, policies=[simple_policy()], target=t,
                              router=IstioRouter(t, api)) as (http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            status, data = await http.call("POST", "/api/v1/rollouts",
                                           {"target": "web", "canary_version": "v3",
                                            "stable_version": "v0"}, role="pipeline")
            assert status == 400, data
            assert "stable side must run v0" in data["error"]
            assert "Deployment api-stable: version v1" in data["error"]
            assert weights(kube) == [100, 0]


async def _finished_release(store, version: str) -> None:
    import time
    from dataclasses import replace

    from canary.engine import decide
    from canary.model import Phase
    r = decide.start(rollout_id="old", target="web", policy=simple_policy(),
                     canary_version=version, stable_version="v1", now=time.time() - 60,
                     actor="t", promotion="return")
    r = await store.create(rollout=r)
    await store.save(rollout=replace(r, state=Phase.SUCCEEDED, weight=0, applied_weight=0),
                     expected_version=r.version)


async def test_a_restarted_controller_scales_down_the_idle_canary_it_did_not_get_to(tmp_path):
    from canary.store.sqlite import SqliteStore
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        kube.put("deployments", NS, deployment("api-stable", "stable", "v2", 4))
        kube.put("deployments", NS, deployment("api-canary", "canary", "v2", 4))
        store = SqliteStore(str(tmp_path / "state.db"))
        await _finished_release(store, "v2")
        t = workload_target()
        ctl_workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
        async with controller(tmp_path, policies=[simple_policy()], target=t, store=store,
                              router=IstioRouter(t, api)) as (_http, ctl, _t):
            ctl.workloads = ctl_workloads
            await ctl.stop()
            await ctl.start()  # (as a controller restarting with its workloads)

            async def scaled_down() -> bool:
                return replicas(kube, "api-canary") == 0
            await eventually(scaled_down, what="idle canary Deployment scaled to 0")
        assert kube.invalid == []


async def test_a_canary_deployed_for_the_next_release_is_left_alone_at_start(tmp_path):
    import asyncio

    from canary.store.sqlite import SqliteStore
    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        kube.put("deployments", NS, deployment("api-stable", "stable", "v2", 4))
        kube.put("deployments", NS, deployment("api-canary", "canary", "v3", 1))
        store = SqliteStore(str(tmp_path / "state.db"))
        await _finished_release(store, "v2")
        t = workload_target()
        async with controller(tmp_path, policies=[simple_policy()], target=t, store=store,
                              router=IstioRouter(t, api)) as (_http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            await ctl.stop()
            await ctl.start()
            await asyncio.gather(*ctl._idle_tasks)  # the check has run and ended
            assert replicas(kube, "api-canary") == 1


@pytest.mark.e2e
async def test_a_gateway_target_with_a_workload_hands_over_like_an_istio_one(tmp_path):
    """The workload is not tied to a router: on a Gateway API HTTPRoute the release is
    carried through the same way (canary sized, template copied, traffic returned)."""
    from canary.routers.gateway import GatewayRouter
    from tests.test_shapes import ROUTE, gateway_target

    async with cluster(tmp_path, dr=SUBSETS) as (kube, api):
        await setup(kube)
        kube.put("httproutes", NS, copy.deepcopy(ROUTE))
        t = gateway_target(workload=WORKLOAD)
        router = GatewayRouter(t, api)
        async with controller(tmp_path, policies=[simple_policy(hold=0.3, interval=0.1)],
                              target=t, router=router) as (http, ctl, _t):
            ctl.workloads = {"web": Workloads(NS, WORKLOAD, api, "web")}
            r = await http.start(canary_version="v2")
            assert r["promotion"] == "return"
            r = await http.until(r["id"], lambda x: x["state"] == "succeeded")
            assert await router.get_weight() == 0, "traffic back on the stable backend"
            stable = kube.get("deployments", NS, "api-stable")
            assert stable["spec"]["template"]["spec"]["containers"][0]["image"] == "api:v2"

            async def scaled_down() -> bool:
                return replicas(kube, "api-canary") == 0
            await eventually(scaled_down, what="canary Deployment scaled to 0")
            _, tv = await http.call("GET", "/api/v1/targets/web", role="viewer")
            assert tv["workload"] == {"stable": "api-stable", "canary": "api-canary"}
            assert tv["destinations"]["canary"] == {"service": "shop-canary", "port": "8080"}
        assert kube.invalid == []
