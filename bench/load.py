"""Load benchmark (guarantee 7): one controller holding many concurrent rollouts against
a fast router double and a Prometheus HTTP double, while the API serves a steady stream
of reads and overrides. Prints evaluation lateness, missed intervals, and abort latency
(request sent -> router carries weight 0) as percentiles.

    .venv/bin/python -m bench.load --rollouts 200 --interval 10 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from canary.api.app import build_app
from canary.clock import RealClock
from canary.config import NginxTarget
from canary.demo.procs import free_port
from canary.engine.controller import Controller
from canary.gates.prometheus import CoalescingSource, PrometheusSource
from canary.policy import NoData, Policy, Stage, ThresholdGate
from canary.store.sqlite import SqliteStore
from tests.doubles import PrometheusDouble
from tests.helpers import TOKENS, tokens


class MemoryRouter:
    """A router that applies at once and remembers when each weight came into force."""

    def __init__(self) -> None:
        self.weight: int | None = 0
        self.changes: list[tuple[float, int]] = []
        self.zeroed = asyncio.Event()

    async def get_weight(self) -> int | None:
        return self.weight

    async def check(self) -> None:
        return None

    async def decision(self) -> str | None:
        return None

    async def set_weight(self, weight: int, *, decision: str | None = None) -> None:
        await asyncio.sleep(0.001)
        self.weight = weight
        self.changes.append((time.monotonic(), weight))
        if weight == 0 and len(self.changes) > 1:
            self.zeroed.set()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(n: int, interval: float, duration: float, aborts: int, hold: float,
              reads_per_s: float, shared_queries: bool = False, wait_stage: int = 0,
              wait_limit: float = 120.0) -> dict[str, Any]:
    """Run for `duration`, then (if `wait_stage`) keep going until every rollout has
    finished or reached that stage, for at most `wait_limit` more seconds: a test asserts on
    what happened, not on how fast a busy machine got there."""
    prom = PrometheusDouble(0.001)
    # per-target queries (the usual case), or one service-wide query every rollout shares
    svc = "shared" if shared_queries else "{{ target }}"
    await prom.start()
    tmp = Path(tempfile.mkdtemp(prefix="canary-bench-"))
    pol = Policy(name="bench", interval=interval, failure_limit=2, no_data=NoData.HOLD,
                 progress_deadline=hold * 10 + interval * 10,
                 stages=(Stage(5, hold), Stage(25, hold), Stage(50, hold), Stage(100, hold)),
                 gates=(ThresholdGate("errors", "sum(rate(errors{svc=\"" + svc + "\"}[1m]))", max=0.01),
                        ThresholdGate("latency", "p99{svc=\"" + svc + "\"}", max=0.5)))
    targets = {f"t{i}": NginxTarget(name=f"t{i}", file=tmp / f"t{i}.conf", upstream=f"t{i}",
                                    stable=("127.0.0.1:1",), canary=("127.0.0.1:2",),
                                    policy="bench") for i in range(n)}
    routers = {name: MemoryRouter() for name in targets}
    store = SqliteStore(str(tmp / "state.db"))
    ctl = Controller(store=store, policies={"bench": pol}, targets=targets, routers=routers,
                     source=CoalescingSource(PrometheusSource(prom.url, timeout=5)),
                     clock=RealClock())
    runner = web.AppRunner(build_app(ctl, tokens()), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    cpu0 = time.process_time()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    read_latency: list[float] = []
    abort_latency: list[float] = []
    abort_status: list[int] = []
    read_status: list[int] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
            pipe = {"Authorization": f"Bearer {TOKENS['pipeline']}"}
            view = {"Authorization": f"Bearer {TOKENS['viewer']}"}
            ids = []
            for name in targets:
                async with s.post(f"{base}/api/v1/rollouts", headers=pipe,
                                  json={"target": name, "canary_version": "v2",
                                        "stable_version": "v1"}) as r:
                    ids.append((name, (await r.json())["id"]))
            start = time.monotonic()
            queries0 = prom.queries  # (the creation burst's evaluations are not a tick's)
            stop = start + duration
            cpu0 = time.process_time()  # from here: the steady state, not the creation burst

            async def reader() -> None:
                rng = random.Random(1)
                while time.monotonic() < stop:
                    rid = rng.choice(ids)[1]
                    t0 = time.monotonic()
                    path = f"/api/v1/rollouts/{rid}" if rng.random() < 0.9 else "/api/v1/rollouts"
                    async with s.get(base + path, headers=view) as r:
                        await r.read()
                        read_status.append(r.status)
                    read_latency.append(time.monotonic() - t0)
                    await asyncio.sleep(1 / reads_per_s)

            async def aborter() -> None:
                rng = random.Random(2)
                victims = rng.sample(ids, min(aborts, len(ids)))
                for name, rid in victims:
                    await asyncio.sleep(duration / (len(victims) + 1))
                    t0 = time.monotonic()
                    async with s.post(f"{base}/api/v1/rollouts/{rid}/abort", headers=pipe,
                                      json={"reason": "bench"}) as r:
                        abort_status.append(r.status)
                        if r.status != 200:
                            continue  # 409: it had already finished
                    await routers[name].zeroed.wait()
                    abort_latency.append(time.monotonic() - t0)

            await asyncio.gather(reader(), aborter())
            settle = time.monotonic() + 10 + (wait_limit if wait_stage else 0)
            while True:  # the last abort's confirmation may still be on its way to the store
                async with s.get(f"{base}/api/v1/rollouts", headers=view) as r:
                    final = (await r.json())["rollouts"]
                if time.monotonic() > settle or all(_settled(x, wait_stage) for x in final):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - start
            async with s.get(f"{base}/metrics") as r:
                metrics = await r.text()
    finally:
        await runner.cleanup()
        await store.close()
        await prom.stop()
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    delays = _histogram(metrics, "canary_evaluation_delay_seconds")
    missed = _value(metrics, "canary_missed_intervals_total")
    states: dict[str, int] = {}
    stages: dict[int, int] = {}
    for r in final:
        states[r["state"]] = states.get(r["state"], 0) + 1
        stages[r["stage"]] = stages.get(r["stage"], 0) + 1
    evals = prom.queries / max(1, len(pol.gates))
    return {
        "rollouts": n, "interval_s": interval, "duration_s": round(elapsed, 1),
        "evaluations": int(evals),
        "evaluation_delay_s": delays,
        "missed_intervals": missed,
        "aborts_accepted": abort_status.count(200),
        "abort_to_weight0_ms": {"n": len(abort_latency),
                                "p50": round(pct(abort_latency, 0.5) * 1000, 1),
                                "p99": round(pct(abort_latency, 0.99) * 1000, 1),
                                "max": round(max(abort_latency, default=float("nan")) * 1000, 1)},
        "reads_failed": sum(1 for st in read_status if st != 200),
        "read_latency_ms": {"n": len(read_latency),
                            "p50": round(pct(read_latency, 0.5) * 1000, 1),
                            "p99": round(pct(read_latency, 0.99) * 1000, 1)},
        "prometheus_queries_per_tick": round((prom.queries - queries0)
                                             / max(1, elapsed / interval), 1),
        "cpu_s_per_rollout_per_min": round(cpu / n / (elapsed / 60), 4),
        "cpu_share_of_one_core": round(cpu / elapsed, 3),
        "max_rss_mb_growth_per_rollout": round((rss - rss0) / 1024 / n, 3),
        "states": states,
        "stages": dict(sorted(stages.items())),
    }


def _settled(rollout: dict[str, Any], wait_stage: int) -> bool:
    if rollout["state"] == "rolling_back":
        return False
    return rollout["state"] != "progressing" or rollout["stage"] >= wait_stage


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _histogram(text: str, name: str) -> dict[str, float]:
    """Approximate p50/p99 from the histogram's cumulative buckets (upper bounds)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0.0
    out = {"n": total}
    for q in (0.5, 0.99):
        out[f"p{int(q * 100)}_at_most"] = next((le for le, c in buckets if c >= q * total),
                                               float("nan"))
    out["mean"] = round(_value(text, name + "_sum") / total, 4) if total else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=200)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--hold", type=float, default=3600.0, help="stage hold (long: stay busy)")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--aborts", type=int, default=20)
    p.add_argument("--reads-per-s", type=float, default=20.0)
    p.add_argument("--shared-queries", action="store_true",
                   help="every rollout's gates read the same series (shows query coalescing)")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # the rollouts' own story is not the benchmark's output
    result = asyncio.run(run(args.rollouts, args.interval, args.duration, args.aborts, args.hold,
                             args.reads_per_s, args.shared_queries))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
