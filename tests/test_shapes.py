"""Traffic shapes (interface.md section 7): a rollout that starts with a header/cookie
stage, then a mirror stage, then weights, on Istio and the Gateway API (the wire-level API
double, every write checked against the CRD's schema and CEL rules, requests routed by a
test mesh reading the live object) and on real nginx; rollback from each shape leaves the
user's route exactly as they wrote it, and removing canary's match rule is drift."""

from __future__ import annotations

import copy
import subprocess
from collections import Counter
from typing import Any

import aiohttp
import pytest

from canary import policy as policy_mod
from canary.demo.procs import Nginx, free_port
from canary.demo.service import Service
from canary.errors import ValidationFailed
from canary.gates.kinds import ThresholdGate
from canary.policy import NoData, Policy
from canary.routers.gateway import GatewayRouter
from canary.routers.istio import IstioRouter
from canary.routers.nginx import NginxRouter, render_all
from canary.stages import Match, MatchStage, MirrorStage, Stage
from canary.targets import GatewayBackend, GatewayTarget, NginxTarget
from tests.helpers import controller, eventually
from tests.mesh import Mesh
from tests.test_istio import DR, NS, VS, cluster, target

ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
    "metadata": {"name": "shop", "namespace": NS, "labels": {"team": "shop"}},
    "spec": {
        "parentRefs": [{"name": "public", "namespace": "gateways"}],
        "hostnames": ["shop.example.com"],
        "rules": [
            {"name": "admin", "matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
             "backendRefs": [{"name": "admin", "port": 80}]},
            {"name": "primary",
             "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
             "filters": [{"type": "RequestHeaderModifier",
                          "requestHeaderModifier": {"set": [{"name": "x-via", "value": "gw"}]}}],
             "backendRefs": [{"name": "shop-stable", "port": 8080, "weight": 100},
                             {"name": "shop-canary", "port": 8080, "weight": 0}]},
        ],
    },
}
VS_PLAIN = copy.deepcopy(VS)  # the primary route without a mirror of its own
for _k in ("mirror", "mirrorPercentage"):
    VS_PLAIN["spec"]["http"][1].pop(_k)

SHAPED = """
stages:
  - match:
      headers: {x-beta: "true"}
      cookies: {canary: always}
    hold: 10m
  - mirror: 100
    hold: 5m
  - weight: 5
    hold: 2m
  - weight: 100
    hold: 2m
"""


def gateway_target(**kw: Any) -> GatewayTarget:
    base: dict[str, Any] = dict(name="web", namespace=NS, http_route="shop", rule="primary",
                                stable=GatewayBackend("shop-stable", 8080),
                                canary=GatewayBackend("shop-canary", 8080), policy="p",
                                vars={"service": "shop"}, stable_version="v1")
    base.update(kw)
    return GatewayTarget(**base)


def shaped_policy(*, approval: bool = True, mirror: int = 50) -> Policy:
    """Header+cookie, then mirror, then 50 and 100; each stage waits for a promote so a
    test can look at it."""
    return Policy(name="p", interval=0.2, failure_limit=2, no_data=NoData.HOLD,
                  progress_deadline=60.0,
                  stages=(MatchStage(Match(headers={"x-beta": "true"},
                                           cookies={"canary": "always"}), 0.3,
                                     approval=approval),
                          MirrorStage(mirror, 0.3, approval=approval),
                          Stage(50, 0.3, approval=approval), Stage(100, 0.3)),
                  gates=(ThresholdGate("errors", 'errors{svc="{{ service }}"}', max=0.05),))


# ---- the policy file ----------------------------------------------------------------


def test_a_policy_with_header_mirror_and_weight_stages_reads_back_as_itself():
    pol = policy_mod.parse(SHAPED, file="shaped.yaml", default_name="shaped")
    assert [s.weight for s in pol.stages] == [0, 0, 5, 100]
    assert pol.stages[0].shape.text() == "match cookie canary = 'always' and header x-beta = 'true'"
    assert policy_mod.from_dict(pol.to_dict()) == pol


@pytest.mark.parametrize("stages, field, words", [
    ("- match: {headers: {x-id: {regex: 'a('}}}\n    hold: 1m", "stages[0].match.headers.x-id",
     "does not compile"),
    ("- match: {headers: {x-beta: true}}\n    hold: 1m", "stages[0].match.headers.x-beta",
     "quote it"),
    ("- match: {headers: {x-id: {suffix: '1'}}}\n    hold: 1m", "stages[0].match.headers.x-id",
     "prefix or regex"),
    ("- match: {}\n    hold: 1m", "stages[0].match", "at least one header or cookie"),
    ("- mirror: 0\n    hold: 1m", "stages[0].mirror", "from 1 to 100"),
    ("- weight: 5\n    mirror: 5\n    hold: 1m", "stages[0].weight", "exactly one of"),
    ("- weight: 5\n    hold: 1m\n  - mirror: 5\n    hold: 1m", "stages[1].mirror",
     "comes before every weight stage"),
])
def test_a_broken_stage_shape_is_named_with_how_to_fix_it(stages, field, words):
    text = f"stages:\n  {stages}\n  - weight: 100\n    hold: 1m\n"
    with pytest.raises(ValidationFailed) as e:
        policy_mod.parse(text, file="b.yaml", default_name="b")
    assert any(p.field == field and words in p.message for p in e.value.problems), \
        e.value.problems


UNPORTABLE = [r"(?=42)\d+", r"(?!x)\w+", r"(a)\1", r"(?P<n>a)(?P=n)", r"(?>a)b", r"a++",
              r"\N{EM DASH}", r"\u00e9", r"a\Z", r"(?x) a # note", r"(?a)\w+", r"(?#why)a",
              r"a{,3}",
              # too big for RE2 (a count over 1000, nested counts over 1000 in all) or for
              # nginx (a count over 65535, parentheses nested 250 deep)
              r"a{1001}", r"(a{10}){101}", r"(?:a{2,}){600}", r"a{1000000}",
              "(" * 300 + "a" + ")" * 300]
