"""The Helm chart, rendered by the real Helm engine (helm-python-sdk), every manifest
checked against Kubernetes' own schemas (kubernetes-validate), and its RBAC compared with
the API calls canary really makes."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from canary import policy as policy_mod
from canary.cli import validate_files
from canary.engine import decide
from canary.errors import Conflict
from canary.kube import api_client
from canary.leader import LeaderElector
from canary.model import Sides
from canary.routers.gateway import GatewayRouter
from canary.routers.istio import IstioRouter
from canary.shapes import Shape
from canary.store.kubernetes import KubernetesStore
from canary.workload import Workloads
from tests.helpers import eventually, simple_policy, tokens
from tests.kubeapi import KubeApiDouble
from tests.test_istio import DR, NS, VS, target

CHART = Path(__file__).resolve().parent.parent / "charts" / "canary"
K8S_VERSION = "1.30.0"
TARGETS = {"shop": {"router": "gateway", "namespace": "prod", "http_route": "shop",
                    "rule": "primary", "stable": {"name": "shop-stable", "port": 8080},
                    "canary": {"name": "shop-canary", "port": 8080}, "policy": "standard",
                    "vars": {"service": "shop"}},
           "api": {"router": "istio", "namespace": "prod", "virtual_service": "api",
                   "route": "primary",
                   "stable": {"host": "api.prod.svc.cluster.local", "subset": "stable"},
                   "canary": {"host": "api.prod.svc.cluster.local", "subset": "canary"},
                   "policy": "standard", "vars": {"service": "api"}}}
VARIANTS = {
    "default": {"config": {"targets": TARGETS}},
    "ha-monitored": {"replicaCount": 3, "serviceMonitor": {"enabled": True},
                     "rbac": {"istioNamespaces": ["prod", "staging"]},
                     "config": {"targets": TARGETS}},
    "single": {"replicaCount": 1, "config": {"targets": TARGETS}},
    # every shipped policy (their key is their name) and more of the controller config
    "every-policy": {
        "config": {"targets": TARGETS,
                   "prometheus": {"url": "https://prometheus.monitoring.svc:9090",
                                  "timeout": "5s", "concurrency": 4,
                                  "headers": {"X-Scope-OrgID": "shop"}}},
        "policies": {p.stem: {k: v for k, v in yaml.safe_load(p.read_text()).items()
                              if k != "name"}
                     for p in sorted((CHART.parent.parent / "policies").glob("*.yaml"))}},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name="canary", namespace="canary-system", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.e2e
def test_the_chart_lints_clean():
    for values in VARIANTS.values():
        report = helm.lint(str(CHART), values, strict=True)
        assert not report.get("errors"), report
        assert not [m for m in report.get("messages", []) if m["severity"] >= 2], report


@pytest.mark.e2e
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_manifest_passes_kubernetes_schemas(variant):
    docs = render(VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding",
            "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no schema ships with Kubernetes
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["endpoints"][0]["path"] == "/metrics"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    replicas = VARIANTS[variant].get("replicaCount", 2)
    assert by_kind(docs, "Deployment")[0]["spec"]["replicas"] == replicas
    assert len(by_kind(docs, "PodDisruptionBudget")) == (1 if replicas > 1 else 0)


def test_the_pod_runs_locked_down_with_probes_and_an_identity():
    deploy = by_kind(render(VARIANTS["default"]), "Deployment")[0]
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} \
        in c["env"]
    secret = next(v for v in pod["volumes"] if v["name"] == "tokens")
    assert secret["secret"]["secretName"] == "canary-tokens"


@pytest.mark.parametrize("variant", ["ha-monitored", "every-policy"])
def test_the_rendered_controller_config_and_policies_pass_canary_validate(tmp_path, variant):
    docs = render(VARIANTS[variant])
    maps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    config = yaml.safe_load(maps["canary-config"]["data"]["canary.yaml"])
    assert config["state"] == "kubernetes:canary-system"
    assert config["leader_election"]["name"] == "canary-leader"
    pdir = tmp_path / "policies"
    pdir.mkdir()
    for name, text in maps["canary-policies"]["data"].items():
        (pdir / name).write_text(text)
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump([
        {"name": t.name, "sha256": t.sha256, "role": t.role.name.lower()} for t in tokens()]))
    config["policies"] = str(pdir)
    config["auth"]["tokens_file"] = str(tmp_path / "tokens.yaml")
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump(config))
    assert [str(p) for p in validate_files([str(tmp_path / "canary.yaml")])] == []
    shipped = yaml.safe_load((CHART.parent.parent / "policies" / "standard.yaml").read_text())
    assert yaml.safe_load(maps["canary-policies"]["data"]["standard.yaml"]) == shipped


@pytest.mark.parametrize("values,words", [
    ({"replicaCount": "two"}, "replicaCount"),
    ({"config": {"state": "sqlite:x.db"}}, "config"),
    ({"auth": {"existingSecret": ""}}, "existingSecret"),
    ({"leaderElection": {"leaseDuration": "soon"}}, "leaseDuration"),
    # the chart sets these itself: one written in values would be silently replaced
    ({"config": {"leader_election": {"name": "x"}}}, "'leader_election' not allowed"),
    ({"policies": {"fast": {"name": "slow", "stages": [{"weight": 100, "hold": "1m"}]}}},
     "at '/policies/fast': additional properties 'name' not allowed"),
    ({"policies": {"my policy": {"stages": [{"weight": 100, "hold": "1m"}]}}},
     "'my policy' does not match pattern"),
    # a receiver needs url or url_env (its URL from a Secret, through extraEnv)
    ({"config": {"targets": TARGETS, "notifications": [{"name": "chat"}]}},
     "missing property 'url_env'"),
])
def test_the_values_schema_refuses_bad_values(values, words):
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError) as e:
        chart.render(values, name="canary", namespace="canary-system", is_install=True)
    assert words in str(e.value)


def standard_with(**change: Any) -> dict[str, Any]:
    """The chart's default policy with one stage field changed: `stage=1, weight=150`."""
    policy = copy.deepcopy(helm.Chart.load(str(CHART)).values["policies"]["standard"])
    stage = change.pop("stage")
    policy["stages"][stage].update(change)
    return {"config": {"targets": TARGETS}, "policies": {"standard": policy}}


