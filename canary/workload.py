"""The Deployment pair of a Kubernetes target (`workload:`): read them, scale the canary,
copy its pod template to the stable one. The only module that calls the apps/v1 API;
its calls run on a pool of their own, bounded like every Kubernetes call.

What a Deployment's state means is decided by the pure functions at the top, so the
controller's rules are tested without a cluster.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from canary import kube
from canary.errors import RouterError
from canary.executors import Pool
from canary.targets import Workload


@dataclass(frozen=True)
class DeploymentState:
    name: str
    version: str | None   # the pod template's version label
    replicas: int         # spec.replicas
    updated: int
    available: int
    observed: bool        # the Deployment controller has seen the latest spec

    @property
    def rolled_out(self) -> bool:
        """Every replica runs the latest template and is available (as `kubectl rollout
        status` decides)."""
        return (self.observed and self.updated >= self.replicas
                and self.available >= self.replicas)

    def describe(self) -> str:
        return (f"Deployment {self.name}: version {self.version or '(no label)'}, "
                f"{self.available}/{self.replicas} available, {self.updated} updated"
                + ("" if self.observed else ", latest spec not yet observed"))


def state_of(dep: dict[str, Any], label: str) -> DeploymentState:
    meta = dep.get("metadata") or {}
    spec = dep.get("spec") or {}
    st = dep.get("status") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    return DeploymentState(
        name=str(meta.get("name")), version=labels.get(label),
        replicas=int(spec.get("replicas", 1)), updated=int(st.get("updatedReplicas", 0)),
        available=int(st.get("availableReplicas", 0)),
        observed=int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 0)))


def canary_replicas(stable_replicas: int, weight: int) -> int:
    """The canary's share of the stable side's replicas at `weight`, at least 1."""
    return max(1, math.ceil(stable_replicas * weight / 100))


def ready_for(canary: DeploymentState, version: str, replicas: int) -> str | None:
    """None when the canary Deployment can take traffic: it runs `version` and `replicas`
    of its pods are up to date and available; else what is missing."""
    if canary.version != version:
        return f"{canary.describe()}; its pod template must be labelled {version}"
    if not canary.observed or canary.updated < replicas or canary.available < replicas:
        return f"{canary.describe()}; waiting for {replicas} available"
    return None


def stable_template(canary: dict[str, Any], stable: dict[str, Any]) -> dict[str, Any]:
    """The canary's pod template for the stable Deployment: the stable Deployment's own
    selector labels are kept, so it still owns its pods and its subset still matches."""
    template = copy.deepcopy((canary.get("spec") or {}).get("template") or {})
    selector = (((stable.get("spec") or {}).get("selector") or {}).get("matchLabels") or {})
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **selector}
    return template


class Workloads:
    def __init__(self, namespace: str, workload: Workload, api: Any, name: str) -> None:
        self.namespace = namespace
        self.workload = workload
        self._api = api
        self._pool = Pool(f"kube-workload-{name}"[:40], 2)

    def _apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self._api)

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", kube.REQUEST_TIMEOUT)
        try:
            return await self._pool.run(fn, *args, **kwargs)
        except Exception as e:  # ApiException, urllib3 and socket errors
            raise kube.describe(e, what) from e

    def _what(self, name: str) -> str:
        return f"Deployment {self.namespace}/{name}"

    async def read(self, name: str) -> dict[str, Any]:
        resp = await self._call(self._what(name), self._apps().read_namespaced_deployment,
                                name, self.namespace, _preload_content=False)
        data: dict[str, Any] = json.loads(resp.data)
        return data

    async def state(self, name: str) -> DeploymentState:
        return state_of(await self.read(name), self.workload.version_label)

    async def scale(self, name: str, replicas: int) -> None:
        await self._call(self._what(name) + " scale",
                         self._apps().patch_namespaced_deployment_scale, name, self.namespace,
                         {"spec": {"replicas": replicas}},
                         _content_type="application/merge-patch+json", _preload_content=False)

    async def copy_template(self) -> None:
        """The canary's pod template onto the stable Deployment, guarded by the stable
        Deployment's resourceVersion (a concurrent edit is a 409, retried next time)."""
        canary = await self.read(self.workload.canary)
        stable = await self.read(self.workload.stable)
        rv = (stable.get("metadata") or {}).get("resourceVersion")
        patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                 {"op": "replace", "path": "/spec/template",
                  "value": stable_template(canary, stable)}]
        await self._call(self._what(self.workload.stable),
                         self._apps().patch_namespaced_deployment, self.workload.stable,
                         self.namespace, patch, _content_type="application/json-patch+json",
                         _preload_content=False)

    async def check(self) -> None:
        """Both Deployments exist (before a start)."""
        for name in (self.workload.stable, self.workload.canary):
            try:
                await self.read(name)
            except RouterError:
                raise
