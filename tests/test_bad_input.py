"""Bad input, from a policy file, a request or a metric, is a clear problem or a 4xx, never
a 500, a traceback, a silently disabled gate or a broken rollout."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from canary import fields
from canary import policy as policy_mod
from canary.cli import validate_files
from canary.clock import RealClock
from canary.demo.procs import free_port, wait_http
from canary.engine import decide
from canary.engine.controller import Controller
from canary.errors import Conflict, ValidationFailed
from canary.gates.evaluate import judge, judge_compare
from canary.gates.kinds import CompareGate, ThresholdGate
from canary.model import Command, CommandKind, Event, Verdict
from canary.policy import NoData
from canary.routers.nginx import parse_weight
from canary.store.sqlite import SqliteStore
from canary.text import is_control
from tests.helpers import TOKENS, Api, SetSource, controller, eventually, simple_policy, tokens
from tests.test_restart_and_cli import cli

POLICY = """\
name: p
interval: 10s
stages:
  - weight: 10
    hold: 1m
  - weight: 100
    hold: 1m
gates:
  - name: errors
    query: sum(rate(x[1m]))
    max: 0.01
"""
ERRORS_GATE = """\
  - name: seq
    kind: errors
    requests: sum(r{v="{{ version }}"})
    errors: sum(e{v="{{ version }}"})
