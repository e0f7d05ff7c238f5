"""canary validate and the editor's schema (which the chart embeds) agree on every small
change to a full policy and a full config: each field set to each of a set of awkward
values, deleted, or given an unknown neighbour. A document only the schema refuses
would make an editor (or helm) reject what canary runs; one only canary refuses must be
of a kind the README lists as what a schema cannot express. This is how the bare-number
duration, a target's `name:`, a numeric role, `url: null` and the tracebacks on paths
the file system cannot take were found."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from canary.cli import validate_files
from tests.test_schema import ecma_ends, example_config, good_policy, schema_errors

VALUES: list[Any] = [
    0, -1, 1.5, 101, 1e308, True, None, "", " ", "x", "10", "10s", "0s", "-5s", "a\nb",
    "é", "x" * 300, [], ["x"], {}, {"x": 1}, "http://a/", "v1.2", "a b", "*", "[", "inf",
    "1h", "721h", "0.5s", 1_000_000, "x\n", "v1\n", "http://h:99999/", "http:///x",
    "http://[::1/", "http://256.1.1.1/", "http://[1:2]/", "http://a\u00a0b/",
]

RICH_POLICY = """\
name: shaped
interval: 30s
progress_deadline: 2h
approval_timeout: 2h
stages:
  - match: {headers: {x-beta: "true", x-user: {prefix: "42"}, x-who: {regex: "^(al|bo)$"}},
            cookies: {canary: always}}
    hold: 10m
  - mirror: 100
    hold: 5m
  - {weight: 5, hold: 2m, approval: true}
  - {weight: 100, hold: 5m}
gates:
  - name: err
    kind: compare
    query: 'sum(rate(r{version="{{ version }}",code=~"5.."}[1m])) / sum(rate(r{version="{{ version }}"}[1m]))'
    max_ratio: 2
  - name: errs
    kind: errors
    errors: 'sum(increase(r{version="{{ version }}",code=~"5.."}[1m]))'
    requests: 'sum(increase(r{version="{{ version }}"}[1m]))'
webhooks:
  - {name: smoke, when: pre-rollout, url: "http://t/run/{{ service }}", timeout: 30s}
  - {name: tell, when: rollback, url: "http://ci/x"}
alerts:
  - matchers: {alertname: CanaryHighErrorRate, service: "{{ service }}"}
"""

MORE_TARGETS = """\
api:
  router: istio
  namespace: prod
  virtual_service: api
  stable: {host: api, subset: stable}
  canary: {host: api, subset: canary}
  vars: {service: api}
  workload: {stable: api-stable, canary: api-canary, version_label: version,
             scale_canary: proportional, scale_down_delay: 30s}
shop:
  router: gateway
  namespace: prod
  http_route: shop
  rule: primary
  stable: {name: shop-stable, port: 8080}
  canary: {name: shop-canary, port: 8080}
  vars: {service: shop}