# (each at the edge of what validate refuses: RE2 and nginx -t must read them)
BIG_BUT_PORTABLE = [r"a{1000}", r"(a{10}){100}", r"(?:a{2,}){500}",
                    "(" * 100 + "a" + ")" * 100]
PORTABLE = [r"^42.*", r"(alice|bob)", r"\d{3,}", r"(?i)beta", r"(?s:a.b)", r"[(?=]+", r"\(\?=",
            r"[^]]", r"\x41+", r"\w+@\w+\.com", "é+", r"(?P<id>[0-9]+)", r"a{1,2}?", r"[+*]+",
            r'a"b\\', r"\bword\b", *BIG_BUT_PORTABLE]


@pytest.mark.parametrize("regex", UNPORTABLE)
def test_a_regex_some_router_cannot_read_is_refused_by_validate(regex):
    """Python's `re` reads these; nginx's PCRE2 or RE2 (istio, gateways) refuse them, so
    they would fail only at the stage (nginx -t) or at the API server."""
    text = (f"stages:\n  - match: {{headers: {{x-id: {{regex: '{regex}'}}}}}}\n    hold: 1m\n"
            "  - weight: 100\n    hold: 1m\n")
    with pytest.raises(ValidationFailed) as e:
        policy_mod.parse(text, file="b.yaml", default_name="b")
    assert [(p.line, p.field) for p in e.value.problems] == [(2, "stages[0].match.headers.x-id")]
    assert "not every router" in e.value.problems[0].message


def test_every_regex_validate_accepts_is_read_by_re2_and_by_real_nginx(tmp_path):
    import re2  # (google-re2, the engine of Envoy and of most gateways)

    for regex in PORTABLE:
        re2.compile(regex)  # raises on what RE2 refuses
    t = NginxTarget(name="web", file=tmp_path / "up.conf", server_file=tmp_path / "srv.conf",
                    upstream="web", stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                    test=("true",), reload=("true",), policy="p", vars={}, stable_version="v1")
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  include {t.file};\n  server {{\n    listen 127.0.0.1:{free_port()};\n"
        f"    include {t.server_file};\n"
        "    location / { proxy_pass http://$canary_web_upstream; }\n  }\n}\n")
    for regex in PORTABLE:
        stage = MatchStage(Match(headers={"x-id": {"regex": regex}}), 60.0)  # type: ignore[dict-item]
        http, server = render_all(t, 0, None, stage.shape.key())
        t.file.write_text(http)
        t.server_file.write_text(server or "")  # type: ignore[union-attr]
        said = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c",
                               str(tmp_path / "nginx.conf")], capture_output=True, text=True,
                              timeout=30)
        assert said.returncode == 0, (regex, said.stderr)


def test_a_header_named_twice_in_different_case_is_refused_not_dropped():
    text = ("stages:\n  - match: {headers: {X-Beta: \"true\", x-beta: \"false\"}}\n"
            "    hold: 1m\n  - weight: 100\n    hold: 1m\n")
    with pytest.raises(ValidationFailed) as e:
        policy_mod.parse(text, file="b.yaml", default_name="b")
    assert any(p.field.startswith("stages[0].match.headers") and "twice" in p.message
               for p in e.value.problems), e.value.problems


# ---- Kubernetes routers: header, then mirror, then weights ------------------------------


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for k in ("resourceVersion", "uid", "creationTimestamp"):
        obj["metadata"].pop(k, None)
    return obj


async def _promote(http: Any, rid: str) -> None:
    status, body = await http.call("POST", f"/api/v1/rollouts/{rid}/promote", {"reason": "looked"})
    assert status == 200, body


async def _walk(kube: Any, http: Any, plural: str, name: str, send: str) -> list[Any]:
    """Start the shaped rollout; at each stage count 200 requests per kind through the
    mesh reading the live object."""
    rid = (await http.start(canary_version="v2"))["id"]
    seen = []
    for stage in range(3):
        await http.until(rid, lambda r, s=stage: r["stage"] == s and r["state"] == "paused")
        obj = kube.get(plural, NS, name)
        mesh = Mesh({"stable": "v1", "canary": "v2", "shop-stable": "v1", "shop-canary": "v2",
                     "admin": "admin"})
        route = getattr(mesh, send)
        beta = Counter(route(obj, headers={"X-Beta": "true"}, cookies={"canary": "always"})
                       for _ in range(100))
        plain = Counter(route(obj, headers={"x-beta": "true"}) for _ in range(100))
        seen.append((dict(beta), dict(plain), dict(mesh.mirrored)))
        await _promote(http, rid)
    await http.until(rid, lambda r: r["state"] == "succeeded")
    return seen


EXPECTED = [
    # header and cookie: only requests with both reach the canary; nothing mirrored
    ({"v2": 100}, {"v1": 100}, {}),
    # mirror 50: every user answer from stable, half of the requests copied to the canary
    ({"v1": 100}, {"v1": 100}, {"v2": 100}),
    # weight 50
    ({"v1": 50, "v2": 50}, {"v1": 50, "v2": 50}, {}),
]


