"""One shape, many readers: `canary schema`, the checked-in schema files an editor reads,
and the chart's values.schema.json all come from the models that `canary validate` uses,
and they refuse the same documents."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from canary import schema
from canary.cli import main, validate_files
from tests.test_helm_chart import CHART, TARGETS

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))
EXAMPLE_CONFIG = ROOT / "docs" / "canary.example.yaml"
# the keys of the controller config that the chart sets itself
CHART_SETS = ("listen", "state", "policies", "auth", "leader_election")


def editor_validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(ecma_ends(json.loads(
        (ROOT / f"schemas/{name}.schema.json").read_text())))


def ecma_end(pattern: str) -> str:
    """The pattern with each `$` (outside a class, unescaped) written `\\Z`: in Python `$`
    also matches before a final newline, in the ECMA and Go regexes editors and helm run
    it does not, so `"x\\n"` passed Python's jsonschema where they refuse it."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        out.append("\\Z" if c == "$" and not in_class else c)
        i += 1
    return "".join(out)


def ecma_ends(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: ecma_ends(v) for k, v in node.items()}
        if isinstance(node.get("pattern"), str):
            out["pattern"] = ecma_end(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            out["patternProperties"] = {ecma_end(k): ecma_ends(v)
                                        for k, v in node["patternProperties"].items()}
        return out
    return [ecma_ends(v) for v in node] if isinstance(node, list) else node


def schema_errors(name: str, doc: Any) -> list[str]:
    """The fields the editor's schema refuses, as `path/to/field` (an unknown key: its
    own path)."""
    out = []
    for e in editor_validator(name).iter_errors(doc):
        path = "/".join(map(str, e.absolute_path))
        unknown = (re.search(r"\((.*) (?:was|were) unexpected\)", e.message)
                   or re.match(r"(.*) (?:does|do) not match any of the regexes", e.message))
        if e.validator == "additionalProperties" and unknown:
            out += [f"{path}/{k}".lstrip("/") for k in re.findall(r"'([^']+)'",
                                                                  unknown.group(1))]
        else:
            out.append(path)
    return out


def helm_fields(said: str) -> list[str]:
    """The fields named in helm's refusal, as `path/to/field` (an unknown key: its path),
    without the lines that only group the ones below them; alternatives (anyOf) are
    named once, by the place they were all tried at."""
    out: list[str] = []
    alternatives = None  # the indent of an anyOf's line, while reading its alternatives
    for indent, path, message in re.findall(r"( *)- at '/([^']*)': (.*)", said):
        if alternatives is not None and len(indent) > alternatives:
            continue
        alternatives = None
        if re.fullmatch(r"'(anyOf|oneOf)' failed.*", message):
            alternatives = len(indent)
            out.append(path)
            continue
        if re.fullmatch(r"'allOf' failed.*|validation failed", message):
            continue
        unknown = re.fullmatch(r"additional properties (.*) not allowed", message)
        if unknown:
            out += [f"{path}/{k}" for k in re.findall(r"'([^']+)'", unknown.group(1))]
        else:
            out.append(path)
    return out


def model_schema_errors(name: str, doc: Any) -> list[str]:
    """The models' own (draft 2020-12) schema, before it is published as draft 7."""
    return [e.message for e in jsonschema.Draft202012Validator(
        schema.SCHEMAS[name]()).iter_errors(doc)]


def helm_error(values: dict[str, Any]) -> str | None:
    """What `helm install` says about these values (None: it renders), after checking
    that `helm lint --strict` says the same."""
    chart = helm.Chart.load(str(CHART))
    try:
        chart.render(values, name="canary", namespace="canary-system", is_install=True)
        rendered = None
    except helm.HelmError as e:
        rendered = str(e)
    lint = helm.lint(str(CHART), values, strict=True)
    assert bool(lint.get("errors")) == (rendered is not None), (rendered, lint)
    return rendered


def policy_values(doc: dict[str, Any]) -> dict[str, Any]:
    """A policy document as chart values: the key under policies is its name."""
    return {"config": {"targets": TARGETS},
            "policies": {"p": {k: v for k, v in doc.items() if k != "name"}}}


# ---- canary schema ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["policy", "config"])
def test_canary_schema_prints_the_json_schema_an_editor_reads(capsys, name):
    assert main(["schema", name]) == 0
    out = capsys.readouterr().out
    assert out == (ROOT / "schemas" / f"{name}.schema.json").read_text()
    printed = json.loads(out)
    jsonschema.Draft7Validator.check_schema(printed)
    assert printed["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert out.startswith('{\n  "$schema"')  # indented by 2


@pytest.mark.e2e
def test_canary_schema_of_an_unknown_name_is_a_usage_error():
    run = subprocess.run([sys.executable, "-m", "canary.cli", "schema", "polcy"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert run.stdout == ""
    assert "invalid choice: 'polcy' (choose from 'policy', 'config')" in run.stderr
    assert "Traceback" not in run.stderr


# ---- the checked-in files ----------------------------------------------------------------


def test_the_checked_in_schema_files_are_what_the_models_give():
    stale = schema.stale_files()
    assert not stale, (f"{', '.join(map(str, stale))} out of date with the models: run "
                       f"`.venv/bin/python -m canary.schema write` and commit the result")


@pytest.mark.e2e
def test_schema_write_rewrites_stale_files_and_check_says_which(tmp_path, capsys):
    shutil.copytree(ROOT / "charts", tmp_path / "charts")
    (tmp_path / "charts/canary/values.schema.json").write_text("{}\n")
    assert schema.main(["check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for path in ("schemas/policy.schema.json", "schemas/config.schema.json",
                 "charts/canary/values.schema.json"):
        assert f"{path}: out of date with the models; run python -m canary.schema write" in out
    assert schema.main(["write", "--root", str(tmp_path)]) == 0
    assert "wrote schemas/policy.schema.json" in capsys.readouterr().out
    assert schema.main(["check", "--root", str(tmp_path)]) == 0
    for path in schema.generated_files(tmp_path):
        assert (tmp_path / path).read_text() == (ROOT / path).read_text()
    with pytest.raises(SystemExit) as e:
        schema.main(["write", "--root", str(tmp_path / "nowhere")])
    assert e.value.code == 2
    assert "not a canary repository" in capsys.readouterr().err


def test_a_chart_template_that_names_a_field_the_models_lost_fails_the_generator():
    template = json.loads((ROOT / schema.CHART_TEMPLATE).read_text())
    broken = copy.deepcopy(template)
    broken["properties"]["config"]["x-canary"]["drop"].append("listn")
    with pytest.raises(ValueError, match=r"listn: not a field of the config schema any more; "
                                         r"change charts/canary/values.schema.in.json"):
        schema.chart_values_schema(broken)
    broken = copy.deepcopy(template)
    broken["properties"]["leaderElection"]["properties"]["leaseName"]["x-canary"]["at"] += "x"
    with pytest.raises(ValueError, match="no such place in the schema"):
        schema.chart_values_schema(broken)


def test_each_shipped_file_names_its_schema_for_the_editor():
    for path, name in [*((p, "policy") for p in POLICIES), (EXAMPLE_CONFIG, "config")]:
        first = path.read_text().splitlines()[0]
        m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert m, (path, first)
        assert (path.parent / m.group(1)).resolve() == ROOT / "schemas" / f"{name}.schema.json"


@pytest.mark.e2e
def test_every_shipped_policy_and_the_example_config_pass_the_schema_and_canary_validate():
    assert len(POLICIES) >= 3
    for path in POLICIES:
        doc = yaml.safe_load(path.read_text())
        assert schema_errors("policy", doc) == [], path
        assert model_schema_errors("policy", doc) == [], path
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert schema_errors("config", doc) == []
    assert model_schema_errors("config", doc) == []
    assert validate_files([str(p) for p in [*POLICIES, EXAMPLE_CONFIG]]) == []


def defaults(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every (place, subschema) with a default, through properties and definitions."""
    if not isinstance(node, dict):
        return []
    found = [(where, node)] if "default" in node else []
    for key in ("properties", "definitions"):
        for name, sub in node.get(key, {}).items():
            found += defaults(sub, f"{where}/{name}")
    return found


@pytest.mark.parametrize("name", ["policy", "config"])
def test_every_default_an_editor_offers_passes_the_schema(name):
    """An editor inserts a field's default: it must be something canary accepts (a
    duration's default reads `30s`, not the 30.0 seconds the model holds)."""
    published = schema.published(name)
    found = defaults(published)
    assert len(found) >= 5
    for where, node in found:
        check = {**{k: v for k, v in node.items() if k != "default"},
                 "definitions": published["definitions"]}
        errors = list(jsonschema.Draft7Validator(check).iter_errors(node["default"]))
        assert not errors, (where, node["default"], errors[0].message)
    if name == "policy":
        assert published["properties"]["interval"]["default"] == "30s"
        assert published["properties"]["progress_deadline"]["default"] == "30m"


def documented(node: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every (place, property) of every object a document may hold: the root, each
    definition, a stage's gate overrides (not the rules' own small subschemas)."""
    if isinstance(node, list):
        return [p for i, n in enumerate(node) for p in documented(n, f"{where}/{i}")]
    if not isinstance(node, dict):
        return []
    found = [(f"{where}/{name}", sub) for name, sub in node.get("properties", {}).items()
             if node.get("type") == "object"]
    for key, sub in node.items():
        if key in ("properties", "definitions", "patternProperties"):
            found += [p for name, s in sub.items() for p in documented(s, f"{where}/{name}")]
        elif key in ("items", "allOf", "anyOf", "then", "additionalProperties"):
            found += documented(sub, f"{where}/{key}")
    return found


@pytest.mark.parametrize("name", ["policy", "config"])
def test_every_field_an_editor_shows_says_what_it_is(name):
    """A yaml-language-server hover shows each field's description: every property of the
    published schema has one, and so do the chart's policies and config."""
    published = schema.published(name)
    found = documented(published)
    assert len(found) >= (25 if name == "policy" else 50)
    missing = [where for where, prop in found if not (isinstance(prop, dict)
                                                      and prop.get("description"))]
    assert missing == []
    chart = json.loads((ROOT / schema.CHART_SCHEMA).read_text())
    embedded = [d for k, d in chart["definitions"].items() if k.startswith(f"{name}.")]
    assert embedded and all(not m for d in embedded for m in
                            [[w for w, p in documented(d) if not p.get("description")]])
    if name == "policy":
        stage = published["definitions"]["Stage"]["properties"]
        assert "changes only the fields it gives" in stage["gates"]["description"]
        assert "between 0 and 0.5" in stage["gates"]["items"]["properties"]["alpha"][
            "description"]


# ---- every reader refuses the same documents ----------------------------------------------


def good_policy() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "policies" / "sequential.yaml").read_text())


def bad_policy(change: str) -> dict[str, Any]:
    doc = good_policy()
    if change == "weight":
        doc["stages"][1]["weight"] = 150
    elif change == "hold":
        doc["stages"][0]["hold"] = "2 minutes"
    elif change == "typo":
        doc["intervall"] = doc.pop("interval")
    elif change == "field of another kind":
        doc["gates"][1]["min"] = 0  # an errors gate has no min
    elif change == "kind":
        doc["gates"][0]["kind"] = "bayesian"
    elif change == "no_data":
        doc["no_data"] = "maybe"
    elif change == "alpha":
        doc["gates"][0]["alpha"] = 0.7
    elif change == "override":
        doc["stages"][2]["gates"] = [{"name": "errors", "alpha": 0.7}]
    elif change == "override with a field of another kind":
        doc["stages"][2]["gates"] = [{"name": "errors", "kind": "errors", "max": 0.5}]
    elif change == "override of an unknown kind":
        doc["stages"][2]["gates"] = [{"name": "errors", "kind": "bayesian"}]
    elif change == "threshold without bounds":
        doc["gates"].append({"name": "up", "query": "up"})
    elif change == "compare without version":
        doc["gates"].append({"name": "p99", "kind": "compare", "query": "up", "max_ratio": 2})
    elif change == "requests without version":
        doc["gates"][0]["requests"] = "http_requests_total"
    elif change == "no stages":
        doc["stages"] = []
    elif change == "blank query":
        doc["stages"][0]["gates"] = [{"name": "up", "query": " ", "max": 1}]
    elif change == "zero interval":
        doc["interval"] = "0s"
    elif change == "long prefix":
        doc["stages"].insert(0, {"match": {"headers": {"x-id": {"prefix": "4" * 1025}}},
                                 "hold": "1m"})
    elif change == "line break in a regex":
        doc["stages"].insert(0, {"match": {"cookies": {"user": {"regex": "a\nb"}}},
                                 "hold": "1m"})
    elif change == "empty match":
        doc["stages"].insert(0, {"match": {"headers": {}}, "hold": "1m"})
    elif change == "bidi override in a header value":
        doc["stages"].insert(0, {"match": {"headers": {"x-user": "alice\u202eecila"}},
                                 "hold": "1m"})
    elif change == "line separator in a cookie value":
        doc["stages"].insert(0, {"match": {"cookies": {"beta": "yes\u2028no"}}, "hold": "1m"})
    elif change == "zero approval timeout":
        doc["approval_timeout"] = "0s"
    elif change == "webhook url scheme":
        doc["webhooks"] = [{"name": "ticket", "when": "stage", "url": "ftp://tickets/ok"}]
    elif change == "alert label name":
        doc["alerts"] = [{"matchers": {"1service": "{{ service }}"}}]
    elif change == "blank alert value":
        doc["alerts"] = [{"matchers": {"alertname": " "}}]
    elif change == "escape in a gate name":
        doc["gates"][0]["name"] = "errors\x1b[31m"
    return doc


@pytest.mark.e2e
@pytest.mark.parametrize("change,field,words", [
    ("weight", "stages[1].weight", "stages/1/weight"),
    ("hold", "stages[0].hold", "stages/0/hold"),
    ("typo", "intervall", "intervall"),
    ("field of another kind", "gates[1].min", "gates/1/min"),
    ("kind", "gates[0].kind", "gates/0/kind"),
    ("no_data", "no_data", "no_data"),
    ("alpha", "gates[0].alpha", "gates/0/alpha"),
    ("override", "stages[2].gates[0].alpha", "stages/2/gates/0/alpha"),
    ("override with a field of another kind", "stages[2].gates[0].max",
     "stages/2/gates/0/max"),
    ("override of an unknown kind", "stages[2].gates[0].kind", "stages/2/gates/0/kind"),
    ("threshold without bounds", "gates[2]", "gates/2"),
    ("compare without version", "gates[2].query", "gates/2"),
    ("requests without version", "gates[0].requests", "gates/0/requests"),
    ("no stages", "stages", "stages"),
    ("blank query", "stages[0].gates[0].query", "stages/0/gates/0/query"),
    ("zero interval", "interval", "interval"),
    ("long prefix", "stages[0].match.headers.x-id", "stages/0/match/headers/x-id"),
    ("line break in a regex", "stages[0].match.cookies.user", "stages/0/match/cookies/user"),
    ("empty match", "stages[0].match", "stages/0/match"),
    ("bidi override in a header value", "stages[0].match.headers.x-user",
     "stages/0/match/headers/x-user"),
    ("line separator in a cookie value", "stages[0].match.cookies.beta",
     "stages/0/match/cookies/beta"),
    ("zero approval timeout", "approval_timeout", "approval_timeout"),
    ("webhook url scheme", "webhooks[0].url", "webhooks/0/url"),
    ("alert label name", "alerts[0].matchers.1service", "alerts/0/matchers/1service"),
    ("blank alert value", "alerts[0].matchers.alertname", "alerts/0/matchers/alertname"),
    ("escape in a gate name", "gates[0].name", "gates/0/name"),
])
def test_canary_validate_the_editor_schema_and_helm_refuse_the_same_bad_policy(
        tmp_path, change, field, words):
    doc = bad_policy(change)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    problems = [str(p) for p in validate_files([str(path)])]
    assert problems and all("p.yaml:" in p for p in problems)
    assert any(f": {field}: " in p for p in problems), problems
    assert schema_errors("policy", doc) == [words]
    assert model_schema_errors("policy", doc)
    said = helm_error(policy_values(doc))
    assert said is not None and helm_fields(said) == [f"policies/p/{words}"], said


def example_config() -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    doc["policies"] = str(ROOT / "policies")
    return doc


def bad_config(change: str) -> dict[str, Any]:
    doc = example_config()
    web = doc["targets"]["web"]
    if change == "typo":
        doc["prometheus"]["timout"] = doc["prometheus"].pop("timeout")
    elif change == "timeout":
        doc["prometheus"]["timeout"] = "2 minutes"
    elif change == "router":
        web["router"] = "haproxy"
    elif change == "address":
        web["stable"] = ["10.0.0.1"]
    elif change == "port out of range":
        web["stable"] = ["10.0.0.1:99999"]
    elif change == "field of another router":
        web["virtual_service"] = "web"  # an nginx target has no virtual service
    elif change == "concurrency":
        doc["prometheus"]["concurrency"] = 0
    elif change == "listen":
        doc["listen"] = "localhost"
    elif change == "port":
        doc["listen"] = "127.0.0.1:65536"
    elif change == "url with credentials":
        doc["prometheus"]["url"] = "http://canary:secret@prometheus:9090"
    elif change == "credential header":
        doc["prometheus"]["headers"] = {"authorization": "Bearer x"}
    elif change == "header value":
        doc["prometheus"]["headers"] = {"X-Scope-OrgID": "a\nb"}
    elif change == "both credentials":
        doc["prometheus"]["basic_auth"] = {"username": "canary", "password_env": "HOME"}
        doc["prometheus"]["bearer_token_file"] = str(EXAMPLE_CONFIG)
    elif change == "var canary fills":
        web["vars"]["target"] = "web"
    elif change == "zero timeout":
        doc["prometheus"]["timeout"] = "0ms"
    elif change == "no tokens":
        doc["auth"]["tokens"] = []
    elif change == "empty file":
        web["server_file"] = ""
    elif change == "rule name":
        doc["targets"]["shop"] = {"router": "gateway", "namespace": "prod", "http_route": "shop",
                                  "rule": "Primary Rule", "stable": {"name": "s", "port": 80},
                                  "canary": {"name": "c", "port": 80}}
    elif change == "duration as a number":
        doc["prometheus"]["timeout"] = 10
    elif change == "receiver url null":
        doc["notifications"] = [{"name": "chat", "url": None}]
    elif change == "receiver port out of range":
        doc["notifications"] = [{"name": "chat", "url": "https://chat.example:99999/T0"}]
    elif change == "prometheus host with a no-break space":
        doc["prometheus"]["url"] = "http://prom\u00a0etheus:9090"  # Go's \s and ECMA's differ
    elif change == "receiver host not an IPv4 address":
        doc["notifications"] = [{"name": "chat", "url": "http://256.1.1.1/hook"}]
    elif change == "prometheus without a host":
        doc["prometheus"]["url"] = "http:///api"
    elif change == "role as a number":
        doc["auth"]["tokens"][0]["role"] = 3  # the enum's number for oncall
    elif change == "role as a boolean":
        doc["auth"]["tokens"][0]["role"] = True
    elif change == "target named inside":
        web["name"] = "other"
    elif change == "swap with a workload":
        doc["targets"]["shop"] = {"router": "gateway", "namespace": "prod", "http_route": "shop",
                                  "stable": {"name": "s", "port": 80},
                                  "canary": {"name": "c", "port": 80}, "promotion": "swap",
                                  "workload": {"stable": "shop-a", "canary": "shop-b"}}
    return doc


@pytest.mark.e2e
@pytest.mark.parametrize("change,field,words", [
    ("typo", "prometheus.timout", "prometheus/timout"),
    ("timeout", "prometheus.timeout", "prometheus/timeout"),
    ("router", "targets.web.router", "targets/web/router"),
    ("address", "targets.web.stable[0]", "targets/web/stable/0"),
    ("port out of range", "targets.web.stable[0]", "targets/web/stable/0"),
    ("field of another router", "targets.web.virtual_service", "targets/web/virtual_service"),
    ("concurrency", "prometheus.concurrency", "prometheus/concurrency"),
    ("listen", "listen", "listen"),
    ("port", "listen", "listen"),
    ("url with credentials", "prometheus.url", "prometheus/url"),
    ("credential header", "prometheus.headers.authorization",
     "prometheus/headers/authorization"),
    ("header value", "prometheus.headers.X-Scope-OrgID", "prometheus/headers/X-Scope-OrgID"),
    ("both credentials", "prometheus.basic_auth", "prometheus"),
    ("var canary fills", "targets.web.vars.target", "targets/web/vars/target"),
    ("zero timeout", "prometheus.timeout", "prometheus/timeout"),
    ("no tokens", "auth.tokens", "auth"),
    ("empty file", "targets.web.server_file", "targets/web/server_file"),
    ("rule name", "targets.shop.rule", "targets/shop/rule"),
    ("swap with a workload", "targets.shop.promotion", "targets/shop/promotion"),
    ("duration as a number", "prometheus.timeout", "prometheus/timeout"),
    ("target named inside", "targets.web.name", "targets/web/name"),
    ("receiver url null", "notifications[0]", "notifications/0"),
    ("receiver port out of range", "notifications[0].url", "notifications/0/url"),
    ("prometheus without a host", "prometheus.url", "prometheus/url"),
    ("prometheus host with a no-break space", "prometheus.url", "prometheus/url"),
    ("receiver host not an IPv4 address", "notifications[0].url", "notifications/0/url"),
    ("role as a number", "auth.tokens[0].role", "auth/tokens/0/role"),
    ("role as a boolean", "auth.tokens[0].role", "auth/tokens/0/role"),
])
def test_canary_validate_the_editor_schema_and_helm_refuse_the_same_bad_config(
        tmp_path, change, field, words):
    doc = bad_config(change)
    path = tmp_path / "canary.yaml"
    path.write_text(yaml.safe_dump(doc))
    problems = [str(p) for p in validate_files([str(path)])]
    assert any(f": {field}: " in p for p in problems), problems
    assert schema_errors("config", doc) == [words]
    assert model_schema_errors("config", doc)
    if words.split("/")[0] in CHART_SETS:
        return  # the chart sets this key itself, from values checked on their own
    # the chart takes the rest of the config; it sets these keys itself
    values = {"config": {k: v for k, v in doc.items() if k not in CHART_SETS}}
    said = helm_error(values)
    assert said is not None and helm_fields(said) == [f"config/{words}"], said


@pytest.mark.e2e
def test_a_whole_number_written_with_a_zero_fraction_passes_every_reader(tmp_path):
    """`weight: 5.0` is an integer to JSON Schema (so to the editor and helm): canary reads
    it as 5 rather than refusing what the editor underlined nowhere; 5.5 stays refused by
    all of them."""
    doc = good_policy()
    doc["failure_limit"] = 2.0
    doc["stages"][0]["weight"] = 5.0
    doc["stages"].insert(0, {"mirror": 50.0, "hold": "1m"})
    config = example_config()
    config["prometheus"]["concurrency"] = 8.0
    config["targets"]["shop"] = {"router": "gateway", "namespace": "prod", "http_route": "shop",
                                 "rule": 0.0, "stable": {"name": "s", "port": 8080.0},
                                 "canary": {"name": "c", "port": 8080.0}, "policy": "standard",
                                 "vars": {"service": "shop"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump(config))
    assert "weight: 5.0" in (tmp_path / "p.yaml").read_text()
    assert validate_files([str(tmp_path / "p.yaml"), str(tmp_path / "canary.yaml")]) == []
    assert schema_errors("policy", doc) == []
    assert schema_errors("config", config) == []
    values = policy_values(doc)
    values["config"] = {k: v for k, v in config.items() if k not in CHART_SETS}
    assert helm_error(values) is None
    from canary import policy as policy_mod
    from canary.config import load_file as load_config

    read = policy_mod.load_file(tmp_path / "p.yaml")
    assert [(s.weight, type(s.weight)) for s in read.stages][1] == (5, int)
    assert read.stages[0].mirror == 50 and read.failure_limit == 2
    shop = load_config(tmp_path / "canary.yaml").targets["shop"]
    assert (shop.rule, shop.stable.port) == (0, 8080)
    doc["stages"][1]["weight"] = 5.5
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    assert [p.field for p in validate_files([str(tmp_path / "p.yaml")])] == ["stages[1].weight"]
    assert schema_errors("policy", doc) == ["stages/1/weight"]


@pytest.mark.e2e
def test_a_match_value_with_a_non_breaking_or_zero_width_space_passes_every_reader(tmp_path):
    """A match value is text on one line: canary refused a no-break or zero-width space
    ('must be printable text') that the editor and helm accept and is no control
    character or line break; it now refuses what they refuse (control characters, line
    breaks, bidi controls: test_canary_validate_the_editor_schema_and_helm_refuse_the_same_bad_policy)."""
    doc = good_policy()
    doc["stages"].insert(0, {"match": {"headers": {"x-team": "Team\u00a0A"},
                                       "cookies": {"beta": {"prefix": "on\u200b"}}},
                             "hold": "1m"})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    assert validate_files([str(path)]) == []
    assert schema_errors("policy", doc) == []
    assert helm_error(policy_values(doc)) is None


@pytest.mark.e2e
def test_a_role_in_capitals_passes_every_reader(tmp_path):
    """canary reads `role: Oncall` as oncall; the editor underlined it (the schema named
    only the lower-case words). A role that is none of the three stays refused by all."""
    doc = example_config()
    doc["auth"]["tokens"][0]["role"] = "Pipeline"
    doc["auth"]["tokens"][1]["role"] = "ONCALL"
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump(doc))
    assert validate_files([str(tmp_path / "canary.yaml")]) == []
    assert schema_errors("config", doc) == []
    assert model_schema_errors("config", doc) == []
    doc["auth"]["tokens"][1]["role"] = "admin"
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump(doc))
    assert [p.field for p in validate_files([str(tmp_path / "canary.yaml")])] == [
        "auth.tokens[1].role"]
    assert schema_errors("config", doc) == ["auth/tokens/1/role"]


ONLY_VALIDATE = [
    # (policy or config, change, the field canary names, words of the README's list)
    ("policy", lambda d: d.update(interval="500ms"), "interval", "at least `1s`"),
    ("policy", lambda d: d["stages"][0].update(hold="721h"), "stages[0].hold",
     "at most 30 days"),
    ("policy", lambda d: d["stages"][0].update(hold="1.0005s"), "stages[0].hold",
     "whole milliseconds"),
    ("policy", lambda d: d["gates"][0].update(requests=d["gates"][0]["requests"] + " {{ 1x }}"),
     "gates[0].requests", "well formed"),
    ("policy", lambda d: d.update(webhooks=[{"name": "w", "when": "stage", "url": "http://a/"},
                                            {"name": "w", "when": "rollback",
                                             "url": "http://b/"}]),
     "webhooks[1].name", "unique gate and webhook names"),
    ("policy", lambda d: d["stages"][1].update(gates=[{"name": "errors", "kind": "compare",
                                                       "max_ratio": 2}]),
     "stages[1].gates[0].kind", "keeping that gate's kind"),
    ("config", lambda d: d["targets"]["web"].update(version_probe={"timeout": "61s"}),
     "targets.web.version_probe.timeout", "timeout of at most `60s`"),
    ("config", lambda d: d["targets"].update(shop={
        "router": "gateway", "namespace": "prod", "http_route": "shop",
        "stable": {"name": "s", "port": 80}, "canary": {"name": "c", "port": 80},
        "vars": {"service": "shop"}, "workload": {"stable": "shop", "canary": "shop"}}),
     "targets.shop.workload.canary", "Deployments"),
    ("config", lambda d: d["targets"].update(api={
        "router": "istio", "namespace": "prod", "virtual_service": "api",
        "stable": {"host": "api", "subset": "v1"}, "canary": {"host": "api", "subset": "v1"},
        "vars": {"service": "api"}}),
     "targets.api.canary", "different servers, Services"),
    ("config", lambda d: d["targets"]["web"].update(file="x" * 300), "targets.web.file",
     "names of at most 255 bytes"),
    ("config", lambda d: d["targets"]["web"].update(test=["nginx", "-t\0"]),
     "targets.web.test[1]", "commands without a NUL"),
    ("config", lambda d: d.update(notifications=[
        {"name": "chat", "url": "https://chat.example/hook"},
        {"name": "chat", "url": "https://chat.example/other"}]),
     "notifications[1].name", "unique receiver names"),
]


@pytest.mark.parametrize("name,change,field,words", ONLY_VALIDATE)
def test_what_only_canary_validate_sees_is_listed_in_the_readme(tmp_path, name, change, field,
                                                                words):
    """The editor and helm accept these and canary refuses them: the README says so, in
    its list of what a schema cannot express, so a red squiggle's absence is not read as
    a promise (it listed none of these)."""
    doc = good_policy() if name == "policy" else example_config()
    change(doc)
    path = tmp_path / ("p.yaml" if name == "policy" else "canary.yaml")
    path.write_text(yaml.safe_dump(doc))
    assert schema_errors(name, doc) == []
    problems = [str(p) for p in validate_files([str(path)])]
    assert any(f": {field}: " in p for p in problems), problems
    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("What a schema cannot express"):]
    listed = listed[:listed.index("only `canary validate` sees")]
    assert re.search(r"\s+".join(map(re.escape, words.split())), listed), words


def test_what_yaml_itself_reads_differently_is_as_the_readme_says(tmp_path):
    """canary reads YAML 1.1, editors and helm YAML 1.2: where they part, canary's side is
    what the README says (the other side is the YAML version's, not canary's)."""
    def said(text: str) -> list[str]:
        (tmp_path / "p.yaml").write_text(text)
        return [str(p) for p in validate_files([str(tmp_path / "p.yaml")])]

    for value in (".inf", ".nan"):
        doc = good_policy()
        doc["gates"][0]["tolerance"] = yaml.safe_load(value)
        assert schema_errors("policy", doc) == [], value  # the schema lets it through
        doc["gates"][0]["tolerance"] = "X"
        text = yaml.safe_dump(doc).replace("tolerance: X", f"tolerance: {value}", 1)
        assert any("tolerance: " in p and "not a finite number" in p for p in said(text)), value
    doc = {**good_policy(), "failure_limit": "X"}
    text = yaml.safe_dump(doc).replace("failure_limit: X", "failure_limit: 0o10")
    assert any("failure_limit: must be a whole number" in p for p in said(text))
    text = yaml.safe_dump(good_policy()).replace("hold: 5m", "hold: 5m\n  approval: yes", 1)
    assert "hold: 5m\n  approval: yes" in text and said(text) == []
    text = yaml.safe_dump({k: v for k, v in good_policy().items() if k != "interval"}
                          ) + "interval: 30s\ninterval: 15s\n"
    assert any("duplicate key 'interval'" in p for p in said(text))


def test_the_good_documents_pass_every_reader(tmp_path):
    assert schema_errors("policy", good_policy()) == []
    # a policy file may leave out its name (the file's stem): the editor must not flag it
    nameless = {k: v for k, v in good_policy().items() if k != "name"}
    assert schema_errors("policy", nameless) == []
    (tmp_path / "nameless.yaml").write_text(yaml.safe_dump(nameless))
    assert validate_files([str(tmp_path / "nameless.yaml")]) == []
    assert schema_errors("config", example_config()) == []
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump(example_config()))
    assert validate_files([str(tmp_path / "canary.yaml")]) == []
    config = {k: v for k, v in example_config().items() if k not in CHART_SETS}
    values = policy_values(good_policy())
    values["config"] = config  # an nginx target, with the sequential policy beside standard
    assert helm_error(values) is None


# ---- the API and its description refuse the same bodies ------------------------------------

BAD_BODIES = [
    ("StartRollout", {"target": "web"}),                                  # no canary_version
    # (refused by the API and by the ECMA and Go regexes clients run: see ecma_end)
    ("StartRollout", {"target": "web", "canary_version": "v2\n"}),
    ("StartRollout", {"target": "web", "canary_version": "v2 beta"}),     # not the version set
    ("StartRollout", {"target": "web", "canary_version": "v2", "extra": 1}),
    ("StartRollout", {"target": "web", "canary_version": 2}),
    ("Override", {"reason": ""}),
    ("Override", {"reason": "x" * 1001}),
    ("Override", {}),
    ("Promote", {"reason": "ok", "full": "yes"}),
    # blank, or with a control character: refused by the API, so by the description too
    ("Override", {"reason": " "}),
    ("Override", {"reason": "checked\tthe dashboards"}),
    ("Override", {"reason": "ok\n"}),
    ("StartRollout", {"target": " ", "canary_version": "v2"}),
    ("StartRollout", {"target": "web\u202e", "canary_version": "v2"}),
    ("StartRollout", {"target": "web", "canary_version": "v2", "policy": "p\x1b[2J"}),
    ("StartRollout", {"target": "web", "canary_version": "v2", "policy": ""}),
    ("StartRollout", {"target": "web", "canary_version": "v2", "policy": "  "}),
]
_PATHS = {"StartRollout": "/api/v1/rollouts", "Override": "/api/v1/rollouts/{id}/abort",
          "Promote": "/api/v1/rollouts/{id}/promote"}


@pytest.mark.parametrize("model,body", BAD_BODIES)
async def test_the_api_and_its_openapi_description_refuse_the_same_bodies(tmp_path, model, body):
    import jsonschema

    from canary.api.openapi import SPEC
    from tests.helpers import controller, simple_policy

    schema = {"$ref": f"#/components/schemas/{model}", "components": SPEC["components"]}
    assert list(jsonschema.Draft202012Validator(ecma_ends(schema)).iter_errors(body)), \
        "the description accepts it"
    # (a long hold: a loaded machine must not let the rollout finish before it is read)
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, _t):
        rid = (await api.start(canary_version="v1a"))["id"]
        status, answer = await api.call("POST", _PATHS[model].format(id=rid), body,
                                        role="oncall")
        assert status == 400 and answer["error"], answer
        assert (await api.rollout(rid))["state"] == "progressing", "nothing changed"


def test_every_description_a_user_reads_points_only_at_what_their_clone_has():
    """The editor's hover text, the chart's schema and the OpenAPI description name the
    README's sections, never a file outside the repository."""
    from canary.api.openapi import SPEC

    headings = {m.group(1).strip() for m in re.finditer(r"(?m)^#+ (.+)$",
                                                       (ROOT / "README.md").read_text())}
    texts = {name: json.dumps(schema.published(name)) for name in schema.SCHEMAS}
    texts["chart"] = (ROOT / schema.CHART_SCHEMA).read_text()
    texts["openapi"] = json.dumps(SPEC)
    for name, text in texts.items():
        assert "interface.md" not in text, name
        for ref in re.findall(r"README: ([^)\\]+)\)", text):
            assert any(h.startswith(ref) for h in headings), (name, ref)
