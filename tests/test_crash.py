"""Guarantee 1: crash anywhere, lose nothing. The controller is SIGKILLed over and over, at
random moments and at named failpoints (before and after a state write, between the write
and the router, between writing the nginx file and reloading, right after an override),
while rollouts run on four targets and on-call promotes and pauses. After every restart
nothing is lost or duplicated, stages and held time are kept, and every rollout ends with
the router carrying its final weight."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from canary.demo.procs import free_port
from canary.routers.nginx import parse_weight
from canary.targets import NginxTarget
from tests.doubles import PrometheusDouble
from tests.helpers import Api, tokens

pytestmark = [pytest.mark.e2e, pytest.mark.serial]

POINTS = ["before_save", "after_save", "before_apply", "after_apply", "nginx_written",
          "nginx_tested", "after_command"]
TARGETS = [f"web{i}" for i in range(4)]
MIN_KILLS = 50
REPORT: dict[str, Any] = {}


def write_config(tmp: Path, prom: str, port: int) -> Path:
    pdir = tmp / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "crash.yaml").write_text(yaml.safe_dump({
        "name": "crash", "interval": "1s", "failure_limit": 2, "progress_deadline": "1m",
        "stages": [{"weight": 10, "hold": "600ms"}, {"weight": 30, "hold": "600ms"},
                   {"weight": 60, "hold": "600ms", "approval": True},
                   {"weight": 100, "hold": "400ms"}],
        "gates": [{"name": "errors", "query": 'errors{t="{{ target }}",v="{{ canary_version }}"}',
                   "max": 0.1}]}))
    cfg = {
        "listen": f"127.0.0.1:{port}", "state": f"sqlite:{tmp / 'state.db'}",
        "prometheus": {"url": prom, "timeout": "1s"}, "policies": str(pdir),
        "auth": {"tokens": [{"name": t.name, "sha256": t.sha256, "role": t.role.name.lower()}
                            for t in tokens()]},
        "targets": {name: {"router": "nginx", "file": str(tmp / f"{name}.conf"), "upstream": name,
                           "stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"],
                           "test": ["true"], "reload": ["true"], "policy": "crash",
                           "stable_version": "v0"} for name in TARGETS},
    }
    path = tmp / "canary.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stored(db: Path) -> dict[str, dict[str, Any]]:
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {i: json.loads(d) for i, d in con.execute("SELECT id, data FROM rollouts")}
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def file_weight(tmp: Path, target: str) -> int | None:
    t = NginxTarget(name=target, file=tmp / f"{target}.conf", upstream=target,
                    stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",))
    try:
        return parse_weight(t, t.file.read_text())
    except OSError:
        return None


def failpoints(log: Path) -> int:
    return log.read_text().count('"failpoint"') if log.exists() else 0


class Controller:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, failpoints: str = "") -> None:
        env = {**os.environ, "CANARY_FAILPOINTS": failpoints}
        with open(self.log, "ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "canary.cli", "serve", "--config", str(self.config),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf)

    async def listening(self, port: int, deadline: float = 15.0) -> None:
        """Until the port accepts a connection or the process has ended (bounded)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end and self.proc is not None and self.proc.returncode is None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def kill(self) -> bool:
        """SIGKILL; False if it had already died by itself (a failpoint)."""
        assert self.proc is not None
        alive = self.proc.returncode is None
        if alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        return alive


async def drive(api: Api, acked: set[str], rng: random.Random, deadline: float) -> None:
    """Act like pipelines and on-call until cancelled: start rollouts on idle targets,
    approve waiting ones, pause and resume now and then."""
    n = 0
    while time.monotonic() < deadline:
        try:
            _, data = await api.call("GET", "/api/v1/rollouts?state=active", role="viewer")
            active = {r["target"]: r for r in data["rollouts"]}
            for t in TARGETS:
                r = active.get(t)
                if r is None:
                    n += 1
                    status, body = await api.call("POST", "/api/v1/rollouts", {
                        "target": t, "canary_version": f"v{n}"}, role="pipeline")
                    if status == 201:
                        acked.add(body["id"])
                elif r["paused_for"] == "approval" or (r["paused_for"] == "manual"
                                                       and rng.random() < 0.5):
                    kind = "promote" if r["paused_for"] == "approval" else "resume"
                    await api.call("POST", f"/api/v1/rollouts/{r['id']}/{kind}", {"reason": "go"})
                elif r["state"] == "progressing" and rng.random() < 0.05:
                    await api.call("POST", f"/api/v1/rollouts/{r['id']}/pause", {"reason": "look"})
        except (TimeoutError, aiohttp.ClientError, TypeError, KeyError):
            pass  # the controller is down or restarting: that is the point
        await asyncio.sleep(0.05)