@pytest.mark.e2e
async def test_gateway_header_then_mirror_then_weights_route_requests_as_each_stage_says(tmp_path):
    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        original = _clean(kube.get("httproutes", NS, "shop"))
        t = gateway_target()
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=GatewayRouter(t, api)) as (http, _c, _t):
            assert await _walk(kube, http, "httproutes", "shop", "send_httproute") == EXPECTED
        writes = [p for k, p in kube.validated if k == "HTTPRoute"]
        assert len(writes) >= 4 and writes == [None] * len(writes)  # all schema- and CEL-valid
        assert kube.cel_checked >= len(writes)
        after = _clean(kube.get("httproutes", NS, "shop"))
        want = copy.deepcopy(original)
        for ref, w in zip(want["spec"]["rules"][1]["backendRefs"], (0, 100), strict=True):
            ref["weight"] = w
        assert after == want  # only the weights changed


@pytest.mark.e2e
async def test_istio_header_then_mirror_then_weights_route_requests_as_each_stage_says(tmp_path):
    async with cluster(tmp_path, vs=VS_PLAIN) as (kube, api):
        original = _clean(kube.get("virtualservices", NS, "api"))
        t = target()
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=IstioRouter(t, api)) as (http, _c, _t):
            seen = await _walk(kube, http, "virtualservices", "api", "send_virtualservice")
        assert seen == EXPECTED
        writes = [p for k, p in kube.validated if k == "VirtualService"]
        assert len(writes) >= 4 and writes == [None] * len(writes)
        after = _clean(kube.get("virtualservices", NS, "api"))
        want = copy.deepcopy(original)
        for d, w in zip(want["spec"]["http"][1]["route"], (0, 100), strict=True):
            d["weight"] = w
        assert after == want


@pytest.mark.e2e
@pytest.mark.parametrize("router", ["istio", "gateway"])
@pytest.mark.parametrize("abort_at", [0, 1])
async def test_rollback_from_a_match_or_mirror_stage_leaves_the_route_as_the_user_wrote_it(
        tmp_path, router, abort_at):
    async with cluster(tmp_path, vs=VS_PLAIN if router == "istio" else None,
                       dr=DR if router == "istio" else None) as (kube, api):
        if router == "gateway":
            kube.put("httproutes", NS, ROUTE)
            t: Any = gateway_target()
            r: Any = GatewayRouter(t, api)
            plural, name = "httproutes", "shop"
        else:
            t, plural, name = target(), "virtualservices", "api"
            r = IstioRouter(t, api)
        original = _clean(kube.get(plural, NS, name))
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=r) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            for _ in range(abort_at):
                await http.until(rid, lambda x: x["state"] == "paused")
                await _promote(http, rid)
            await http.until(rid, lambda x, s=abort_at: x["stage"] == s
                             and x["state"] == "paused")
            assert _clean(kube.get(plural, NS, name)) != original  # canary's addition is live
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                        {"reason": "enough"}, role="pipeline")
            assert status == 200
            await http.until(rid, lambda x: x["state"] == "rolled_back")
        assert _clean(kube.get(plural, NS, name)) == original


@pytest.mark.e2e
@pytest.mark.parametrize("abort_at", [0, 1])
@pytest.mark.parametrize("router", ["gateway", "istio"])
async def test_rollback_from_a_shape_keeps_backend_weights_as_the_user_wrote_them(
        tmp_path, abort_at, router):
    """A stable backendRef with no weight (the schema's default, 1; README: list both, the
    canary with weight 0), or an Istio canary destination with no weight, is as the user
    wrote it after a match or mirror stage, which never moves users' weight."""
    route, vs = copy.deepcopy(ROUTE), copy.deepcopy(VS_PLAIN)
    del route["spec"]["rules"][1]["backendRefs"][0]["weight"]
    del vs["spec"]["http"][1]["route"][1]["weight"]
    async with cluster(tmp_path, vs=vs if router == "istio" else None,
                       dr=DR if router == "istio" else None) as (kube, api):
        if router == "gateway":
            kube.put("httproutes", NS, route)
            t: Any = gateway_target()
            r: Any = GatewayRouter(t, api)
            plural, name = "httproutes", "shop"
        else:
            t, plural, name = target(), "virtualservices", "api"
            r = IstioRouter(t, api)
        original = _clean(kube.get(plural, NS, name))
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=r) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            for _ in range(abort_at):
                await http.until(rid, lambda x: x["state"] == "paused")
                await _promote(http, rid)
            await http.until(rid, lambda x, s=abort_at: x["stage"] == s
                             and x["state"] == "paused")
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                        {"reason": "enough"}, role="pipeline")
            assert status == 200
            await http.until(rid, lambda x: x["state"] == "rolled_back")
        assert _clean(kube.get(plural, NS, name)) == original


@pytest.mark.e2e
@pytest.mark.parametrize("router", ["gateway", "istio"])
async def test_requests_a_match_stage_sends_to_the_canary_keep_the_routes_rewrites_and_headers(
        tmp_path, router):
    """Matched requests go through the same filters, header changes, timeout and retries as
    the route's other requests: otherwise the canary is judged on requests users will
    never send it (a URLRewrite dropped: 404s at the canary, and a rollback)."""
    route = copy.deepcopy(ROUTE)
    route["spec"]["rules"][1]["filters"].append(
        {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                                                       "replacePrefixMatch": "/v2"}}})
    route["spec"]["rules"][1]["timeouts"] = {"request": "10s"}
    vs = copy.deepcopy(VS_PLAIN)
    vs["spec"]["http"][1]["rewrite"] = {"uri": "/v2"}
    async with cluster(tmp_path, vs=vs if router == "istio" else None,
                       dr=DR if router == "istio" else None) as (kube, api):
        if router == "gateway":
            kube.put("httproutes", NS, route)
            t: Any = gateway_target()
            r: Any = GatewayRouter(t, api)
        else:
            t = target()
            r = IstioRouter(t, api)
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=r) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            await http.until(rid, lambda x: x["stage"] == 0 and x["state"] == "paused")
        if router == "gateway":
            ours, driven = kube.get("httproutes", NS, "shop")["spec"]["rules"][1:3]
            assert ours["name"] == "canary-match"
            assert ours["filters"] == driven["filters"] and ours["timeouts"] == {"request": "10s"}
        else:
            ours, driven = (kube.get("virtualservices", NS, "api")["spec"]["http"][i]
                            for i in (0, 2))
            assert ours["name"] == "canary-match"
            for k in ("rewrite", "headers", "timeout", "retries"):
                assert ours[k] == driven[k], k


