"""The controller as a process: killed with SIGKILL mid-rollout it resumes where it was;
the CLI drives it as a release pipeline and on-call would; logs are JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from canary.demo.playground import fast_policy
from canary.demo.procs import Load, wait_http
from tests.e2e import file_weight, playground, traffic_settles_at
from tests.helpers import Api, SetSource, controller, simple_policy

pytestmark = pytest.mark.e2e


class Process:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        logf = open(self.log, "ab")  # a log file handed to the child
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canary.cli", "serve", "--config", str(self.config),
            stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf)
        logf.close()

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await self.proc.wait()


async def test_controller_killed_mid_rollout_resumes_at_the_same_stage_and_finishes(tmp_path):
    pol = fast_policy("fast", interval="1s", holds=("3s", "4s", "3s", "2s"))
    async with playground(tmp_path) as pg:
        cfg = pg.write_config([pol])
        ctl = Process(cfg, tmp_path / "controller.log")
        load = Load(pg.url, rate=30, limit=30 * 300)
        load.start()
        try:
            await ctl.start()
            await wait_http(f"{pg.api}/readyz")
            async with aiohttp.ClientSession() as s:
                api = Api(pg.api, s)
                rid = (await api.start(canary_version="v2"))["id"]
                await api.until(rid, lambda r: r["applied_weight"] == 25)
                await ctl.kill()
                assert file_weight(pg) == 25, "the router keeps its weight while we are down"
                await traffic_settles_at(pg, 25)
                await ctl.start()
                await wait_http(f"{pg.api}/readyz")
                r = await api.until(rid, lambda r: r["state"] == "succeeded", deadline=90)
            stages = [e["message"].split(" (")[0] for e in r["events"] if e["type"] == "stage"]
            assert stages == ["stage 1: weight 25", "stage 2: weight 50", "stage 3: weight 100"]
            assert [e["type"] for e in r["events"]].count("start") == 1
            assert file_weight(pg) == 100
        finally:
            await ctl.kill(signal.SIGTERM)
            await load.stop()
    lines = (tmp_path / "controller.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == len(lines), "every log line is one JSON object"
    mine = [x for x in records if x.get("rollout") == rid]
    assert any(x.get("event") == "stage" for x in mine) and any("resuming" in x["msg"] for x in mine)
    assert "tok-" not in "\n".join(lines), "tokens never reach the logs"


async def cli(*args: str, server: str, token: str = "tok-pipeline") -> tuple[int, str, str]:
    env = {**os.environ, "CANARY_SERVER": server, "CANARY_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary.cli", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_start_wait_exits_0_when_the_rollout_succeeds_and_shows_progress(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=0.5)]) as (api, _c, _t):
        code, out, err = await cli("start", "web", "--canary-version", "v2", "--stable-version",
                                   "v1", "--wait", server=api.base)
        assert code == 0, err
        assert "weight 10%" in out and "weight 100%" in out and "succeeded" in out
        assert "errors 0 (max 0.05) pass" in out


async def test_start_wait_exits_1_on_rollback_with_the_reason(tmp_path):
    source = SetSource(0.2)
    async with controller(tmp_path, policies=[simple_policy(hold=0.5)], source=source) as (api, _c, _t):
        code, out, _err = await cli("start", "web", "--canary-version", "v2", "--wait",
                                    server=api.base)
        assert code == 1
        assert "rolled_back" in out and "gate errors: value 0.2 above max 0.05" in out


async def test_cli_errors_exit_2_with_a_message(tmp_path):
    code, _out, err = await cli("status", server="http://127.0.0.1:1")
    assert code == 2 and "cannot reach the controller" in err
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        code, _out, err = await cli("start", "nope", "--canary-version", "v2", server=api.base)
        assert code == 2 and "no target named 'nope'" in err and "404" in err
        code, _out, err = await cli("start", "web", "--canary-version", "v2", server=api.base,
                                    token="wrong")
        assert code == 2 and "401" in err
        code, _out, err = await cli("start", "web", server=api.base)
        assert code == 2 and "--canary-version" in err


async def test_a_start_refused_because_the_target_is_busy_exits_2_naming_the_rollout(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        code, out, err = await cli("start", "web", "--canary-version", "v3", "--wait",
                                   server=api.base)
        assert code == 2 and "409" in err and rid in err, (code, out, err)
        status, data = await api.call("GET", "/api/v1/rollouts", role="viewer")
        assert status == 200, data
        assert [r["id"] for r in data["rollouts"]] == [rid], "nothing else was started"


async def test_oncall_overrides_and_status_from_the_cli(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        code, out, _ = await cli("start", "web", "--canary-version", "v2", "--json",
                                 server=api.base)
        rid = json.loads(out)["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        for args in (("pause", rid, "--reason", "look"), ("resume", rid, "--reason", "ok"),
                     ("promote", rid, "--reason", "skip"),
                     ("promote", rid, "--full", "--reason", "ship")):
            code, out, err = await cli(*args, server=api.base, token="tok-oncall")
            assert code == 0, (args, err)
        await api.until(rid, lambda r: r["state"] == "succeeded")
        code, out, _ = await cli("status", rid, server=api.base, token="tok-viewer")
        assert code == 0 and "succeeded" in out and "oncall-token" in out and "ship" in out
        code, out, _ = await cli("status", "--json", server=api.base, token="tok-viewer")
        assert json.loads(out)["rollouts"][0]["id"] == rid
        code, _out, err = await cli("abort", rid, "--reason", "late", server=api.base)
        assert code == 2 and "409" in err


async def test_the_cli_retries_a_503_from_a_follower_and_stops_at_other_errors(tmp_path):
    import argparse

    from aiohttp import web

    from canary.cli import RETRY_FOR, ApiError, call_retrying
    from canary.demo.procs import free_port

    answers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        status = answers.pop(0) if answers else 200
        if status == 503:
            return web.json_response({"error": "this replica is not the leader (leader: pod-b); "
                                               "try again shortly"}, status=503,
                                     headers={"Retry-After": "5"})
        if status == 409:
            return web.json_response({"error": "rollout r1 is already paused"}, status=409)
        return web.json_response({"id": "r1", "state": "paused"})

    app = web.Application()
    app.router.add_post("/api/v1/rollouts/r1/pause", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    args = argparse.Namespace(server=f"http://127.0.0.1:{port}")
    slept: list[float] = []
    try:
        answers[:] = [503, 503]  # two followers, then the leader
        r = await asyncio.to_thread(call_retrying, args, "POST", "/api/v1/rollouts/r1/pause",
                                    {"reason": "x"}, sleep=slept.append)
        assert r["state"] == "paused" and slept == [5.0, 5.0]
        answers[:] = [409]  # a refusal is an answer: no retry
        with pytest.raises(ApiError) as e:
            await asyncio.to_thread(call_retrying, args, "POST", "/api/v1/rollouts/r1/pause",
                                    {"reason": "x"}, sleep=slept.append)
        assert e.value.status == 409 and slept == [5.0, 5.0]
        answers[:] = [503] * 100  # no leader for good: give up after RETRY_FOR seconds
        slept.clear()
        with pytest.raises(ApiError) as e:
            await asyncio.to_thread(call_retrying, args, "POST", "/api/v1/rollouts/r1/pause",
                                    {"reason": "x"}, sleep=slept.append)
        assert e.value.status == 503 and sum(slept) == RETRY_FOR
    finally:
        await runner.cleanup()


def test_status_explains_a_sequential_gate_and_its_verdict():
    from canary.cli import gate_line

    g = {"name": "errors", "kind": "errors", "value": 1.44, "min": None, "max": 2.0,
         "status": "inconclusive", "failures": 0,
         "detail": "not enough canary traffic yet to rule out a 5x regression"}
    assert gate_line(g) == "errors 1.44 (log10 evidence, fires at 2) inconclusive 0"
    assert gate_line(g, detail=True).endswith(": not enough canary traffic yet to rule out "
                                              "a 5x regression")
    t = {"name": "error-rate", "kind": "threshold", "value": 0.01, "min": None, "max": 0.05,
         "status": "pass", "failures": 0, "detail": None}
    assert gate_line(t, detail=True) == "error-rate 0.01 (max 0.05) pass 0"