@pytest.mark.parametrize("values,said", [
    ({"config": {"targets": TARGETS, "prometheus": {"timout": "5s"}}},
     "- at '/config/prometheus': additional properties 'timout' not allowed"),
    (standard_with(stage=1, weight=150),
     "- at '/policies/standard/stages/1/weight': maximum: got 150, want 100"),
    (standard_with(stage=0, hold="2 minutes"),
     "- at '/policies/standard/stages/0/hold': '2 minutes' does not match pattern"),
])
def test_helm_lint_and_install_refuse_a_config_canary_would_refuse(values, said):
    """The three mistakes that used to render, pass `helm lint --strict`, and then
    crash-loop the pod: each is now refused by helm, naming the field."""
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError) as e:
        chart.render(values, name="canary", namespace="canary-system", is_install=True)
    assert said in str(e.value)
    report = helm.lint(str(CHART), values, strict=True)
    assert any(said in error for error in report["errors"]), report


def test_the_chart_defaults_render_once_a_target_is_given():
    """canary refuses a config without targets, so the chart does too, at install; the
    defaults plus one target render and lint clean."""
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError) as e:
        chart.render({}, name="canary", namespace="canary-system", is_install=True)
    assert "- at '/config/targets': minProperties: got 0, want 1" in str(e.value)
    docs = render({"config": {"targets": TARGETS}})
    config = yaml.safe_load(next(d for d in by_kind(docs, "ConfigMap")
                                 if d["metadata"]["name"] == "canary-config")
                            ["data"]["canary.yaml"])
    assert config["prometheus"] == chart.values["config"]["prometheus"]
    assert not helm.lint(str(CHART), {"config": {"targets": TARGETS}}, strict=True)["errors"]