@pytest.mark.e2e
async def test_removing_canarys_match_rule_is_drift_and_is_not_fought(tmp_path):
    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        t = gateway_target()
        async with controller(tmp_path, policies=[shaped_policy(approval=False)], target=t,
                              router=GatewayRouter(t, api)) as (http, _c, _t):
            pol = shaped_policy(approval=False)
            _c.policies = {"p": Policy(**{**pol.__dict__, "stages": (
                MatchStage(Match(headers={"x-beta": "true"}), 20.0), Stage(100, 0.3))})}
            rid = (await http.start(canary_version="v2"))["id"]
            await http.until(rid, lambda x: x["stage_since"] is not None)
            live = kube.get("httproutes", NS, "shop")
            live["spec"]["rules"] = [r for r in live["spec"]["rules"]
                                     if r.get("name") != "canary-match"]
            kube.put("httproutes", NS, live)  # someone removes canary's rule
            r = await http.until(rid, lambda x: x["state"] == "paused")
            assert r["paused_for"] == "drift" and "canary-match" in r["reason"]
            assert not any(x.get("name") == "canary-match"
                           for x in kube.get("httproutes", NS, "shop")["spec"]["rules"])
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/resume",
                                        {"reason": "put it back"})
            assert status == 200

            async def back() -> bool:
                return any(x.get("name") == "canary-match"
                           for x in kube.get("httproutes", NS, "shop")["spec"]["rules"])
            await eventually(back, what="match rule re-applied after resume")


async def test_a_gateway_start_is_refused_naming_what_is_missing(tmp_path):
    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        for t, words in ((gateway_target(http_route="nope"), "HTTPRoute prod/nope not found"),
                         (gateway_target(rule="blue"), "no rule named 'blue'"),
                         (gateway_target(canary=GatewayBackend("shop-next", 8080)),
                          "no backendRef for the canary version (Service shop-next")):
            async with controller(tmp_path, policies=[shaped_policy()], target=t,
                                  router=GatewayRouter(t, api)) as (http, _c, _t):
                status, body = await http.call("POST", "/api/v1/rollouts",
                                               {"target": "web", "canary_version": "v2"},
                                               role="pipeline")
                assert status in (400, 404) and words in body["error"], body


@pytest.mark.e2e
async def test_a_backend_ref_naming_the_routes_own_namespace_is_the_one_canary_drives(tmp_path):
    """`namespace: prod` written out on a backendRef in namespace prod is the same Service;
    it was refused as "no backendRef for the stable version"."""
    route = copy.deepcopy(ROUTE)
    for ref in route["spec"]["rules"][1]["backendRefs"]:
        ref["namespace"] = NS
    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, route)
        t = gateway_target()
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=GatewayRouter(t, api)) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            await http.until(rid, lambda x: x["stage"] == 0 and x["state"] == "paused")
            await _promote(http, rid)
            await _promote(http, rid)
            await http.until(rid, lambda x: x["stage"] == 2 and x["state"] == "paused")
        refs = kube.get("httproutes", NS, "shop")["spec"]["rules"][1]["backendRefs"]
        assert [r["weight"] for r in refs] == [50, 50]


@pytest.mark.e2e
async def test_a_gateway_route_with_no_room_for_canarys_rule_is_refused_at_start(tmp_path):
    """An HTTPRoute has at most 16 rules: a match stage on a full one could never be
    written; the start is refused (400) before anything changes."""
    route = copy.deepcopy(ROUTE)
    route["spec"]["rules"][1:1] = [
        {"name": f"r{i}", "matches": [{"path": {"type": "PathPrefix", "value": f"/r{i}"}}],
         "backendRefs": [{"name": "admin", "port": 80}]} for i in range(14)]
    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, route)
        before = kube.get("httproutes", NS, "shop")
        t = gateway_target()
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=GatewayRouter(t, api)) as (http, _c, _t):
            status, body = await http.call("POST", "/api/v1/rollouts",
                                           {"target": "web", "canary_version": "v2"},
                                           role="pipeline")
            assert status == 400 and "16 rules" in body["error"], body
        assert kube.get("httproutes", NS, "shop") == before


@pytest.mark.parametrize("condition, value, wanted", [
    ({"prefix": "42"}, "42017", True), ({"prefix": "42"}, "1420", False),
    ({"regex": "alice|bob"}, "bob", True), ({"regex": "alice|bob"}, "alicexyz", False),
    ({"regex": "alice|bob"}, "xbob", False), ("true", "true", True)])
def test_gateway_header_matches_mean_the_whole_value_on_every_implementation(
        condition, value, wanted):
    """Gateway API leaves a RegularExpression's dialect and reach to the implementation:
    some match the whole value, some (nginx- or Go-based) find it anywhere. What canary
    writes means the same on both: README, "a regex matches the whole value"."""
    import re

    from canary.routers.gateway import header_matches

    stage = MatchStage(Match(headers={"x-id": condition}), 60.0)  # type: ignore[dict-item]
    (m,) = header_matches(stage.shape)
    if m["type"] == "Exact":
        assert (m["value"] == value) is wanted
    else:
        assert (re.fullmatch(m["value"], value) is not None) is wanted
        assert (re.search(m["value"], value) is not None) is wanted


# ---- nginx: real nginx on loopback ----------------------------------------------------