async def test_sigkill_at_random_points_loses_nothing_and_every_rollout_finishes(tmp_path):
    rng = random.Random(int(os.environ.get("CANARY_CRASH_SEED", "20261122")))
    # every third release is bad, so rollbacks are crashed into as well as promotions
    prom = PrometheusDouble(answer=lambda q: 0.5 if int(q.split('v="v')[1].split('"')[0]) % 3 == 0
                            else 0.0)
    await prom.start()
    port = free_port()
    cfg = write_config(tmp_path, prom.url, port)
    db = tmp_path / "state.db"
    ctl = Controller(cfg, tmp_path / "controller.log")
    acked: set[str] = set()
    kills: collections.Counter[str] = collections.Counter()
    since: dict[tuple[str, int], float] = {}  # (rollout, stage) -> stage_since seen stored
    loop_end = time.monotonic() + 150
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            api = Api(f"http://127.0.0.1:{port}", s)
            driver = asyncio.create_task(drive(api, acked, rng, loop_end))
            try:
                while sum(kills.values()) < MIN_KILLS and time.monotonic() < loop_end:
                    point = rng.choice(POINTS + ["random"] * 3)
                    before = failpoints(ctl.log)
                    await ctl.start("" if point == "random" else f"{point}=0.3")
                    # each life is counted from when the controller listens (or has died at
                    # a failpoint), so a slow start on a busy machine does not eat it
                    await ctl.listening(port)
                    await asyncio.sleep(rng.uniform(0.0, 1.5))
                    await ctl.kill()
                    kills[point if failpoints(ctl.log) > before else "random"] += 1
                    for rid, r in stored(db).items():
                        key = (rid, r["stage"])
                        if r["stage_since"] is not None and r["state"] not in (
                                "rolled_back", "succeeded") and r["weight"] == r["applied_weight"]:
                            # held time survives restarts: a stage's start is never reset
                            # while its weight stayed in force
                            since.setdefault(key, r["stage_since"])
            finally:
                driver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driver
            # the last controller runs without failpoints until everything is final
            await ctl.start()
            end = time.monotonic() + 60
            while time.monotonic() < end:
                rows = stored(db)
                waiting = [r for r in rows.values() if r["state"] not in ("succeeded", "rolled_back")]
                for r in waiting:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        kind = "promote" if r["pause_kind"] in ("approval", "manual") else None
                        if kind:
                            await api.call("POST", f"/api/v1/rollouts/{r['id']}/{kind}",
                                           {"reason": "finish"})
                if not waiting:
                    break
                await asyncio.sleep(0.2)
    finally:
        if ctl.proc is not None:
            await ctl.kill()
        await prom.stop()

    rows = stored(db)
    total = sum(kills.values())
    finals = collections.Counter(r["state"] for r in rows.values())
    REPORT.update(kills=dict(kills), total_kills=total, rollouts=len(rows), outcomes=dict(finals))
    print(f"\ncrash loop: {total} kills {dict(kills)}; {len(rows)} rollouts {dict(finals)}")
    assert finals["rolled_back"] > 0 and finals["succeeded"] > 0, REPORT
    assert total >= MIN_KILLS, REPORT
    assert acked <= set(rows), "a rollout the API acknowledged is missing from the store"
    assert all(r["state"] in ("succeeded", "rolled_back") for r in rows.values()), REPORT
    per_target = collections.Counter(r["target"] for r in rows.values())
    assert len(rows) >= len(TARGETS) * 2, REPORT
    for t in TARGETS:
        last = max((r for r in rows.values() if r["target"] == t), key=lambda r: r["started_at"])
        # a rollout's weight is the share of the side it shifts to; after a swap that is
        # the configured stable side, and the file counts the canary side's share
        want = last["weight"] if last.get("to_side", "canary") == "canary" \
            else 100 - last["weight"]
        assert file_weight(tmp_path, t) == want, (t, last["state"], last.get("to_side"))
    for rid, r in rows.items():
        entered = [e["message"].split(":")[0] for e in r["events"] if e["type"] == "stage"]
        assert len(entered) == len(set(entered)), f"{rid} entered a stage twice: {entered}"
        assert [e["type"] for e in r["events"]].count("start") == 1
        assert [e["type"] for e in r["events"]].count("approval") <= 1, \
            f"{rid} asked for approval twice"
        times = [e["at"] for e in r["events"]]
        assert times == sorted(times)
    for (rid, stage), t0 in since.items():
        r = rows[rid]
        stage_events = [e for e in r["events"] if e["type"] == "stage"
                        and e["message"].startswith(f"stage {stage}:")]
        assert not stage_events or stage_events[0]["at"] <= t0
    assert sum(per_target.values()) == len(rows)