async def used_verbs(tmp_path: Path) -> set[tuple[str, str, str]]:
    """Drive every Kubernetes code path canary has against the API double and collect
    (apiGroup, resource, verb) of each request."""
    kube = KubeApiDouble()
    await kube.start()
    kube.put("virtualservices", NS, VS)
    kube.put("destinationrules", NS, DR)
    api = api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
    try:
        store = KubernetesStore("canary-system", api)
        r = decide.start(rollout_id="r1", target="web", policy=simple_policy(),
                         canary_version="v2", stable_version="v1", now=time.time(), actor="t")
        r = await store.create(rollout=r)
        with pytest.raises(Conflict):  # a losing start cleans up after itself
            await store.create(rollout=decide.start(
                rollout_id="r2", target="web", policy=simple_policy(), canary_version="v3",
                stable_version="v1", now=time.time(), actor="t"))
        r = await store.save(rollout=await store.load(r.id), expected_version=r.version)
        await store.list(active_only=True)
        await store.ping()
        router = IstioRouter(target(), api)
        await router.check()
        await router.set_weight(10)
        await router.get_weight()
        from tests.test_shapes import ROUTE, gateway_target
        kube.put("httproutes", NS, ROUTE)
        gw = GatewayRouter(gateway_target(), api)
        await gw.check()
        await gw.set_weight(0, shape=Shape(mirror=10).key())
        await gw.get_shape()
        await gw.set_weight(10)
        await gw.get_weight()
        await store.save_sides("web", Sides())
        await store.sides("web")
        from tests.test_workload import WORKLOAD, deployment
        kube.put("deployments", NS, deployment("api-stable", "stable", "v1", 2))
        kube.put("deployments", NS, deployment("api-canary", "canary", "v2", 0))
        workloads = Workloads(NS, WORKLOAD, api, "web")
        await workloads.state("api-stable")
        await workloads.scale("api-canary", 1)
        await workloads.copy_template()
        assert kube.invalid == []

        async def nothing() -> None:
            return None

        elector = LeaderElector(api, "canary-system", "me", lease_duration=2, renew_deadline=1,
                                retry_period=0.1, on_start=nothing, on_stop=nothing)
        task = asyncio.create_task(elector.run())

        async def renewed() -> bool:  # acquired (create) and renewed (update) at least twice
            return len([v for v, _, p, _ in kube.requests if p == "leases" and v == "update"]) >= 2
        await eventually(renewed, what="lease renewals")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    finally:
        api.close()
        await kube.stop()
    return {(g, p, v) for v, g, p, _ in kube.requests}


@pytest.mark.e2e
async def test_rbac_grants_exactly_what_canary_uses(tmp_path):
    used = await used_verbs(tmp_path)
    for variant in ("default", "ha-monitored"):
        granted: set[tuple[str, str, str]] = set()
        for doc in render(VARIANTS[variant]):
            if doc["kind"] in ("Role", "ClusterRole"):
                for rule in doc["rules"]:
                    granted |= {(g, res, v) for g in rule["apiGroups"]
                                for res in rule["resources"] for v in rule["verbs"]}
        assert granted == used, (variant, sorted(granted - used), sorted(used - granted))


@pytest.mark.parametrize("variant,istio_in", [("default", {None}),
                                              ("ha-monitored", {"prod", "staging"})])
def test_rbac_reaches_the_mesh_cluster_wide_or_only_in_the_istio_namespaces(variant, istio_in):
    """VirtualServices and DestinationRules cluster-wide, or only in
    `rbac.istioNamespaces`; ConfigMaps and Leases only in the release's own namespace."""
    where: dict[str, set[str | None]] = {}
    for doc in render(VARIANTS[variant]):
        if doc["kind"] in ("Role", "ClusterRole"):
            ns = doc["metadata"].get("namespace") if doc["kind"] == "Role" else None
            for rule in doc["rules"]:
                for res in rule["resources"]:
                    where.setdefault(res, set()).add(ns)
    assert where["virtualservices"] == where["destinationrules"] == istio_in, where
    assert where["configmaps"] == where["leases"] == {"canary-system"}, where


# ---- Grafana dashboard and alerts (off by default) --------------------------------------

OBSERVED = {"config": {"targets": TARGETS},
            "grafana": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Canary"}}},
            "prometheusRule": {"enabled": True, "stuckPausedAfter": "90m"}}