def _nginx_conf(nginx: Nginx, server_file: Any, t: NginxTarget) -> None:
    """nginx whose server block includes canary's server file and proxies to the upstream
    canary's map chooses (README: Traffic shapes), started on the files canary writes
    between rollouts."""
    nginx.write_conf()
    conf = nginx.conf.read_text()
    conf = conf.replace("        location / {\n            proxy_pass http://web;",
                        f"        include {server_file};\n        location / {{\n"
                        "            proxy_pass http://$canary_web_upstream;")
    nginx.conf.write_text(conf)
    http, server = render_all(t, 0, None, None)
    t.file.write_text(http)
    server_file.write_text(server or "")
    subprocess.run(nginx.argv(), check=True, capture_output=True, timeout=30)


async def _count(url: str, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    out: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for _ in range(n):
            async with s.get(url, headers=headers or {}) as r:
                await r.read()
                out[r.headers.get("X-Version", "?")] += 1
    return out


@pytest.mark.e2e
async def test_real_nginx_header_cookie_mirror_and_weights_and_rollback_restores_files(tmp_path):
    stable, canary = Service("web", "v1", free_port()), Service("web", "v2", free_port())
    nginx = Nginx(tmp_path / "nginx", free_port())
    server_file = nginx.dir / "canary-server.conf"
    t = NginxTarget(name="web", file=nginx.upstream_file, server_file=server_file,
                    upstream="web", stable=(f"127.0.0.1:{stable.port}",),
                    canary=(f"127.0.0.1:{canary.port}",), test=tuple(nginx.test_cmd),
                    reload=tuple(nginx.reload_cmd), policy="p", vars={"service": "web"},
                    stable_version="v1")
    router = NginxRouter(t)
    url = f"http://127.0.0.1:{nginx.port}/"
    beta = {"X-Beta": "true", "Cookie": "theme=dark; canary=always"}
    try:
        await stable.start()
        await canary.start()
        _nginx_conf(nginx, server_file, t)  # (starts nginx on the files between rollouts)
        before = (t.file.read_text(), server_file.read_text())
        await nginx_ready(url)
        async with controller(tmp_path, policies=[shaped_policy(mirror=100)], target=t,
                              router=router) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            await http.until(rid, lambda r: r["stage"] == 0 and r["state"] == "paused")
            # (nginx -s reload returns before the new workers serve: poll)
            await settled(url, beta, {"v2": 40})
            assert await _count(url, 40, {"X-Beta": "true"}) == {"v1": 40}   # no cookie
            assert await _count(url, 40, {"Cookie": "canary=always"}) == {"v1": 40}
            assert await _count(url, 40) == {"v1": 40}
            await _promote(http, rid)
            await http.until(rid, lambda r: r["stage"] == 1 and r["state"] == "paused")
            await settled(url, beta, {"v1": 40})
            served_before = canary.served.get("v2", 0)
            assert await _count(url, 40, beta) == {"v1": 40}   # every answer from stable

            async def mirrored() -> bool:
                return canary.served.get("v2", 0) - served_before >= 40
            await eventually(mirrored, deadline=10, what="40 mirrored requests at the canary")
            await _promote(http, rid)
            await http.until(rid, lambda r: r["stage"] == 2 and r["state"] == "paused")
            await settled(url, None, {"v1": 50, "v2": 50})
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                        {"reason": "enough"}, role="pipeline")
            assert status == 200
            await http.until(rid, lambda r: r["state"] == "rolled_back")
        assert (t.file.read_text(), server_file.read_text()) == before
        await settled(url, beta, {"v1": 20})
    finally:
        nginx.stop()
        await stable.stop()
        await canary.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("abort_at", [0, 1])
async def test_real_nginx_rollback_from_a_match_or_mirror_stage_restores_the_files(
        tmp_path, abort_at):
    stable, canary = Service("web", "v1", free_port()), Service("web", "v2", free_port())
    nginx = Nginx(tmp_path / "nginx", free_port())
    server_file = nginx.dir / "canary-server.conf"
    t = NginxTarget(name="web", file=nginx.upstream_file, server_file=server_file,
                    upstream="web", stable=(f"127.0.0.1:{stable.port}",),
                    canary=(f"127.0.0.1:{canary.port}",), test=tuple(nginx.test_cmd),
                    reload=tuple(nginx.reload_cmd), policy="p", vars={"service": "web"},
                    stable_version="v1")
    router = NginxRouter(t)
    try:
        await stable.start()
        await canary.start()
        _nginx_conf(nginx, server_file, t)
        before = (t.file.read_text(), server_file.read_text())
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=router) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            for _ in range(abort_at):
                await http.until(rid, lambda r: r["state"] == "paused")
                await _promote(http, rid)
            await http.until(rid, lambda r, s=abort_at: r["stage"] == s
                             and r["state"] == "paused")
            assert (t.file.read_text(), server_file.read_text()) != before
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                        {"reason": "enough"}, role="pipeline")
            assert status == 200
            await http.until(rid, lambda r: r["state"] == "rolled_back")
        assert (t.file.read_text(), server_file.read_text()) == before
    finally:
        nginx.stop()
        await stable.stop()
        await canary.stop()


