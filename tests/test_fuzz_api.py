"""Guarantee 5: the API fuzzed from its own OpenAPI description (schemathesis): no 5xx, no
traceback in a response, every response valid against the description (which is generated
from the same models that validate requests), and no request changes state without the
right role."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.checks import response_schema_conformance, status_code_conformance

from canary.api.openapi import SPEC
from canary.demo.procs import free_port
from tests.helpers import TOKENS

schema = schemathesis.openapi.from_dict(SPEC)


# a `canary serve` process, fuzzed by schemathesis (hypothesis) for tens of seconds
pytestmark = pytest.mark.e2e


def run_server(tmp: Path, *, quiet: bool) -> Iterator[tuple[str, str]]:
    """A controller process with one rollout; `quiet`: that rollout is already aborted and
    final, so nothing changes unless a request changes it."""
    port = free_port()
    (tmp / "policies").mkdir()
    (tmp / "policies" / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "interval": "1s", "stages": [{"weight": 10, "hold": "1h"},
                                                   {"weight": 100, "hold": "1s"}],
        "progress_deadline": "2h", "gates": [{"name": "g", "query": "up", "max": 1}]}))
    (tmp / "canary.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "state": "sqlite:state.db",
        "prometheus": {"url": "http://127.0.0.1:1", "timeout": "200ms"}, "policies": "policies",
        "auth": {"tokens": [{"name": f"{r}-token", "sha256": hashlib.sha256(t.encode()).hexdigest(),
                             "role": r} for r, t in TOKENS.items()]},
        "targets": {"web": {"router": "nginx", "file": "up.conf", "upstream": "web",
                            "stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"],
                            "test": ["true"], "reload": ["true"], "policy": "p",
                            "stable_version": "v1"}}}))
    log = open(tmp / "controller.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "canary.cli", "serve", "--config",
                             str(tmp / "canary.yaml")], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 20
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < end, "controller did not start"
            time.sleep(0.1)
        # one rollout exists, so ids in paths can hit a real one
        r = requests.post(base + "/api/v1/rollouts", json={"target": "web", "canary_version": "v2"},
                          headers={"Authorization": f"Bearer {TOKENS['pipeline']}"}, timeout=5)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        if quiet:
            requests.post(f"{base}/api/v1/rollouts/{rid}/abort", json={"reason": "quiet"},
                          headers={"Authorization": f"Bearer {TOKENS['pipeline']}"}, timeout=5)
            while requests.get(f"{base}/api/v1/rollouts/{rid}", timeout=5, headers={
                    "Authorization": f"Bearer {TOKENS['viewer']}"}).json()["state"] != "rolled_back":
                assert time.monotonic() < end + 20
                time.sleep(0.1)
        yield base, rid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
        text = (tmp / "controller.log").read_text()
        assert "Traceback" not in text, "a request made the controller log a traceback"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    yield from run_server(tmp_path_factory.mktemp("fuzz"), quiet=False)


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    yield from run_server(tmp_path_factory.mktemp("fuzz-quiet"), quiet=True)


def state(base: str) -> str:
    viewer = {"Authorization": f"Bearer {TOKENS['viewer']}"}
    r = requests.get(base + "/api/v1/rollouts?limit=500", timeout=5, headers=viewer)
    assert r.json()["next"] is None
    # (a listing carries no events: each rollout's own answer has them)
    rollouts = [requests.get(f"{base}/api/v1/rollouts/{x['id']}", timeout=5,
                             headers=viewer).json() for x in r.json()["rollouts"]]
    return json.dumps([{k: x[k] for k in ("id", "state", "stage", "weight", "events")}
                       for x in rollouts], sort_keys=True)


def check_response(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert "Traceback" not in response.text
    if response.status_code >= 400 and response.request.url.split("?")[0].find("/api/") >= 0:
        assert "error" in response.json(), response.text[:300]


FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_fuzzed_requests_with_any_role_never_get_a_5xx_or_a_traceback(case, server):
    base, rid = server
    if case.path_parameters and (case.method == "POST" or case.path.endswith("/readings")):
        case.path_parameters["id"] = rid  # (a watch of it would stream for its hour: not here)
    role = ["viewer", "pipeline", "oncall"][sum(map(ord, case.method + case.path)) % 3]
    response = case.call(base_url=base, headers={"Authorization": f"Bearer {TOKENS[role]}"})
    check_response(response)
    # every answer matches the description generated from the body models: its status is
    # one the operation lists, and its body validates against that status's schema
    case.validate_response(response, checks=(status_code_conformance,
                                             response_schema_conformance))


@schema.include(method="POST").parametrize()
@FUZZ
def test_fuzzed_writes_without_the_right_role_change_nothing(case, quiet_server):
    server, rid = quiet_server
    if case.path_parameters:
        case.path_parameters["id"] = rid
    needs_oncall = case.path.endswith(("pause", "resume", "promote"))
    token = TOKENS["pipeline"] if needs_oncall else TOKENS["viewer"]
    for headers in ({"Authorization": f"Bearer {token}"}, {},
                    {"Authorization": "Bearer not-a-token"}):
        before = state(server)
        response = case.call(base_url=server, headers=headers)
        check_response(response)
        # 405: schemathesis also tries methods the path does not have
        assert response.status_code in (400, 401, 403, 405, 413), (case.method, case.path,
                                                                  response.text)
        assert state(server) == before


def test_the_served_description_is_the_one_fuzzed(server):
    assert requests.get(server[0] + "/api/v1/openapi.json", timeout=5).json() == SPEC