"""


def rich_config() -> dict[str, Any]:
    doc = example_config()
    doc["targets"].update(yaml.safe_load(MORE_TARGETS))
    doc["notifications"] = [{"name": "chat", "url": "https://chat.example/hook",
                             "format": "slack", "events": ["rolled_back"], "timeout": "5s"}]
    doc["prometheus"]["headers"] = {"X-Scope-OrgID": "team-a"}
    doc["leader_election"] = {"name": "canary-leader", "lease_duration": "15s",
                              "renew_deadline": "10s", "retry_period": "2s"}
    doc.update(approval_reminder="30m", public_url="https://canary.example")
    return doc


# what only canary validate sees, as the README's list says it
# (test_schema.py::test_what_only_canary_validate_sees_is_listed_in_the_readme)
ONLY_CANARY = re.compile("|".join([
    r"longer than 30 days", r"shorter than 1s, the shortest interval",
    r"is not longer than stage \d+'s hold plus one interval",
    r"weights must rise strictly", r"the last stage must have weight 100",
    r"does not compile", r"is neither a directory nor a file", r"no policy named",
    r"add them to vars", r"at most 60s: a probe", r"need retry_period < renew_deadline",
    r"must be a directory of policy files",  # a blank name: as good as a missing file
    r"longer than a file name can be \(255 bytes\)", r"contains a NUL character, which no",
]))


def leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if path:
        yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, child in children:
        yield from leaves(child, (*path, key))


def changed(doc: Any, path: tuple[Any, ...], values: list[Any] = VALUES,
            ) -> Iterator[tuple[str, Any]]:
    for value in values:
        out = copy.deepcopy(doc)
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = copy.deepcopy(value)
        yield f"= {value!r:.30}", out
    out = copy.deepcopy(doc)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    yield "deleted", out
    if isinstance(parent, dict) and isinstance(path[-1], str):
        out = copy.deepcopy(doc)
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        parent[f"{path[-1]}\n"] = parent.pop(path[-1])  # the key with a line break after it
        yield "key + newline", out
    out = copy.deepcopy(doc)
    node = out
    for key in path:
        node = node[key]
    if isinstance(node, dict):
        node["zz_unknown"] = 1
        yield "+ unknown key", out


@pytest.mark.e2e
@pytest.mark.parametrize("name,doc", [
    ("policy", good_policy()), ("policy", yaml.safe_load(RICH_POLICY)),
    ("config", rich_config())], ids=["sequential.yaml", "shaped", "config"])
def test_canary_validate_and_the_editor_schema_agree_on_every_small_change(tmp_path, name,
                                                                           doc):
    file = tmp_path / ("p.yaml" if name == "policy" else "canary.yaml")

    def canary_says(d: dict[str, Any]) -> list[str]:
        file.write_text(yaml.safe_dump(d, allow_unicode=True))
        return [p.message for p in validate_files([str(file)])]

    assert canary_says(doc) == [] and schema_errors(name, doc) == []
    schema_only, unlisted, tried = [], [], 0
    for path in leaves(doc):
        for how, d in changed(doc, path):
            tried += 1
            canary, schema = canary_says(d), schema_errors(name, d)
            where = f"{'.'.join(map(str, path))} {how}"
            if schema and not canary:
                schema_only.append((where, schema))
            elif canary and not schema and not all(ONLY_CANARY.search(m) for m in canary):
                unlisted.append((where, canary))
    assert tried > 500
    assert not schema_only, schema_only
    assert not unlisted, unlisted



# ---- the API and its OpenAPI description, on every small change to each body -----------

BODIES: list[tuple[str, str, Any]] = [
    ("StartRollout", "/api/v1/rollouts",
     {"target": "web", "canary_version": "v9", "stable_version": "v1", "policy": "p"}),
    ("Override", "/api/v1/rollouts/{id}/pause", {"reason": "checking"}),
    ("Promote", "/api/v1/rollouts/{id}/promote", {"reason": "ok", "full": False}),
    ("AlertmanagerWebhook", "/api/v1/alerts", {
        "version": "4", "status": "firing", "receiver": "canary", "groupKey": "k",
        "alerts": [{"status": "firing", "labels": {"alertname": "X", "service": "web"},
                    "annotations": {"summary": "s"}, "startsAt": "2026-01-01T00:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "abc"}]}),
]


@pytest.mark.e2e
async def test_the_api_and_its_openapi_description_agree_on_every_small_change(tmp_path):
    """Each body's fields set to awkward values (a NUL, a bidi override, 5,000
    characters among them), deleted or given an unknown neighbour: the API answers 400
    exactly when the description refuses the body, and never a 5xx."""
    import jsonschema

    from canary.api.openapi import SPEC
    from tests.helpers import controller, simple_policy

    values = [*VALUES, "x" * 5000, "v2", "\u202e", "\x00"]
    disagree, tried = [], 0
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid, n = (await api.start(canary_version="v1a"))["id"], 1
        for model, path, base in BODIES:
            validator = jsonschema.Draft202012Validator(ecma_ends(
                {"$ref": f"#/components/schemas/{model}", "components": SPEC["components"]}))
            variants = [("as is", base), ("[]", []), ("null", None)]
            for at in leaves(base):
                variants += [(f"{'.'.join(map(str, at))} {how}", d)
                             for how, d in changed(base, at, values)]
            for how, body in variants:
                tried += 1
                refused = bool(list(validator.iter_errors(body)))
                status, answer = await api.call("POST", path.format(id=rid), body,
                                                role="oncall")
                assert status < 500, (model, how, answer)
                if refused != (status == 400):
                    disagree.append((model, how, status, answer))
                if (await api.rollout(rid))["state"] not in ("progressing", "paused"):
                    # promoted or aborted by a body both accepted: start another once it ends
                    await api.until(rid, lambda r: r["state"] in ("succeeded", "rolled_back"))
                    n += 1
                    rid = (await api.start(canary_version=f"v{n}z"))["id"]
    assert tried > 500
    assert not disagree, disagree