"""


def problems_of(tmp_path: Path, text: str, name: str = "pol.yaml") -> list[str]:
    p = tmp_path / name
    p.write_text(text)
    return [str(x).removeprefix(str(tmp_path) + "/") for x in validate_files([str(p)])]


def no_raw_json_constants(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"the API sent {name}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


# ---- 1. non-finite numbers ------------------------------------------------------------------


@pytest.mark.parametrize("field,value,line", [
    ("max", ".nan", 11), ("max", ".inf", 11), ("min", "-.inf", 12), ("max_increase", ".inf", 13),
    ("max_ratio", ".nan", 13), ("tolerance", ".nan", 16), ("alpha", ".inf", 16),
    ("gross", ".inf", 16), ("final_gross", ".inf", 16), ("detect_rate", ".nan", 16),
    ("wander", ".nan", 16), ("wander", "-.inf", 16), ("max", "1" + "0" * 400, 11),
])
def test_a_bound_that_is_nan_or_infinite_is_refused_with_file_line(tmp_path, field, value, line):
    text = POLICY
    if field == "min":
        text += f"    min: {value}\n"
    elif field in ("max_increase", "max_ratio"):
        text = text.replace("    max: 0.01\n", f"    kind: compare\n    baseline: y\n"
                                              f"    {field}: {value}\n")
    elif field != "max":
        text += ERRORS_GATE + f"    {field}: {value}\n"
    else:
        text = text.replace("max: 0.01", f"max: {value}")
    found = problems_of(tmp_path, text)
    gate = 1 if text.count("- name:") == 2 and field not in ("max", "min") else 0
    assert len(found) == 1, found
    assert found[0].startswith(f"pol.yaml:{line}: gates[{gate}].{field}: "), found
    assert "not a finite number; write a number like 0.01" in found[0]
    with pytest.raises(ValidationFailed):  # and at load, as `canary serve` reads it
        policy_mod.load_file(tmp_path / "pol.yaml")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_an_infinite_or_nan_reading_is_no_data_never_a_pass(value):
    for gate in (ThresholdGate("g", "q", max=0.05), ThresholdGate("g", "q", min=0.99),
                 ThresholdGate("g", "q", min=0.0, max=1.0)):
        r = judge(gate, value)
        assert r.verdict is Verdict.NO_DATA and r.value is None
        assert ("Inf" if math.isinf(value) else "NaN") in (r.detail or "")
    cmp = CompareGate("g", "q{{ version }}", max_increase=0.1, max_ratio=2.0)
    for canary, stable in ((value, 1.0), (1.0, value)):
        r = judge_compare(cmp, canary, stable)
        assert r.verdict is Verdict.NO_DATA, (canary, stable, r)


async def test_a_canary_whose_query_reads_minus_inf_is_rolled_back_when_no_data_fails(tmp_path):
    # -Inf is below every max: read as a number, this failing canary would be promoted
    pol = dataclasses.replace(simple_policy(hold=0.4), no_data=NoData.FAIL)
    async with controller(tmp_path, policies=[pol], source=SetSource(-math.inf)) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        r = await api.until(rid, lambda r: r["state"] in ("rolled_back", "succeeded"))
        assert r["state"] == "rolled_back" and r["weight"] == 0
        assert "-Inf" in r["reason"], r["reason"]


async def test_a_query_returning_several_series_is_an_error_never_a_pass(tmp_path):
    """README "Writing a policy": a threshold gate's query must give one number. A real
    PrometheusSource against an HTTP API answering two series (each under `max`) reads
    `error` saying to aggregate, and a rollout under `no_data: pass` does not move on."""
    from aiohttp import web

    from canary.demo.procs import serve_app
    from canary.gates.prometheus import PrometheusSource, measure

    answer = {"series": 2}

    async def query(request: web.Request) -> web.Response:
        result = [{"metric": {"pod": f"web-{i}"}, "value": [1.0, "0.01"]}
                  for i in range(answer["series"])]
        return web.json_response({"status": "success",
                                  "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_route("*", "/api/v1/query", query)
    port = free_port()
    runner = await serve_app(app, port)
    source = PrometheusSource(f"http://127.0.0.1:{port}", timeout=2)
    try:
        gates = simple_policy().gates
        (r,) = await measure(source, gates, {"service": "web"}, attempts=1)
        assert r.verdict is Verdict.ERROR and r.value is None, r
        assert "2 series" in (r.detail or "") and "sum()" in (r.detail or ""), r.detail

        pol = dataclasses.replace(simple_policy(hold=0.3, interval=0.1), no_data=NoData.PASS)
        async with controller(tmp_path, policies=[pol], source=source) as (api, _c, _t):
            rid = (await api.start(canary_version="v2"))["id"]
            await api.until(rid, lambda r: r["gates"][0]["status"] == "error")

            async def errors_read() -> float:
                _, text = await api.call("GET", "/metrics", role=None)
                return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("canary_gate_verdicts_total{")
                           and 'verdict="error"' in line)

            async def evaluated_past_the_hold() -> bool:
                # each errored evaluation retries for 0.6 s: three are well past the hold
                return await errors_read() >= 3
            await eventually(evaluated_past_the_hold, what="evaluations past the hold")
            r = await api.rollout(rid)
            assert (r["state"], r["stage"], r["gates"][0]["status"]) == \
                ("progressing", 0, "error"), r
            answer["series"] = 1  # aggregated: one number, under max
            await api.until(rid, lambda r: r["stage"] >= 1)
    finally:
        source.close()
        await runner.cleanup()


async def test_the_api_never_sends_nan_or_infinity(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"reason": "hold still"})
        # a rollout stored holding non-finite numbers (by an older version, or a gate's
        # evidence that overflowed)
        for _ in range(10):
            r = await ctl.store.load(rid)
            gates = tuple(dataclasses.replace(g, value=v, max=m) for g, v, m in
                          zip(r.gates, (math.inf, -math.inf), (math.nan, math.inf),
                              strict=False))
            try:
                await ctl.store.save(rollout=dataclasses.replace(r, gates=gates),
                                     expected_version=r.version)
                break
            except Exception:
                await asyncio.sleep(0.05)
        headers = {"Authorization": f"Bearer {TOKENS['viewer']}"}
        for path in (f"/api/v1/rollouts/{rid}", "/api/v1/rollouts"):
            async with api.s.get(api.base + path, headers=headers) as resp:
                assert resp.status == 200
                data = no_raw_json_constants(await resp.text())
            one = data if "id" in data else data["rollouts"][0]
            assert one["gates"][0]["value"] is None and one["gates"][0].get("max") is None


# ---- 2. durations ---------------------------------------------------------------------------


@pytest.mark.parametrize("change,want", [
    (("interval: 10s", "interval: 500ms"),
     "pol.yaml:2: interval: 500ms is shorter than 1s, the shortest interval canary evaluates "
     "at; write 1s or more"),
    (("interval: 10s", "interval: 0.4ms"),
     "pol.yaml:2: interval: '0.4ms' is not a whole number of milliseconds"),
    (("hold: 1m\n  - weight: 100", "hold: 1.0005s\n  - weight: 100"),
     "pol.yaml:5: stages[0].hold: '1.0005s' is not a whole number of milliseconds"),
    (("hold: 1m\n  - weight: 100", "hold: " + "9" * 400 + "h\n  - weight: 100"),
     "pol.yaml:5: stages[0].hold: '99999999999999999999'... is 401 characters, too long for a "
     "duration"),
    (("hold: 1m\n  - weight: 100", "hold: 721h\n  - weight: 100"),
     "pol.yaml:5: stages[0].hold: '721h' is longer than 30 days, the longest duration canary "
     "accepts; write 720h or less"),
    (("interval: 10s", "interval: 10s\nprogress_deadline: " + "1" * 30 + "s"),
     "pol.yaml:3: progress_deadline: '111111111111111111111111111111s' is longer than 30 days"),
])
def test_durations_too_short_too_long_or_finer_than_a_millisecond_are_refused(tmp_path, change,
                                                                              want):
    found = problems_of(tmp_path, POLICY.replace(*change))
    assert len(found) == 1 and found[0].startswith(want), found


def test_every_accepted_duration_reads_back_as_itself():
    for text in ("1s", "1ms", "1.5s", "0.001s", "1m30s", "720h", "2h0.5s", "59m59.999s"):
        seconds = fields.parse_duration(text)
        assert fields.parse_duration(fields.format_duration(seconds)) == seconds


def test_controller_config_durations_are_bounded_too(tmp_path):
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(POLICY)
    digest = hashlib.sha256(b"t").hexdigest()
    for timeout, want in (("0s", "must be longer than 0"),
                          ("0.4ms", "not a whole number of milliseconds"),
                          ("1" * 400 + "s", "too long for a duration")):
        cfg = tmp_path / "canary.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            prometheus: {{url: "http://127.0.0.1:9090", timeout: "{timeout}"}}
            policies: policies/
            auth: {{tokens: [{{name: a, sha256: "{digest}", role: viewer}}]}}
            targets:
              web: {{router: nginx, file: up.conf, upstream: web, stable: ["127.0.0.1:1"],
                    canary: ["127.0.0.1:2"], policy: p}}
            """))
        found = [str(x) for x in validate_files([str(cfg)])]
        assert len(found) == 1 and f"{cfg}:1: prometheus.timeout: " in found[0], found
        assert want in found[0], found


