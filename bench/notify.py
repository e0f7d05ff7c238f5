"""Does telling people slow an abort? Abort -> rolled back (weight 0 in force and saved),
measured on an in-process controller with a real nginx-format file, in three setups:

- quiet: no notification receivers, no hooks;
- hung receivers: three receivers that accept connections and never answer (each
  delivery waits out its 30 s timeout), plus a fast one, all subscribed to every event;
- hung stage hook: the policy's stage hook never answers (600 s timeout), so every
  evaluation waits on it when the abort arrives.

Printed as p50/p99 with the spread, per setup.

    .venv/bin/python -m bench.notify --aborts 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from canary.clock import RealClock
from canary.demo.procs import Blackhole, free_port, serve_app
from canary.engine.controller import Controller
from canary.gates.kinds import ThresholdGate
from canary.hooks import Webhook
from canary.model import Command, CommandKind, Phase, Rollout
from canary.notify import Notification, Notifier
from canary.policy import NoData, Policy
from canary.routers.nginx import NginxRouter
from canary.stages import Stage
from canary.store.sqlite import SqliteStore
from canary.targets import NginxTarget


class Zero:
    async def query(self, promql: str) -> float | None:
        return 0.0


def policy(hook: str | None) -> Policy:
    hooks = (Webhook(name="smoke", when="stage", url=hook, timeout=600.0),) if hook else ()
    return Policy(name="p", interval=0.2, failure_limit=2, no_data=NoData.HOLD,
                  progress_deadline=7200.0, stages=(Stage(10, 3600.0), Stage(100, 1.0)),
                  gates=(ThresholdGate("errors", "errors", max=0.05),), webhooks=hooks)


async def until(store: SqliteStore, rollout_id: str, check: Callable[[Rollout], bool]) -> None:
    """Poll the store every 2 ms until the rollout passes `check`."""
    for _ in itertools.count():
        if check(await store.load(rollout_id)):
            return
        await asyncio.sleep(0.002)


def spread(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": round(xs[len(xs) // 2] * 1000, 1),
            "p99_ms": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000, 1),
            "max_ms": round(xs[-1] * 1000, 1),
            "stdev_ms": round(statistics.pstdev(xs) * 1000, 1)}


async def run(setup: str, aborts: int, tmp: Path) -> dict[str, float]:
    async with contextlib.AsyncExitStack() as stack:
        hung = [await stack.enter_async_context(Blackhole()) for _ in range(3)]
        ok_port = free_port()
        app = web.Application()
        app.router.add_post("/", lambda _r: web.Response(text="ok"))
        runner = await serve_app(app, ok_port)
        stack.push_async_callback(runner.cleanup)
        target = NginxTarget(name="web", file=tmp / f"{setup}.conf", upstream="web",
                             stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                             test=("true",), reload=("true",), policy="p")
        store = SqliteStore(str(tmp / f"{setup}.db"))
        stack.push_async_callback(store.close)
        ctl = Controller(store=store, policies={"p": policy(hung[0] if setup == "hung stage "
                                                            "hook" else None)},
                         targets={"web": target}, routers={"web": NginxRouter(target)},
                         source=Zero(), clock=RealClock(), retry_max=1.0)
        if setup == "hung receivers":
            ctl.notifier = Notifier(
                [Notification(name=f"hung{i}", url=u, timeout=30.0) for i, u in enumerate(hung)]
                + [Notification(name="ok", url=f"http://127.0.0.1:{ok_port}/")],
                store, clock=ctl.clock, metrics=ctl.metrics)
        await ctl.start()
        stack.push_async_callback(ctl.stop)
        took = []
        for i in range(aborts):
            r = await ctl.create(target="web", canary_version=f"v{i + 2}", stable_version="v1",
                                 policy=None, actor="bench")
            await until(store, r.id, lambda x: x.applied_weight == 10)
            await asyncio.sleep(0.3)  # an evaluation (and its hook) under way
            t0 = time.perf_counter()
            await ctl.command(r.id, Command(CommandKind.ABORT, "bench", "bench"))
            await until(store, r.id, lambda x: x.state is Phase.ROLLED_BACK)
            took.append(time.perf_counter() - t0)
        return spread(took)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aborts", type=int, default=20)
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # the controller's event log is not the output
    with tempfile.TemporaryDirectory() as d:
        out = {}
        for setup in ("quiet", "hung receivers", "hung stage hook"):
            out[setup] = await run(setup, args.aborts, Path(d))
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