@pytest.mark.e2e
async def test_real_nginx_first_shaped_rollout_on_the_server_block_the_readme_gives(tmp_path):
    """README (Traffic shapes, nginx): a running nginx on the plain upstream file; the user
    puts the README's server block in (nginx -t refuses it until canary has written the
    file once, so no reload) and creates an empty server_file; the first rollout's test
    and reload bring it in, and from then on nginx starts on the files as they are."""
    from dataclasses import replace

    from canary.routers.nginx import render

    stable, canary = Service("web", "v1", free_port()), Service("web", "v2", free_port())
    nginx = Nginx(tmp_path / "nginx", free_port())
    server_file = nginx.dir / "canary-server.conf"
    t = NginxTarget(name="web", file=nginx.upstream_file, server_file=server_file,
                    upstream="web", stable=(f"127.0.0.1:{stable.port}",),
                    canary=(f"127.0.0.1:{canary.port}",), test=tuple(nginx.test_cmd),
                    reload=tuple(nginx.reload_cmd), policy="p", vars={"service": "web"},
                    stable_version="v1")
    url = f"http://127.0.0.1:{nginx.port}/"
    beta = {"X-Beta": "true", "Cookie": "canary=always"}
    try:
        await stable.start()
        await canary.start()
        nginx.write_conf()  # proxy_pass http://web; on the file of a target without server_file
        t.file.write_text(render(replace(t, server_file=None), 0))
        subprocess.run(nginx.argv(), check=True, capture_output=True, timeout=30)
        await nginx_ready(url)
        conf = nginx.conf.read_text().replace(
            "        location / {\n            proxy_pass http://web;",
            f"        include {server_file};\n        location / {{\n"
            "            proxy_pass http://$canary_web_upstream;")
        nginx.conf.write_text(conf)
        server_file.write_text("")
        said = subprocess.run(nginx.test_cmd, capture_output=True, text=True, timeout=30)
        assert said.returncode != 0 and "canary_web_upstream" in said.stderr
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=NginxRouter(t)) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            await http.until(rid, lambda r: r["stage"] == 0 and r["state"] == "paused")
            await settled(url, beta, {"v2": 20})
            assert await _count(url, 20) == {"v1": 20}
            status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                        {"reason": "enough"}, role="pipeline")
            assert status == 200
            await http.until(rid, lambda r: r["state"] == "rolled_back")
        assert subprocess.run(nginx.test_cmd, capture_output=True, timeout=30).returncode == 0
        nginx.stop()
        subprocess.run(nginx.argv(), check=True, capture_output=True, timeout=30)
        await settled(url, beta, {"v1": 20})
    finally:
        nginx.stop()
        await stable.stop()
        await canary.stop()


@pytest.mark.e2e
async def test_real_nginx_mirrored_requests_carry_the_headers_the_server_block_sets(tmp_path):
    """A server block's proxy_set_header reaches the canary on mirrored requests as on
    served ones (a proxy_set_header in canary's mirror location dropped them all)."""
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = free_port(), free_port()  # stable's and the canary's: one recorder for both
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    nginx = Nginx(tmp_path / "nginx", free_port())
    server_file = nginx.dir / "canary-server.conf"
    t = NginxTarget(name="web", file=nginx.upstream_file, server_file=server_file,
                    upstream="web", stable=(f"127.0.0.1:{ports[0]}",),
                    canary=(f"127.0.0.1:{ports[1]}",), test=tuple(nginx.test_cmd),
                    reload=tuple(nginx.reload_cmd), policy="p", vars={}, stable_version="v1")
    try:
        _nginx_conf(nginx, server_file, t)
        nginx.conf.write_text(nginx.conf.read_text().replace(
            f"        include {server_file};",
            f"        proxy_set_header X-Team shop;\n        include {server_file};"))
        http, server = render_all(t, 0, None, MirrorStage(100, 60.0).shape.key())
        t.file.write_text(http)
        server_file.write_text(server or "")
        subprocess.run(nginx.reload_cmd, check=True, capture_output=True, timeout=30)
        url = f"http://127.0.0.1:{nginx.port}/x"

        async def mirrored() -> bool:
            seen.clear()
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                await r.read()
            return len(seen) == 2
        await eventually(mirrored, deadline=20, what="a served and a mirrored request")
        assert [h.get("X-Team") for h in seen] == ["shop", "shop"], seen
    finally:
        nginx.stop()
        await runner.cleanup()


async def settled(url: str, headers: dict[str, str] | None, want: dict[str, int]) -> None:
    """Requests (as many as `want` counts) land as `want` says, once nginx's new workers
    have taken over."""
    async def landed() -> bool:
        return await _count(url, sum(want.values()), headers) == want
    await eventually(landed, deadline=20, what=f"requests landing as {want}")


async def nginx_ready(url: str) -> None:
    async def up() -> bool:
        try:
            await _count(url, 1)
        except aiohttp.ClientError:
            return False
        return True
    await eventually(up, deadline=20, what="nginx answering")


# ---- the state machine (pure, on a driven clock) --------------------------------------


def _started(pol: Policy | None = None) -> Any:
    from canary.engine import decide

    return decide.start(rollout_id="r", target="web", policy=pol or shaped_policy(approval=False),
                        canary_version="v2", stable_version="v1", now=0.0, actor="t")


def test_a_match_stage_holds_only_once_its_rule_is_in_force_and_users_stay_at_weight_0():
    from canary.engine import decide

    r = _started()
    assert r.weight == 0 and r.shape is not None
    r = decide.applied(r, 0, 1.0)                  # weight 0 alone is not the stage
    assert r.stage_since is None
    r = decide.applied(r, 0, 2.0, shape=r.shape)   # the router carries the match rule
    assert r.stage_since == 2.0
    assert r.to_api()["shape"] == "match cookie canary = 'always' and header x-beta = 'true'"


def test_a_breach_at_a_match_stage_rolls_back_and_finishes_only_once_the_rule_is_gone():
    from canary.engine import decide
    from canary.model import Phase, Reading, Readings, Verdict

    pol = shaped_policy(approval=False)
    r = decide.applied(_started(pol), 0, 1.0, shape=_started(pol).shape)
    for t in (2.0, 3.0):  # the canary's gates are judged on the matching traffic
        r = decide.readings(r, pol, Readings(t, 0, (Reading("errors", Verdict.FAIL, 0.5),)), t)
    assert r.state is Phase.ROLLING_BACK and r.shape is None and r.weight == 0
    assert decide.wanted_shape(r, pol) is None
    r = decide.applied(r, 0, 4.0)                    # weight 0, but the rule still there
    assert r.state is Phase.ROLLING_BACK
    r = decide.applied(r, 0, 5.0, shape=None)
    assert r.state is Phase.ROLLED_BACK