@pytest.mark.parametrize("change,field", [
    ({"policies": "x" * 300}, "policies"),
    ({"policies": ["a\0b"]}, "policies[0]"),
    ({"tls": {"cert": "x" * 300, "key": "k"}}, "tls.cert"),
    ({"prometheus": {"bearer_token_file": "a\0b"}}, "prometheus.bearer_token_file"),
    ({"prometheus": {"ca_file": "a\0b"}}, "prometheus.ca_file"),
    ({"auth": {"tokens_file": "a\0b"}}, "auth.tokens_file"),
    ({"auth": {"tokens_file": "x" * 300}}, "auth.tokens_file"),
    ({"state": "sqlite:a\0b"}, "state"),  # (serve said only "ValueError: embedded null byte")
    ({"state": "sqlite:" + "x" * 300}, "state"),
])
def test_a_path_the_file_system_cannot_take_is_named_never_a_traceback(tmp_path, change, field):
    """A file name longer than the file system allows, or with a NUL in it, used to end
    `canary validate` (and `canary serve`) in a traceback."""
    digest = hashlib.sha256(b"t").hexdigest()
    doc = {"policies": str(tmp_path), "auth": {"tokens": [
               {"name": "a", "sha256": digest, "role": "viewer"}]},
           "targets": {"web": {"router": "nginx", "file": "up.conf", "upstream": "web",
                               "stable": ["127.0.0.1:1"], "canary": ["127.0.0.1:2"]}}}
    doc.update(change)
    cfg = tmp_path / "canary.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "canary.cli", "validate", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout, out
    assert f": {field}: " in out.stdout + out.stderr, out


