"""Notifications survive a controller crash: a real `canary serve` is killed with SIGKILL
while the receiver is down, started again, and once the receiver is back it has every
message of the rollout, in order, none twice with the same idempotency key."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from canary.demo.procs import free_port
from tests.doubles import PrometheusDouble
from tests.helpers import Api, eventually, tokens
from tests.receivers import Receiver

pytestmark = pytest.mark.e2e


def write_config(tmp: Path, prom: str, port: int, receiver: str) -> Path:
    pdir = tmp / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "interval": "1s", "failure_limit": 2, "progress_deadline": "1m",
        "stages": [{"weight": w, "hold": "1s"} for w in (10, 30, 60, 100)],
        "gates": [{"name": "errors", "query": 'errors{v="{{ canary_version }}"}',
                   "max": 0.1}]}))
    cfg = {
        "listen": f"127.0.0.1:{port}", "state": f"sqlite:{tmp / 'state.db'}",
        "prometheus": {"url": prom, "timeout": "1s"}, "policies": str(pdir),
        "auth": {"tokens": [{"name": t.name, "sha256": t.sha256, "role": t.role.name.lower()}
                            for t in tokens()]},
        "targets": {"web": {"router": "nginx", "file": str(tmp / "web.conf"), "upstream": "web",
                            "stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"],
                            "test": ["true"], "reload": ["true"], "policy": "p",
                            "stable_version": "v1"}},
        "notifications": [{"name": "ops", "url": receiver, "format": "webhook",
                           "timeout": "1s"}],
    }
    path = tmp / "canary.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def serve(config: Path, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as logf:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canary.cli", "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf)


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_a_receiver_down_across_a_controller_crash_gets_every_message_once(tmp_path):
    prom = PrometheusDouble(value=0.0)
    await prom.start()
    rx = Receiver()
    await rx.start()
    port = free_port()
    config = write_config(tmp_path, prom.url, port, rx.url)
    log = tmp_path / "canary.log"
    proc = await serve(config, log)
    try:
        async with aiohttp.ClientSession() as s:
            api = Api(f"http://127.0.0.1:{port}", s)

            async def up():
                with contextlib.suppress(aiohttp.ClientError):
                    return (await api.call("GET", "/healthz", role=None))[0] == 200
                return False
            await eventually(up, what="canary serving")
            r = await api.start(canary_version="v2")
            await api.until(r["id"], lambda x: x["stage"] >= 1)
            await eventually(lambda: _count(rx, 2), what="first messages while it is up")
            await rx.stop()                       # the receiver goes down ...
            await api.until(r["id"], lambda x: x["stage"] >= 2)
            await kill(proc)                      # ... and the controller is killed
            assert proc.returncode == -signal.SIGKILL
            proc = await serve(config, log)
            await eventually(up, what="canary serving again")
            r = await api.until(r["id"], lambda x: x["state"] == "succeeded")
            await rx.start()                      # the receiver comes back

            async def every():
                return rx.got if {x.json["event"]["type"] for x in rx.got} >= {
                    "succeeded"} else None
            await eventually(every, deadline=90, what="every message delivered")
            got = [x.headers["Idempotency-Key"] for x in rx.got]
            want = [f"{r['id']}-{i}" for i, e in enumerate(r["events"])
                    if e["type"] in ("start", "stage", "succeeded")]
            assert got == want, "every message, in order, none twice"
            assert [x.json["idempotency_key"] for x in rx.got] == got
    finally:
        await kill(proc)
        await rx.stop()
        await prom.stop()
    assert "Traceback" not in log.read_text()


async def _count(rx: Receiver, n: int) -> bool:
    return len(rx.got) >= n