def test_a_match_rule_removed_outside_canary_pauses_as_drift_and_resume_reapplies_it():
    from canary.engine import decide
    from canary.model import Command, CommandKind, PauseKind, Phase

    pol = shaped_policy(approval=False)
    r = _started(pol)
    key = r.shape
    r = decide.applied(r, 0, 1.0, shape=key)
    r = decide.observed_shape(r, key, 2.0)
    assert r.state is Phase.PROGRESSING               # what canary wrote: nothing to say
    r = decide.observed_shape(r, None, 3.0)
    assert r.state is Phase.PAUSED and r.pause_kind is PauseKind.DRIFT
    assert "no match rule or mirror" in (r.reason or "") and "header x-beta" in (r.reason or "")
    r = decide.command(r, pol, Command(CommandKind.RESUME, "oncall", "put it back"), 4.0)
    assert r.state is Phase.PROGRESSING and decide.wanted_shape(r, pol) == key
    assert r.applied_shape is None and r.stage_since is None   # the loop re-applies it


def test_the_dry_run_moves_through_match_and_mirror_stages_like_weight_stages():
    from canary.engine.dryrun import DryRun

    dry = DryRun(shaped_policy(approval=False))
    outcome = None
    t = 0.0
    while outcome is None and t < 30:
        t += 0.2
        outcome = dry.step(t, {})
    assert outcome == "promoted"


# ---- what each router refuses or reports -------------------------------------------------


async def test_an_nginx_target_without_server_file_refuses_a_shaped_rollout(tmp_path):
    t = NginxTarget(name="web", file=tmp_path / "up.conf", upstream="web",
                    stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",), test=("true",),
                    reload=("true",), policy="p", vars={"service": "web"}, stable_version="v1")
    async with controller(tmp_path, policies=[shaped_policy()], target=t,
                          router=NginxRouter(t)) as (http, _c, _t):
        status, body = await http.call("POST", "/api/v1/rollouts",
                                       {"target": "web", "canary_version": "v2"}, role="pipeline")
    assert status == 400 and "server_file" in body["error"]
    assert not t.file.exists()  # nothing changed


async def test_nginx_files_edited_by_hand_read_back_as_edited(tmp_path):
    from canary import shapes

    t = NginxTarget(name="web", file=tmp_path / "up.conf", server_file=tmp_path / "srv.conf",
                    upstream="web", stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                    test=("true",), reload=("true",))
    router = NginxRouter(t)
    key = shapes.Shape(mirror=20).key()
    await router.set_weight(0, shape=key)
    assert await router.get_shape() == key
    t.server_file.write_text("# someone removed the mirror\n")  # type: ignore[union-attr]
    live = await router.get_shape() or ""
    assert live.startswith(shapes.EDITED)
    # as the drift reason says it: "router carries <this>, expected <what canary wrote>"
    assert shapes.describe(live) == (f"nginx files {t.file} and {t.server_file} that differ "
                                     "from what canary wrote for mirror 20% to the canary")
    await router.set_weight(0)
    assert await router.get_shape() is None


async def test_two_cookies_in_one_stage_are_refused_on_istio_and_gateway(tmp_path):
    pol = Policy(name="p", interval=0.2, progress_deadline=60.0,
                 stages=(MatchStage(Match(cookies={"a": "1", "b": "2"}), 0.3), Stage(100, 0.3)),
                 gates=(ThresholdGate("errors", 'errors{svc="{{ service }}"}', max=0.05),))
    async with cluster(tmp_path, vs=VS_PLAIN) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        for t, r in ((target(), IstioRouter(target(), api)),
                     (gateway_target(), GatewayRouter(gateway_target(), api))):
            async with controller(tmp_path, policies=[pol], target=t,
                                  router=r) as (http, _c, _t):
                status, body = await http.call("POST", "/api/v1/rollouts",
                                               {"target": "web", "canary_version": "v2"},
                                               role="pipeline")
                assert status == 400 and "at most one cookie" in body["error"], body


async def test_istio_refuses_a_mirror_stage_on_a_route_that_already_mirrors(tmp_path):
    async with cluster(tmp_path) as (_kube, api):  # VS's primary route mirrors to a shadow
        t = target()
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=IstioRouter(t, api)) as (http, _c, _t):
            status, body = await http.call("POST", "/api/v1/rollouts",
                                           {"target": "web", "canary_version": "v2"},
                                           role="pipeline")
        assert status == 400 and "already mirrors" in body["error"], body


@pytest.mark.e2e
async def test_a_breach_at_the_header_stage_rolls_back_and_removes_canarys_rule(tmp_path):
    from tests.helpers import SetSource

    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        original = _clean(kube.get("httproutes", NS, "shop"))
        t = gateway_target()
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=GatewayRouter(t, api), source=SetSource(0.5)) as (http, _c, _t):
            rid = (await http.start(canary_version="v2"))["id"]
            r = await http.until(rid, lambda x: x["state"] == "rolled_back")
        assert r["stage"] == 0 and "gate errors" in r["reason"]
        assert _clean(kube.get("httproutes", NS, "shop")) == original