def test_a_fifo_or_a_device_among_the_policy_files_is_named_never_waited_on(tmp_path):
    """A FIFO named *.yaml in the policies directory used to hang validate and serve
    (opening it waits for a writer), and /dev/zero was read to the end before its size
    was checked. Each is now one problem, and the command ends."""
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(POLICY)
    os.mkfifo(pdir / "fifo.yaml")
    (pdir / "zero.yaml").symlink_to("/dev/zero")
    digest = hashlib.sha256(b"t").hexdigest()
    cfg = tmp_path / "canary.yaml"
    cfg.write_text(yaml.safe_dump({
        "policies": "policies", "auth": {"tokens": [
            {"name": "a", "sha256": digest, "role": "viewer"}]},
        "targets": {"web": {"router": "nginx", "file": "up.conf", "upstream": "web",
                            "stable": ["127.0.0.1:1"], "canary": ["127.0.0.1:2"]}}}))
    for args in (["validate", str(cfg)], ["serve", "--config", str(cfg)]):
        out = subprocess.run([sys.executable, "-m", "canary.cli", *args], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
        said = out.stdout + out.stderr
        assert out.returncode in (1, 2) and "Traceback" not in said, (args, said)
        assert said.count("not a regular file (a directory, a FIFO or a device)") == 2, said
    # named on the command line, a pipe or a device is read as `cat` would, still bounded
    out = subprocess.run([sys.executable, "-m", "canary.cli", "validate", "/dev/zero",
                          "/dev/stdin"], input=POLICY, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and out.stdout.count("\n") == 1, out
    assert "/dev/zero:1: (file): file is larger than 1048576 bytes" in out.stdout, out


async def test_a_rollout_whose_stored_policy_no_longer_reads_is_rolled_back_not_stuck(tmp_path):
    # stored before durations were checked: `interval: 0.4ms` became "0s", which no
    # longer validates; such a rollout could be neither run nor aborted
    pol = simple_policy(hold=3600)
    store = SqliteStore(str(tmp_path / "state.db"))
    r = decide.start(rollout_id="r-old", target="web", policy=pol, canary_version="v2",
                     stable_version="v1", now=1.0e9, actor="pipeline-token")
    await store.create(rollout=dataclasses.replace(
        r, policy_spec={**r.policy_spec, "interval": "0s"}))
    idle = Controller(store=store, policies={pol.name: pol}, targets={}, routers={},
                      source=SetSource(), clock=RealClock())
    with pytest.raises(Conflict, match=r"stored policy can no longer be read .*interval: must "
                                       r"be longer than 0.*it can only be aborted"):
        await idle.command("r-old", Command(CommandKind.PAUSE, actor="oncall", reason="look"))
    async with controller(tmp_path, policies=[pol], store=store) as (api, _c, target):
        status, data = await api.call("POST", "/api/v1/rollouts/r-old/abort", {"reason": "stuck"},
                                      role="pipeline")
        assert status == 200 or (status == 409 and "rolling back" in data["error"]), data
        r2 = await api.until("r-old", lambda r: r["state"] == "rolled_back")
        assert r2["applied_weight"] == 0 and r2["weight"] == 0
        assert parse_weight(target, target.file.read_text()) == 0
        assert "can no longer be read (interval: must be longer than 0)" in r2["reason"] \
            or "aborted by" in r2["reason"], r2["reason"]
        # the target is free again
        assert (await api.start(canary_version="v3"))["state"] == "progressing"


# ---- 3. deep nesting ------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "stages: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "stages: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
    "stages:\n" + "".join("  " * i + "- \n" for i in range(1, 200)),
])
def test_deeply_nested_yaml_is_one_clear_problem(tmp_path, text):
    found = problems_of(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith("pol.yaml:") and ": (file): malformed YAML: nested more than 64 " \
        "levels deep" in found[0], found


@pytest.mark.parametrize("raw", [
    b'{"reason": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'{"reason": ' + b"[" * 100 + b"]" * 100 + b"}",
    b'{"reason": "x", "a": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
])
async def test_deeply_nested_json_bodies_are_a_400(tmp_path, raw):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/pause", raw=raw)
        assert status == 400 and "nests" in data["error"] and "at most 64" in data["error"], data
        assert (await api.rollout(rid))["state"] == "progressing"


# ---- 4. duplicate keys ----------------------------------------------------------------------


async def test_a_body_with_a_key_twice_is_a_400_naming_the_key(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                      raw=b'{"reason": "ok", "reason": "\\u001b[2Jwiped"}',
                                      role="pipeline")
        assert status == 400 and data["error"].startswith("reason: appears twice"), data
        status, data = await api.call("POST", "/api/v1/rollouts", role="pipeline",
                                      raw=b'{"target": "web", "canary_version": "v3", '
                                          b'"target": "other"}')
        assert status == 400 and data["error"].startswith("target: appears twice"), data
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/pause",
                                      raw=b'{"reason": NaN}')
        assert status == 400 and "NaN is not JSON" in data["error"], data
        assert (await api.rollout(rid))["state"] == "progressing"


# ---- 5. tokens and headers ------------------------------------------------------------------


async def raw_request(base: str, head: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_token_that_is_not_utf8_is_a_401_and_any_case_of_bearer_works(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with controller(tmp_path) as (api, _c, _t):
        answer = await raw_request(api.base, b"GET /api/v1/rollouts HTTP/1.1\r\nHost: x\r\n"
                                             b"Authorization: Bearer tok-\xff\xfe\x80\r\n"
                                             b"Connection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), answer
        assert "not UTF-8" in json.loads(body)["error"]
        for scheme in ("bearer", "BEARER", "Bearer"):
            async with api.s.get(api.base + "/api/v1/rollouts",
                                 headers={"Authorization": f"{scheme} {TOKENS['viewer']}"}) as r:
                assert r.status == 200, scheme
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no traceback logged"


@pytest.mark.e2e
async def test_an_oversized_header_never_puts_the_token_in_the_log(tmp_path):
    secret = "tok-oncall"
    pdir = tmp_path / "policies"
    pdir.mkdir()
    (pdir / "p.yaml").write_text(POLICY)
    port = free_port()
    cfg = tmp_path / "canary.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "state": f"sqlite:{tmp_path / 'state.db'}",
        "prometheus": {"url": "http://127.0.0.1:9", "timeout": "1s"}, "policies": str(pdir),
        "auth": {"tokens": [{"name": t.name, "sha256": t.sha256, "role": t.role.name.lower()}
                            for t in tokens()]},
        "targets": {"web": {"router": "nginx", "file": str(tmp_path / "up.conf"),
                            "upstream": "web", "stable": ["127.0.0.1:9001"],
                            "canary": ["127.0.0.1:9002"], "test": ["true"], "reload": ["true"],
                            "policy": "p"}}}))
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canary.cli", "serve", "--config", str(cfg),
            stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
            env={**os.environ, "CANARY_LOG_LEVEL": "DEBUG"})
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{base}/healthz")
        pad = "SECRETPAD" * 2300  # over aiohttp's 8 KiB line limit: 20 KB
        for name in (b"Authorization: Bearer ", b"authorization: bearer ", b"X-Token: "):
            answer = await raw_request(base, b"GET /api/v1/rollouts HTTP/1.1\r\nHost: x\r\n"
                                       + name + (secret + pad).encode()
                                       + b"\r\nConnection: close\r\n\r\n")
            assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")) or answer == b"", answer
        # and the server is still fine
        async with aiohttp.ClientSession() as s:
            api = Api(base, s)
            assert (await api.call("GET", "/api/v1/rollouts", role="viewer"))[0] == 200
    finally:
        proc.terminate()
        await proc.wait()
    text = log.read_text()
    assert "refused a malformed HTTP request from 127.0.0.1: LineTooLong" in text, text[-2000:]
    assert secret not in text and "SECRETPAD" not in text, "header content reached the log"
    assert "Traceback" not in text


