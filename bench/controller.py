"""Controller latency on the real playground (nginx, Prometheus, two service versions):

- abort request -> new weight in force: the HTTP call returns, then nginx has been
  reloaded (the upstream file says 0) and requests really stop reaching the canary;
- breach visible in Prometheus -> rollback applied: the canary starts failing, the test
  polls the gate's own query until it shows the breach, then waits for the router;
- the same abort while Prometheus hangs: the controller's Prometheus accepts connections
  and never answers (canary.demo.procs.Blackhole), with --hung-rollouts other rollouts
  evaluating against it every second, each query waiting out its 10 s timeout.

Each is repeated and printed as p50/p99 with the spread.

    .venv/bin/python -m bench.controller --aborts 20 --breaches 5 --hung-rollouts 24
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from canary import config as config_mod
from canary.cli import serving
from canary.demo import procs
from canary.demo.playground import ERROR_RATE, Playground, fast_policy
from canary.fields import render
from canary.routers.nginx import parse_weight


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def file_says(target: Any, weight: int) -> None:
    """Poll the upstream file (the router's truth) every 2 ms until it carries `weight`."""
    for _ in itertools.count():
        if parse_weight(target, target.file.read_text()) == weight:
            return
        await asyncio.sleep(0.002)


def spread(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": round(pct(xs, 0.5) * 1000, 1),
            "p99_ms": round(pct(xs, 0.99) * 1000, 1),
            "min_ms": round(min(xs) * 1000, 1) if xs else float("nan"),
            "max_ms": round(max(xs) * 1000, 1) if xs else float("nan"),
            "stdev_ms": round(statistics.pstdev(xs) * 1000, 1) if xs else float("nan")}


class Aborts:
    """Abort latencies: the HTTP call, the upstream file at 0, no request on the canary."""

    def __init__(self) -> None:
        self.call: list[float] = []
        self.file: list[float] = []
        self.traffic: list[float] = []

    def rows(self) -> dict[str, Any]:
        return {"abort_http_call": spread(self.call),
                "abort_to_upstream_file_written": spread(self.file),
                "abort_to_no_request_on_canary": spread(self.traffic)}


async def measure_abort(s: aiohttp.ClientSession, pg: Playground, rid: str, out: Aborts) -> None:
    """Abort `rid` (at 5%) and record how long each step took."""
    target = pg.target()
    await procs.split(pg.url, 40)  # nginx serves the 5% split
    t0 = time.monotonic()
    async with s.post(f"{pg.api}/api/v1/rollouts/{rid}/abort", json={"reason": "bench"},
                      headers={"Authorization": f"Bearer {pg.tokens['pipeline']}"}) as r:
        assert r.status == 200, await r.text()
    out.call.append(time.monotonic() - t0)
    await file_says(target, 0)
    out.file.append(time.monotonic() - t0)
    # requests stop reaching the canary: 20 in a row answered by stable
    while (await procs.split(pg.url, 20)).get(pg.canary.version, 0):
        pass
    out.traffic.append(time.monotonic() - t0)
    await asyncio.sleep(1.5)  # let the rollout finish its bookkeeping


async def run_hung(aborts: int, rollouts: int) -> dict[str, Any]:
    """Aborts on the real nginx target while `rollouts` others evaluate against a
    Prometheus that accepts connections and never answers."""
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        pg = Playground(Path(tmp))
        await pg.start()
        slow = fast_policy("slow", interval="1s", holds=("1h",) * 4, progress_deadline="2h")
        extra = {f"t{i}": {"router": "nginx", "file": f"{tmp}/t{i}.conf", "upstream": f"t{i}",
                           "stable": ["127.0.0.1:1"], "canary": ["127.0.0.1:2"],
                           "test": ["true"], "reload": ["true"], "policy": "slow",
                           "vars": {"service": f"t{i}", "window": pg.window}}
                 for i in range(rollouts)}
        path = pg.write_config([slow], extra_targets=extra)
        load = procs.Load(pg.url, rate=40, limit=40 * 3600)
        aborts_ms = Aborts()
        list_ms: list[float] = []
        hole = procs.Blackhole()
        try:
            async with hole as url:
                raw = yaml.safe_load(path.read_text())
                raw["prometheus"] = {"url": url, "timeout": "10s"}
                path.write_text(yaml.safe_dump(raw, sort_keys=False))
                async with serving(config_mod.load_file(path)):
                    load.start()
                    pipe = {"Authorization": f"Bearer {pg.tokens['pipeline']}"}
                    async with aiohttp.ClientSession() as s:
                        async def start(target: str, version: str) -> str:
                            async with s.post(f"{pg.api}/api/v1/rollouts", headers=pipe, json={
                                    "target": target, "canary_version": version,
                                    "policy": "slow", "stable_version": "v1"}) as r:
                                data = await r.json()
                            return str(data["id"])

                        for i in range(rollouts):
                            await start(f"t{i}", "v2")
                        await asyncio.sleep(5)  # every gate's queries now hang
                        for i in range(aborts):
                            async with asyncio.timeout(60):
                                rid = await start("web", f"h{i}")
                                await file_says(pg.target(), 5)
                                await measure_abort(s, pg, rid, aborts_ms)
                                t0 = time.monotonic()
                                async with s.get(f"{pg.api}/api/v1/rollouts", headers=pipe) as r:
                                    assert r.status == 200
                                list_ms.append(time.monotonic() - t0)
        finally:
            await load.stop()
            await pg.stop()
    return {
        **aborts_ms.rows(),
        "list_rollouts": spread(list_ms),
        "note": f"Prometheus accepts and never answers (timeout 10s); {rollouts} other "
                "rollouts evaluate against it every second",
        "prometheus_connections_accepted": hole.accepted,
    }


async def run(aborts: int, breaches: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        pg = Playground(Path(tmp))
        await pg.start()
        slow = fast_policy("slow", interval="1s", holds=("1h",) * 4, progress_deadline="2h")
        quick = fast_policy("fast", interval="1s", holds=("1h",) * 4, progress_deadline="2h",
                            max_error=0.05)
        cfg = config_mod.load_file(pg.write_config([slow, quick]))
        load = procs.Load(pg.url, rate=40, limit=40 * 3600)
        aborts_ms = Aborts()
        breach_ms: list[float] = []
        try:
            async with serving(cfg):
                load.start()
                target = pg.target()
                pipe = {"Authorization": f"Bearer {pg.tokens['pipeline']}"}
                async with aiohttp.ClientSession() as s:
                    async def start(policy: str, version: str) -> str:
                        async with s.post(f"{pg.api}/api/v1/rollouts", headers=pipe, json={
                                "target": "web", "canary_version": version, "policy": policy,
                                "stable_version": "v1"}) as r:
                            data = await r.json()
                        rid: str = data["id"]
                        await file_says(target, 5)
                        return rid

                    async def one_abort(i: int) -> None:
                        rid = await start("slow", f"a{i}")
                        await measure_abort(s, pg, rid, aborts_ms)

                    async def one_breach(i: int) -> None:
                        version = f"b{i}"
                        pg.canary.version = version
                        await start("fast", version)
                        await asyncio.sleep(8)  # a clean window first
                        pg.canary.error_rate = 0.5
                        query = render(ERROR_RATE, {"service": "web", "canary_version": version,
                                                    "window": pg.window})
                        while True:
                            async with s.get(f"{pg.prometheus.url}/api/v1/query",
                                              params={"query": query}) as r:
                                res = (await r.json())["data"]["result"]
                            if res and float(res[0]["value"][1]) > 0.05:
                                break
                            await asyncio.sleep(0.05)
                        t0 = time.monotonic()
                        await file_says(target, 0)
                        breach_ms.append(time.monotonic() - t0)
                        pg.canary.error_rate = 0.0
                        await asyncio.sleep(2)

                    for i in range(aborts):
                        async with asyncio.timeout(60):  # bounded: a stuck step ends the run
                            await one_abort(i)
                    for i in range(breaches):
                        async with asyncio.timeout(90):
                            await one_breach(i)
        finally:
            await load.stop()
            await pg.stop()
    return {
        **aborts_ms.rows(),
        "breach_visible_to_rollback_applied": spread(breach_ms),
        "note": "breach: policy interval 1s, failure_limit 2, threshold gate on a 5s rate",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aborts", type=int, default=20)
    ap.add_argument("--breaches", type=int, default=5)
    ap.add_argument("--hung-rollouts", type=int, default=24,
                    help="rollouts evaluating against a hung Prometheus during the hung-"
                         "Prometheus aborts (0 skips that case)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    out = {"normal": asyncio.run(run(args.aborts, args.breaches))}
    if args.hung_rollouts:
        out["prometheus_hung"] = asyncio.run(run_hung(args.aborts, args.hung_rollouts))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
