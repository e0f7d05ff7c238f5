"""The Istio router against a wire-level Kubernetes API double (tests/kubeapi.py) that the
real `kubernetes` client reaches through a generated kubeconfig: weights move stage by
stage, nothing else in the VirtualService changes, concurrent edits survive, and a
rollout that cannot work is refused before its first step."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from canary.kube import api_client
from canary.routers.istio import IstioRouter
from canary.targets import IstioDestination, IstioTarget
from tests.helpers import SetSource, controller, eventually, simple_policy
from tests.kubeapi import KubeApiDouble

NS = "prod"
HOST = "api.prod.svc.cluster.local"

VS: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
    "metadata": {"name": "api", "namespace": NS, "labels": {"team": "payments"},
                 "annotations": {"owner": "sre"}},
    "spec": {
        "hosts": [HOST], "gateways": ["mesh"],
        "http": [
            {"name": "admin", "match": [{"uri": {"prefix": "/admin"}}],
             "route": [{"destination": {"host": "admin.prod.svc.cluster.local"}}]},
            {"name": "primary",
             "match": [{"headers": {"x-tenant": {"exact": "a"}}}, {"uri": {"prefix": "/"}}],
             "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
             "timeout": "10s",
             "headers": {"request": {"set": {"x-routed-by": "mesh"}}},
             "mirror": {"host": "shadow.prod.svc.cluster.local"},
             "mirrorPercentage": {"value": 5.0},
             "route": [{"destination": {"host": HOST, "subset": "stable", "port": {"number": 80}},
                        "weight": 100, "headers": {"response": {"add": {"x-v": "stable"}}}},
                       {"destination": {"host": HOST, "subset": "canary", "port": {"number": 80}},
                        "weight": 0}]},
        ],
    },
}
DR: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
    "metadata": {"name": "api", "namespace": NS},
    "spec": {"host": "api", "subsets": [{"name": "stable", "labels": {"version": "v1"}},
                                        {"name": "canary", "labels": {"version": "v2"}}]},
}


def target(**kw: Any) -> IstioTarget:
    base: dict[str, Any] = dict(name="web", namespace=NS, virtual_service="api", route="primary",
                                stable=IstioDestination(HOST, "stable"),
                                canary=IstioDestination(HOST, "canary"), policy="p",
                                vars={"service": "api"}, stable_version="v1")
    base.update(kw)
    return IstioTarget(**base)


def weights(kube: KubeApiDouble) -> list[int]:
    vs = kube.get("virtualservices", NS, "api")
    return [d.get("weight") for d in vs["spec"]["http"][1]["route"]]


def without_weights(vs: dict[str, Any]) -> dict[str, Any]:
    vs = copy.deepcopy(vs)
    vs["metadata"].pop("resourceVersion", None)
    for d in vs["spec"]["http"][1]["route"]:
        d.pop("weight", None)
    return vs


@asynccontextmanager
async def cluster(tmp_path, *, vs: dict[str, Any] | None = VS,
                  dr: dict[str, Any] | None = DR) -> AsyncIterator[tuple[KubeApiDouble, Any]]:
    kube = KubeApiDouble()
    await kube.start()
    try:
        if vs is not None:
            kube.put("virtualservices", NS, vs)
        if dr is not None:
            kube.put("destinationrules", NS, dr)
        api = api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")), user_agent="canary-test")
        try:
            yield kube, api
        finally:
            api.close()
    finally:
        await kube.stop()


@pytest.mark.e2e
async def test_weights_move_stage_by_stage_and_nothing_else_in_the_object_changes(tmp_path):
    async with cluster(tmp_path) as (kube, api):
        t = target()
        async with controller(tmp_path, policies=[simple_policy(hold=0.3)], target=t,
                              router=IstioRouter(t, api)) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            seen = []
            for w in (10, 50, 100):
                await http.until(rid, lambda r, w=w: r["applied_weight"] == w)
                seen.append(weights(kube))
            await http.until(rid, lambda r: r["state"] == "succeeded")
        assert seen == [[90, 10], [50, 50], [0, 100]]
        after = kube.get("virtualservices", NS, "api")
        assert without_weights(after)["spec"] == without_weights(VS)["spec"]
        assert after["spec"]["http"][0] == VS["spec"]["http"][0]
        assert {k: v for k, v in after["spec"]["http"][1].items() if k != "route"} == \
            {k: v for k, v in VS["spec"]["http"][1].items() if k != "route"}
        assert after["metadata"]["labels"] == VS["metadata"]["labels"]
        assert after["metadata"]["annotations"] == VS["metadata"]["annotations"]
        writers = {ua for _, method, plural, _, ua in kube.writes if plural == "virtualservices"}
        assert writers == {"canary-test"}


async def test_an_edit_made_between_read_and_write_is_never_overwritten(tmp_path):
    async with cluster(tmp_path) as (kube, api):
        edited = []

        def someone_else_edits(method: str, plural: str, name: str) -> None:
            if plural == "virtualservices" and method == "PUT" and not edited:
                vs = kube.get("virtualservices", NS, "api")
                vs["spec"]["http"][0]["timeout"] = "3s"  # an SRE's change, landing first
                kube.put("virtualservices", NS, vs)
                edited.append(True)

        kube.before_write = someone_else_edits
        router = IstioRouter(target(), api)
        await router.set_weight(25)
        vs = kube.get("virtualservices", NS, "api")
        assert edited and vs["spec"]["http"][0]["timeout"] == "3s"
        assert weights(kube) == [75, 25]


async def test_a_breach_rolls_back_to_all_stable(tmp_path):
    async with cluster(tmp_path) as (kube, api):
        t = target()
        async with controller(tmp_path, policies=[simple_policy(hold=0.3)], target=t,
                              router=IstioRouter(t, api), source=SetSource(0.5)) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            r = await http.until(rid, lambda r: r["state"] == "rolled_back")
        assert "gate errors" in r["reason"]
        assert weights(kube) == [100, 0]


@pytest.mark.e2e
async def test_api_server_errors_are_retried_and_a_rollback_still_lands(tmp_path):
    async with cluster(tmp_path) as (kube, api):
        t = target()
        source = SetSource(0.0)
        async with controller(tmp_path, policies=[simple_policy(hold=3600)], target=t,
                              router=IstioRouter(t, api), source=source) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            await http.until(rid, lambda r: r["applied_weight"] == 10)
            kube.fail_next.extend([500, 500, 500])
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "x"},
                                        role="pipeline")
            assert status == 200
            r = await http.until(rid, lambda r: r["state"] == "rolled_back", deadline=30)
            assert any(e["type"] == "router_error" and "500" in e["message"] for e in r["events"])
        assert weights(kube) == [100, 0]


@pytest.mark.parametrize("change,status,words", [
    ({"vs": None}, 404, "VirtualService prod/api not found"),
    ({"target": {"route": "nope"}}, 404, "no http route named 'nope'"),
    ({"target": {"canary": IstioDestination(HOST, "canary2")}}, 400,
     "no destination for the canary version"),
    ({"dr": None}, 400, "no DestinationRule in prod defines subset 'stable'"),
])
async def test_a_rollout_that_cannot_work_is_refused_before_its_first_step(tmp_path, change,
                                                                          status, words):
    async with cluster(tmp_path, vs=change.get("vs", VS), dr=change.get("dr", DR)) as (kube, api):
        t = target(**change.get("target", {}))
        before = dict(kube.objects)
        async with controller(tmp_path, policies=[simple_policy()], target=t,
                              router=IstioRouter(t, api)) as (http, _c, _t):
            got, data = await http.call("POST", "/api/v1/rollouts",
                                        {"target": "web", "canary_version": "v2"},
                                        role="pipeline")
            assert got == status and words in data["error"], data
            _, listing = await http.call("GET", "/api/v1/rollouts", role="viewer")
            assert listing["rollouts"] == []
        assert kube.objects == before


async def test_the_double_enforces_istios_schema_like_an_api_server(tmp_path):
    import asyncio

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    async with cluster(tmp_path) as (kube, api):
        custom = client.CustomObjectsApi(api)
        args = ("networking.istio.io", "v1", NS, "virtualservices", "api")

        async def call(fn, *more, **kw):  # the client blocks; the double runs on this loop
            return await asyncio.to_thread(fn, *args, *more, **kw)

        bad = kube.get("virtualservices", NS, "api")
        bad["spec"]["http"][1]["route"][0]["weight"] = "half"
        with pytest.raises(ApiException) as e:
            await call(custom.replace_namespaced_custom_object, bad)
        assert e.value.status == 422 and "weight" in e.value.body
        stale = kube.get("virtualservices", NS, "api")
        kube.put("virtualservices", NS, kube.get("virtualservices", NS, "api"))
        with pytest.raises(ApiException) as e:
            await call(custom.replace_namespaced_custom_object, stale)
        assert e.value.status == 409
        patched = await call(custom.patch_namespaced_custom_object,
                             [{"op": "replace", "path": "/spec/http/0/name", "value": "admin2"}],
                             _content_type="application/json-patch+json")
        assert patched["spec"]["http"][0]["name"] == "admin2"
        patched = await call(custom.patch_namespaced_custom_object,
                             {"metadata": {"labels": {"team": None, "tier": "1"}}},
                             _content_type="application/merge-patch+json")
        assert patched["metadata"]["labels"] == {"tier": "1"}


@pytest.mark.e2e
async def test_a_rollback_decided_while_the_store_is_full_is_kept_in_the_virtualservice(tmp_path):
    """docs/guarantees.md section 9 on Istio: weight 0 and a `canary.dev/decision`
    annotation; a controller restarted after the store is back records the rollback and
    the next write removes the annotation."""
    from canary.store.sqlite import SqliteStore
    from tests.test_store_faults import fill, mounted_tmpfs

    with mounted_tmpfs(tmp_path / "fs") as fs:
        async with cluster(tmp_path) as (kube, api):
            t = target()
            source = SetSource(0.0)
            pol = simple_policy(hold=30.0, interval=0.2)
            async with controller(tmp_path, policies=[pol], target=t, source=source,
                                  router=IstioRouter(t, api),
                                  store=SqliteStore(str(fs / "state.db"))) as (http, _c, _t):
                rid = (await http.start(canary_version="v2"))["id"]
                await http.until(rid, lambda r: r["applied_weight"] == 10)
                filler = fill(fs)
                source.value = 0.5

                async def zeroed() -> bool:
                    return weights(kube) == [100, 0]
                await eventually(zeroed, what="VirtualService at weight 0")
                vs = kube.get("virtualservices", NS, "api")
                assert vs["metadata"]["annotations"]["canary.dev/decision"].startswith(
                    f"rollback {rid}: gate errors")
                assert vs["metadata"]["annotations"]["owner"] == "sre"
            filler.unlink()
            async with controller(tmp_path, policies=[pol], target=t, source=source,
                                  router=IstioRouter(t, api),
                                  store=SqliteStore(str(fs / "state.db"))) as (http, _c, _t):
                r = await http.until(rid, lambda r: r["state"] == "rolled_back")
                assert "state store" in r["reason"]
                rid2 = (await http.start(canary_version="v3"))["id"]
                await http.until(rid2, lambda r: r["applied_weight"] == 10)
                vs = kube.get("virtualservices", NS, "api")
                assert vs["metadata"]["annotations"] == {"owner": "sre"}