# ---- 6. versions ----------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("canary_version", "v2\n"), ("stable_version", "v1\n"), ("canary_version", "v2\r"),
    ("canary_version", "v2 "), ("canary_version", "\nv2"),
])
async def test_a_version_is_checked_as_a_whole_string(tmp_path, field, value):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        body = {"target": "web", "canary_version": "v2", field: value}
        status, data = await api.call("POST", "/api/v1/rollouts", body, role="pipeline")
        assert status == 400 and data["error"].startswith(f"{field}: "), data
        assert (await api.call("GET", "/api/v1/rollouts", role="viewer"))[1]["rollouts"] == []


# ---- 7. control characters ------------------------------------------------------------------

CONTROLS = ["\x1b[2J\x1b[31mall good", "ok\rDONE", "nul\x00", "line\nbreak", "tab\there",
            "c1\x85\x9b31m", "bidi \u202egnp.exe", "isolate \u2066x\u2069", "del\x7f",
            "sep\u2028x"]


@pytest.mark.parametrize("reason", CONTROLS)
async def test_a_reason_with_control_characters_is_a_400_naming_the_field(tmp_path, reason):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        before = await api.rollout(rid)
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"reason": reason})
        assert status == 400 and data["error"].startswith("reason: contains the control "
                                                          "character U+"), data
        after = await api.rollout(rid)
        assert after["state"] == "progressing" and after["events"] == before["events"]


