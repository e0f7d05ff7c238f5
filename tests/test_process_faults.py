"""The controller as a process under faults a host really has: a second controller on
the same state file, a port already taken, and a wall clock stepped under it (libfaketime,
Debian's `faketime` package, makes the process see the step; its monotonic clock runs on)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from canary.demo.procs import free_port, wait_http
from canary.engine import decide
from canary.policy import parse
from canary.store.sqlite import SqliteStore
from tests.doubles import PrometheusDouble
from tests.helpers import TOKENS, Api

pytestmark = [pytest.mark.e2e, pytest.mark.serial]
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")

POLICY = {
    "name": "p", "interval": "1s", "failure_limit": 2, "progress_deadline": "10m",
    "stages": [{"weight": 10, "hold": "60s"}, {"weight": 100, "hold": "1s"}],
    "gates": [{"name": "errors", "query": 'errors{svc="{{ service }}"}', "max": 0.05}],
}


def write_config(d: Path, *, port: int, state: Path, prometheus: str,
                 policy: dict[str, Any] = POLICY) -> Path:
    (d / "policies").mkdir(parents=True, exist_ok=True)
    (d / "policies" / "p.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    cfg = {
        "listen": f"127.0.0.1:{port}", "state": f"sqlite:{state}",
        "prometheus": {"url": prometheus, "timeout": "2s"}, "policies": str(d / "policies"),
        "auth": {"tokens": [{"name": f"{role}-token", "role": role,
                             "sha256": hashlib.sha256(tok.encode()).hexdigest()}
                            for role, tok in TOKENS.items()]},
        "targets": {"web": {"router": "nginx", "file": str(d / "upstream.conf"),
                            "upstream": "web", "stable": ["127.0.0.1:9001"],
                            "canary": ["127.0.0.1:9002"], "test": ["true"],
                            "reload": ["true"], "policy": "p", "vars": {"service": "web"},
                            "stable_version": "v1"}},
    }
    path = d / "canary.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


async def serve(config: Path, log: Path, env: dict[str, str] | None = None
                ) -> asyncio.subprocess.Process:
    with open(log, "ab") as f:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canary.cli", "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f,
            env={**os.environ, **(env or {})})


async def ended(proc: asyncio.subprocess.Process, deadline: float = 30.0) -> int:
    async with asyncio.timeout(deadline):
        return await proc.wait()


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await ended(proc, 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def prometheus(value: float = 0.0) -> AsyncIterator[PrometheusDouble]:
    prom = PrometheusDouble(value=value)
    await prom.start()
    try:
        yield prom
    finally:
        await prom.stop()


async def test_a_second_controller_on_the_same_state_file_exits_2_naming_the_first(tmp_path):
    async with prometheus() as prom:
        state = tmp_path / "state.db"
        a_cfg = write_config(tmp_path / "a", port=free_port(), state=state, prometheus=prom.url)
        b_cfg = write_config(tmp_path / "b", port=free_port(), state=state, prometheus=prom.url)
        a_port = int(yaml.safe_load(a_cfg.read_text())["listen"].rsplit(":", 1)[1])
        a = await serve(a_cfg, tmp_path / "a.log")
        try:
            await wait_http(f"http://127.0.0.1:{a_port}/readyz")
            b = await serve(b_cfg, tmp_path / "b.log")
            assert await ended(b) == 2
            text = (tmp_path / "b.log").read_text()
            assert f"{state} is in use by another canary controller (pid {a.pid}" in text, text
            assert a.returncode is None, "the first controller runs on"
        finally:
            await stop(a)


async def test_a_controller_that_cannot_listen_resumes_nothing(tmp_path):
    async with prometheus() as prom:
        port = free_port()
        a_cfg = write_config(tmp_path / "a", port=port, state=tmp_path / "a.db",
                             prometheus=prom.url)
        b_dir = tmp_path / "b"
        b_cfg = write_config(b_dir, port=port, state=tmp_path / "b.db", prometheus=prom.url)
        store = SqliteStore(str(tmp_path / "b.db"))
        pol = parse(yaml.safe_dump(POLICY), file="p.yaml", default_name="p")
        r = decide.start(rollout_id="r-1", target="web", policy=pol, canary_version="v2",
                         stable_version="v1", now=time.time(), actor="pipeline")
        await store.create(rollout=r)
        await store.close()
        a = await serve(a_cfg, tmp_path / "a.log")
        try:
            await wait_http(f"http://127.0.0.1:{port}/readyz")
            b = await serve(b_cfg, tmp_path / "b.log")
            assert await ended(b) == 2
            assert "cannot listen on 127.0.0.1" in (tmp_path / "b.log").read_text()
            assert not (b_dir / "upstream.conf").exists(), "no weight was applied"
            store = SqliteStore(str(tmp_path / "b.db"))
            assert (await store.load("r-1")).version == 1, "the rollout was not touched"
            await store.close()
        finally:
            await stop(a)


@asynccontextmanager
async def stepped_controller(tmp_path: Path, policy: dict[str, Any], prom: PrometheusDouble
                             ) -> AsyncIterator[tuple[Api, Path]]:
    """`canary serve` seeing a wall clock the test steps by writing `clock`."""
    if not FAKETIME.exists():
        pytest.skip("libfaketime is missing: scripts/setup installs Debian's faketime")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    port = free_port()
    cfg = write_config(tmp_path, port=port, state=tmp_path / "state.db", prometheus=prom.url,
                       policy=policy)
    proc = await serve(cfg, tmp_path / "serve.log", env={
        "LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        async with aiohttp.ClientSession() as s:
            yield Api(f"http://127.0.0.1:{port}", s), clock
    finally:
        await stop(proc)


def event_times(r: dict[str, Any]) -> list[str]:
    return [e["at"] for e in r["events"]]


async def test_a_wall_clock_stepped_back_does_not_delay_a_rollback(tmp_path):
    async with prometheus(0.0) as prom, stepped_controller(tmp_path, POLICY, prom) as (api, clock):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        clock.write_text("-1h\n")  # NTP, or a VM resumed: the wall clock goes back an hour
        prom.value = 0.5
        r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=30)
        assert "gate errors" in r["reason"]
        assert event_times(r) == sorted(event_times(r)), "event times never go back"


async def test_a_wall_clock_stepped_forward_does_not_cut_a_hold_short(tmp_path):
    policy = {**POLICY, "stages": [{"weight": 10, "hold": "8s"}, {"weight": 100, "hold": "1s"}]}
    async with prometheus(0.0) as prom, stepped_controller(tmp_path, policy, prom) as (api, clock):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        seen = time.monotonic()  # at most this long after the hold began
        clock.write_text("+1h\n")
        await api.until(rid, lambda r: r["stage"] == 1, deadline=60)
        assert time.monotonic() - seen >= 8 - 1.5, "the hold was served in full"
        r = await api.until(rid, lambda r: r["state"] == "succeeded", deadline=30)
        assert event_times(r) == sorted(event_times(r))