async def test_a_failing_nginx_test_keeps_both_files_and_skips_reload(tmp_path):
    from canary import shapes
    from canary.errors import RouterError

    marker = tmp_path / "reloaded"
    t = NginxTarget(name="web", file=tmp_path / "up.conf", server_file=tmp_path / "srv.conf",
                    upstream="web", stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                    test=("false",), reload=("touch", str(marker)))
    http, server = render_all(t, 0, None, None)
    t.file.write_text(http)
    t.server_file.write_text(server or "")  # type: ignore[union-attr]
    with pytest.raises(RouterError, match="nginx test failed"):
        await NginxRouter(t).set_weight(0, shape=shapes.Shape(mirror=50).key())
    assert (t.file.read_text(), t.server_file.read_text()) == (http, server)  # type: ignore[union-attr]
    assert not marker.exists()


def test_a_gateway_target_with_mistakes_is_refused_naming_each_field(tmp_path):
    from canary.cli import validate_files

    (tmp_path / "shaped.yaml").write_text(SHAPED)
    (tmp_path / "c.yaml").write_text(f"""
listen: 127.0.0.1:8080
state: sqlite:{tmp_path}/s.db
prometheus: {{url: http://127.0.0.1:9090}}
policies: {tmp_path}/shaped.yaml
auth: {{tokens: []}}
targets:
  shop:
    router: gateway
    namespace: prod
    http_route: Shop_
    rule: -1
    stable: {{name: shop-stable}}
    canary: {{name: Shop_Canary, port: 8080}}
""")
    problems = [str(p) for p in validate_files([str(tmp_path / "c.yaml")])]
    assert any("targets.shop.http_route: must be a Kubernetes name" in p for p in problems)
    assert any("targets.shop.rule: must be the rule's name (lowercase" in p for p in problems)
    assert any("targets.shop.stable.port: required" in p for p in problems), problems
    assert any("targets.shop.canary.name: must be a Service's name" in p for p in problems), \
        problems


@pytest.mark.e2e
async def test_a_gateway_edit_made_between_read_and_write_is_never_overwritten(tmp_path):
    from canary import shapes

    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        edited = []

        def someone_else_edits(method: str, plural: str, name: str) -> None:
            if plural == "httproutes" and method == "PUT" and not edited:
                live = kube.get("httproutes", NS, "shop")
                live["spec"]["hostnames"] = ["shop.example.com", "www.shop.example.com"]
                kube.put("httproutes", NS, live)  # an SRE's change, landing first
                edited.append(True)

        kube.before_write = someone_else_edits
        router = GatewayRouter(gateway_target(), api)
        await router.set_weight(0, shape=shapes.Shape(mirror=30).key())
        live = kube.get("httproutes", NS, "shop")
        assert edited and live["spec"]["hostnames"][1] == "www.shop.example.com"
        assert await router.get_shape() == shapes.Shape(mirror=30).key()
        await router.set_weight(25)
        live = kube.get("httproutes", NS, "shop")
        assert [b["weight"] for b in live["spec"]["rules"][1]["backendRefs"]] == [75, 25]
        assert "filters" in live["spec"]["rules"][1] and all(
            f["type"] != "RequestMirror" for f in live["spec"]["rules"][1]["filters"])


@pytest.mark.e2e
async def test_a_first_rollout_starts_on_an_empty_server_file_the_user_created(tmp_path):
    t = NginxTarget(name="web", file=tmp_path / "up.conf", server_file=tmp_path / "srv.conf",
                    upstream="web", stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                    test=("true",), reload=("true",), policy="p", vars={"service": "web"},
                    stable_version="v1")
    t.server_file.write_text("")  # type: ignore[union-attr]  # so that `include` finds it
    async with controller(tmp_path, policies=[shaped_policy()], target=t,
                          router=NginxRouter(t)) as (http, _c, _t):
        rid = (await http.start(canary_version="v2"))["id"]
        r = await http.until(rid, lambda x: x["state"] == "paused")
        assert r["paused_for"] == "approval" and r["shape"].startswith("match")


async def test_a_match_rule_left_behind_by_a_lost_state_store_is_reported_not_touched(tmp_path):
    from canary import shapes

    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        t = gateway_target()
        key = shapes.Shape(rules=(shapes.Rule("header", "x-beta",
                                              shapes.Condition("exact", "true")),)).key()
        await GatewayRouter(t, api).set_weight(0, shape=key)  # then the store was lost
        left = kube.get("httproutes", NS, "shop")
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=GatewayRouter(t, api)) as (http, ctl, _t):
            await ctl.start()
            try:
                assert "header x-beta" in ctl.warnings["web"]
                status, body = await http.call("POST", "/api/v1/rollouts",
                                               {"target": "web", "canary_version": "v2"},
                                               role="pipeline")
                assert status == 409 and "remove it by hand" in body["error"]
            finally:
                await ctl.stop()
        assert kube.get("httproutes", NS, "shop") == left


@pytest.mark.e2e
async def test_a_gateway_target_is_listed_with_its_route_and_keeps_a_rollback_decision(tmp_path):
    async with cluster(tmp_path, vs=None, dr=None) as (kube, api):
        kube.put("httproutes", NS, ROUTE)
        t = gateway_target()
        router = GatewayRouter(t, api)
        async with controller(tmp_path, policies=[shaped_policy()], target=t,
                              router=router) as (http, _c, _t):
            status, body = await http.call("GET", "/api/v1/targets", role="viewer")
            assert status == 200, body
            (shop,) = body["targets"]
            assert (shop["router"], shop["http_route"], shop["rule"], shop["live_weight"]) == \
                ("gateway", "shop", "primary", 0)
        # a rollback decided while the state store could not record it is kept in the route
        await router.set_weight(0, decision="rollback r1: gate errors")
        assert await router.decision() == "rollback r1: gate errors"
        await router.set_weight(0)
        assert await router.decision() is None
        assert "annotations" not in kube.get("httproutes", NS, "shop")["metadata"]