async def test_a_reason_with_half_a_utf16_pair_is_a_400_saying_so(tmp_path):
    # JSON can escape a lone surrogate ("\ud800"); it is no character, and the answer says
    # so in canary's words, not the validator's
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/pause",
                                      {"reason": "ab\ud800c"})
        assert status == 400 and data["error"].startswith(
            "reason: must be text of whole characters: it holds a lone UTF-16 surrogate"), data
        assert (await api.rollout(rid))["state"] == "progressing"


async def run_cli(*args: str, server: str) -> tuple[int, str, str]:
    return await cli(*args, server=server, token=TOKENS["viewer"])


@pytest.mark.e2e
async def test_canary_status_never_prints_control_characters_raw(tmp_path):
    hostile = "\x1b]0;pwned\x07\x1b[2J\rnul\x00 c1\x9b bidi \u202eexe.txt \u2066x\u2069"
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"reason": "look"})
        # text stored before the API refused it, or from a gate's detail
        for _ in range(20):
            r = await ctl.store.load(rid)
            gates = tuple(dataclasses.replace(g, detail=hostile) for g in r.gates)
            events = (*r.events, Event(at=r.updated_at, type="pause", message=hostile,
                                       actor="on\x1b[8mcall"))
            try:
                await ctl.store.save(rollout=dataclasses.replace(
                    r, reason=hostile, gates=gates, events=events), expected_version=r.version)
                break
            except Exception:
                await asyncio.sleep(0.05)
        outputs = []
        for args in (("status", rid), ("status",)):
            code, out, err = await run_cli(*args, server=api.base)
            assert code == 0, err
            assert not [c for c in out if is_control(c) and c != "\n"], repr(out)
            # shown, escaped, exactly as stored
            assert "\\x1b]0;pwned\\x07\\x1b[2J\\x0dnul\\x00 c1\\x9b bidi \\u202eexe.txt " \
                   "\\u2066x\\u2069" in out, out
            outputs.append(out)
        assert "on\\x1b[8mcall" in outputs[0]