def _exported_names() -> set[str]:
    """Every series name canary's /metrics can carry (canary/metrics.py)."""
    from canary.metrics import Metrics

    out: set[str] = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gauge": ("",)}.get(family.type, ("",))
        out.update(family.name + s for s in suffixes)
    return out


def test_the_dashboard_and_alerts_are_off_by_default_and_render_when_asked(tmp_path):
    import json
    import re
    import shutil
    import subprocess

    plain = render(VARIANTS["default"])
    assert not by_kind(plain, "PrometheusRule")
    assert not [d for d in by_kind(plain, "ConfigMap") if "grafana_dashboard" in
                d["metadata"].get("labels", {})]

    report = helm.lint(str(CHART), OBSERVED, strict=True)
    assert not report.get("errors"), report
    docs = render(OBSERVED)
    (board,) = [d for d in by_kind(docs, "ConfigMap")
                if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    kubernetes_validate.validate(board, K8S_VERSION, strict=True)
    assert board["metadata"]["annotations"] == {"grafana_folder": "Canary"}
    dashboard = json.loads(board["data"]["canary.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "canary.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10

    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"CanaryMissedIntervals", "CanaryRouterErrors",
                           "CanaryStateStoreFailing", "CanaryRolloutStuckPaused"}
    assert alerts["CanaryRolloutStuckPaused"]["expr"].endswith("> 5400"), "90m in seconds"

    # every metric either one names is one canary exports
    names = set(re.findall(r"\bcanary_[a-z0-9_]+", " ".join(
        exprs + [r["expr"] for r in alerts.values()])))
    assert names and names <= _exported_names(), names - _exported_names()
    for needed in ("canary_missed_intervals_total", "canary_router_errors_total",
                   "canary_store_writable", "canary_rollout_paused_since_timestamp_seconds"):
        assert needed in names

    promtool = shutil.which("promtool")
    if promtool:  # Prometheus's own checker, when Debian's prometheus brought it
        path = tmp_path / "canary-rules.yaml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_secrets_the_config_names_reach_the_pod_from_a_secret():
    """A notification's secret_env and Prometheus's basic_auth.password_env name an
    environment variable: the chart puts it in the container from a Secret (extraEnv,
    envFrom), so the secret is in neither the values nor the config's ConfigMap."""
    values = {"config": {"targets": TARGETS,
                         "notifications": [{"name": "ops", "url": "https://ops.internal/c",
                                            "secret_env": "CANARY_NOTIFY_SECRET"}]},
              "extraEnv": [{"name": "CANARY_NOTIFY_SECRET", "valueFrom": {
                  "secretKeyRef": {"name": "canary-notify", "key": "hmac"}}}],
              "envFrom": [{"secretRef": {"name": "canary-prometheus"}}]}
    docs = render(values)
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    c = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert values["extraEnv"][0] in c["env"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} \
        in c["env"]
    assert c["envFrom"] == values["envFrom"]
    assert not helm.lint(str(CHART), values, strict=True)["errors"]
    assert "envFrom" not in by_kind(render(VARIANTS["default"]), "Deployment")[0]["spec"][
        "template"]["spec"]["containers"][0]
    with pytest.raises(helm.HelmError) as e:
        render({"config": {"targets": TARGETS}, "extraEnv": [{"value": "x"}]})
    assert "name" in str(e.value)


def test_a_tiny_number_given_through_the_chart_reaches_canary_as_the_number():
    """helm writes every number below 1e-6 with an exponent and no dot (`5e-07`), which
    YAML 1.1 reads as text: the rendered policy was refused by canary (the pod would
    crash-loop) though helm had accepted the value."""
    values = standard_with(stage=0)
    policy = values["policies"]["standard"]
    policy["gates"] = [*policy.get("gates", []),
                       {"name": "tiny", "query": "vector(0)", "max": 5e-7}]
    docs = render(values)
    text = next(d for d in by_kind(docs, "ConfigMap")
                if d["metadata"]["name"] == "canary-policies")["data"]["standard.yaml"]
    assert "max: 5e-07" in text  # the form helm writes
    pol = policy_mod.parse(text, file="standard.yaml", default_name="standard")
    assert next(g for g in pol.gates if g.name == "tiny").max == 5e-7