# ---- 8. bounded size ------------------------------------------------------------------------


@pytest.mark.e2e
async def test_a_rollout_stays_small_however_often_it_is_paused_with_long_reasons(tmp_path,
                                                                                  caplog):
    caplog.set_level(logging.INFO, logger="canary.controller")
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        reason = "x" * 1000
        for i in range(1000):
            for kind in ("pause", "resume"):
                status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/{kind}",
                                              {"reason": f"{i} {kind} {reason}"[:1000]})
                assert status == 200, data
        status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                      {"reason": "enough"}, role="pipeline")
        assert status == 200, data
        r = await api.until(rid, lambda r: r["state"] == "rolled_back")
    with sqlite3.connect(tmp_path / "state.db") as db:
        (size,) = db.execute("SELECT length(data) FROM rollouts WHERE id = ?", (rid,)).fetchone()
    assert size < 100_000, size  # about 70 KB; it was 1.1 MB
    events = r["events"]
    assert events[0]["type"] == "start", "how it began is kept"
    assert [e["type"] for e in events[-3:]] == ["abort", "rollback", "rolled_back"]
    marks = [e for e in events if e["type"] == "trimmed"]
    assert len(marks) == 1
    dropped = int(marks[0]["message"].split()[0])
    assert dropped + len(events) - 1 == 1 + 2000 + 3, "every event is kept or counted"
    times = [e["at"] for e in events]
    assert times == sorted(times)
    # events recorded after trimming began are still logged
    logged = [rec.msg for rec in caplog.records if getattr(rec, "rollout", None) == rid]
    assert "aborted by pipeline-token: enough" in logged and "all traffic on stable" in logged


def test_a_number_in_exponent_form_yaml_reads_as_text_gets_how_to_write_it(tmp_path):
    """A signed exponent (`5e-3`, and `1e-09`, the form helm writes any value below 1e-6
    in) is read as the number, as an editor and helm read it. YAML 1.1 (PyYAML) reads an
    unsigned one (`5e2`) as text: the field's range message alone would look wrong for a
    number that is in range, so the message says how to write it, and the form it
    suggests is read as the number."""
    assert problems_of(tmp_path, POLICY + ERRORS_GATE + "    alpha: 5e-3\n") == []
    assert problems_of(tmp_path, POLICY + ERRORS_GATE + "    alpha: 1e-09\n") == []
    found = problems_of(tmp_path, POLICY + ERRORS_GATE + "    gross: 5e2\n")
    assert len(found) == 1, found
    assert "gates[1].gross: " in found[0], found
    assert "YAML reads 5e2 as text, not a number: write 5.0e+2 or 500" in found[0], found
    assert problems_of(tmp_path, POLICY + ERRORS_GATE + "    gross: 5.0e+2\n") == []
    assert problems_of(tmp_path, POLICY + ERRORS_GATE + "    gross: 500\n") == []


@pytest.mark.parametrize("field,text,words", [
    # refused as a number too: no form to write is offered that would be refused again
    ("alpha", "5e3", "the number it stands for, 5000, is refused too"),
    ("alpha", "1e400", "too large for a number"),
    # a whole-number field: 2.5e+1 is the float 25.0, which weight takes as 25, as the
    # editor and helm do (test_schema.py::test_a_whole_number_written_with_a_zero_fraction...)
    ("weight", "2.5e1", "write 2.5e+1 or 25)"),
    ("gross", "5E2", "write 5.0e+2 or 500)"),
])
def test_every_form_the_exponent_hint_offers_is_accepted(tmp_path, field, text, words):
    """The hint for a number YAML read as text offers only forms the field takes: it
    said 'write 1.0e+400' (read as infinity, refused), 'write 5.0e+3 or 5000' for a field
    below 0.5 (both refused) and 'write 2.5e+1 or 25' for a weight (2.5e+1 is the float
    25.0: 'must be a whole percent')."""
    def policy(value: str) -> str:
        if field == "weight":
            return POLICY.replace("  - weight: 10\n", f"  - weight: {value}\n") + ERRORS_GATE
        return POLICY + ERRORS_GATE + f"    {field}: {value}\n"
    [found] = problems_of(tmp_path, policy(text))
    line = 4 if field == "weight" else 16
    name = "stages[0].weight" if field == "weight" else f"gates[1].{field}"
    assert found.startswith(f"pol.yaml:{line}: {name}: "), found
    assert f"YAML reads {text} as text, not a number" in found, found
    assert words in found, found
    offered = found.split(": write ")[1].rstrip(")").split(" or ") if ": write " in found else []
    for form in offered:
        assert problems_of(tmp_path, policy(form)) == [], (form, found)


@pytest.mark.parametrize("field,written,bare", [
    ("alpha", '"0.005"', "0.005"),
    ("wander", "'0.1'", "0.1"),
    ("weight", '"25"', "25"),
    # a signed exponent is a number to canary's loader (yamlsrc), so quoted it is a number
    # in quotes too: the hint said 'YAML reads 5.0e-3 as text ...: write 5.0e-3 or 0.0050'
    ("alpha", '"5e-3"', "5e-3"),
    ("alpha", "'5.0E-3'", "5.0E-3"),
])
def test_a_number_in_quotes_gets_how_to_write_it(tmp_path, field, written, bare):
    """A number in quotes is text to YAML: 'alpha: "0.005"' was refused with 'must be
    between 0 and 0.5' alone, which reads as wrong of 0.005. The message says to write
    it without the quotes, and that form is accepted."""
    def policy(value: str) -> str:
        if field == "weight":
            return POLICY.replace("  - weight: 10\n", f"  - weight: {value}\n") + ERRORS_GATE
        return POLICY + ERRORS_GATE + f"    {field}: {value}\n"
    [found] = problems_of(tmp_path, policy(written))
    name = "stages[0].weight" if field == "weight" else f"gates[1].{field}"
    assert f": {name}: " in found, found
    assert f'(YAML reads "{bare}" in quotes as text, not a number: write {bare})' in found, \
        found
    assert problems_of(tmp_path, policy(bare)) == []
    # text that is no number, or a number the field refuses, gets no such hint
    for other in ('"lots"', '"-1"', '".nan"'):
        [found] = problems_of(tmp_path, policy(other))
        assert "in quotes" not in found, found


@pytest.mark.parametrize("fields,said", [
    ('    requests: r{version="{{ version }}"}\n    errors: e{version="{{ version }}"}\n',
     "gates[0]: requests, errors are fields of an errors gate: add kind: errors"),
    ('    query: x{version="{{ version }}"}\n    max_ratio: 1.2\n',
     "gates[0]: max_ratio is a field of a compare gate: add kind: compare"),
])
def test_a_gate_written_without_its_kind_is_told_which_kind_to_add(tmp_path, fields, said):
    """A gate without kind is a threshold gate: an errors gate whose kind was left out
    was told 'query: required' and 'requests: unknown field' and 'errors: unknown field',
    none of which says what to do."""
    text = "stages:\n  - weight: 100\n    hold: 1m\ngates:\n  - name: g\n" + fields
    [found] = problems_of(tmp_path, text)
    assert found.startswith("pol.yaml:5: ") and said in found, found
    assert problems_of(tmp_path, text.replace("  - name: g\n", "  - name: g\n    kind: "
                                              + said.rsplit(" ", 1)[1] + "\n")) == []
