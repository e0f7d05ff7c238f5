"""`canary demo`: a healthy, a faulty and a subtly worse rollout on a real local
playground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from canary import config as config_mod
from canary.cli import gate_line, serving
from canary.demo import procs
from canary.demo.playground import Playground, fast_policy, sequential_policy
from canary.demo.procs import Load


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


async def follow(s: aiohttp.ClientSession, pg: Playground, rollout_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {pg.tokens['viewer']}"}
    last = ""
    while True:
        async with s.get(f"{pg.api}/api/v1/rollouts/{rollout_id}", headers=headers) as resp:
            r: dict[str, Any] = await resp.json()
        gates = ", ".join(gate_line(g) for g in r["gates"])
        line = f"  {r['state']:<12} stage {r['stage']} weight {r['weight']:>3}%  {gates}"
        if line != last:
            say(line)
            last = line
        if r["state"] in ("succeeded", "rolled_back"):
            return r
        await asyncio.sleep(0.5)


async def demo(keep: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="canary-demo-") as tmp:
        pg = Playground(Path(tmp))
        say(f"starting the playground in {tmp}: nginx, Prometheus, web v1 (stable) and v2 (canary)")
        await pg.start()
        policy = fast_policy("demo", interval="2s", holds=("6s", "6s", "6s", "4s"),
                             weights=(10, 25, 50, 100), max_error=0.02, progress_deadline="1m")
        # the third rollout compares the canary with stable, sequentially (docs/verdicts.md)
        compare = sequential_policy("demo-compare", interval="1s", holds=("6s",) * 4,
                                    weights=(10, 25, 50, 100), progress_deadline="1m")
        cfg = config_mod.load_file(pg.write_config([policy, compare]))
        load = Load(pg.url, rate=40, limit=20_000)
        code = 0
        try:
            async with serving(cfg):
                say(f"controller on {pg.api}; sending 40 requests/s through nginx at {pg.url}")
                load.start()
                await asyncio.sleep(3)
                auth = {"Authorization": f"Bearer {pg.tokens['pipeline']}"}
                async with aiohttp.ClientSession() as s:
                    say("rollout 1: web v2, a healthy release (policy: 10% -> 25% -> 50% -> 100%)")
                    async with s.post(f"{pg.api}/api/v1/rollouts", headers=auth,
                                      json={"target": "web", "canary_version": "v2",
                                            "stable_version": "v1"}) as resp:
                        r = await resp.json()
                    r = await follow(s, pg, r["id"])
                    say(f"rollout 1 ended {r['state']}: traffic so far {dict(load.versions)}")
                    code |= int(r["state"] != "succeeded")

                    say("v2 is now stable everywhere; deploying v3 to the canary server, with a bug "
                        "that fails 1 request in 5")
                    pg.stable.version, pg.canary.version, pg.canary.error_rate = "v2", "v3", 0.2
                    before = load.codes.copy()
                    async with s.post(f"{pg.api}/api/v1/rollouts", headers=auth,
                                      json={"target": "web", "canary_version": "v3",
                                            "stable_version": "v2"}) as resp:
                        r = await resp.json()
                    say("rollout 2: web v3")
                    r = await follow(s, pg, r["id"])
                    say(f"rollout 2 ended {r['state']}: {r['reason']}")
                    failed = sum(n for (v, c), n in (load.codes - before).items()
                                 if v == "v3" and c >= 500)
                    say(f"requests failed by v3 before the rollback: {failed}")
                    code |= int(r["state"] != "rolled_back")
                    await asyncio.sleep(2)
                    split = await procs.split(pg.url, 20)
                    say(f"after the rollback, 20 requests went to: {dict(split)}")

                    say("rollout 3: web v4, a subtle regression: it fails 6% of requests where v2 "
                        "fails 2%. A fixed 10% bound would promote it; this rollout's policy has "
                        "an `errors` gate that compares the canary with stable")
                    pg.stable.error_rate, pg.canary.version, pg.canary.error_rate = 0.02, "v4", 0.06
                    more = Load(pg.url, rate=160, limit=20_000)  # 200 requests/s in all
                    more.start()
                    try:
                        before = load.codes + more.codes
                        async with s.post(f"{pg.api}/api/v1/rollouts", headers=auth,
                                          json={"target": "web", "canary_version": "v4",
                                                "stable_version": "v2",
                                                "policy": "demo-compare"}) as resp:
                            r = await resp.json()
                        r = await follow(s, pg, r["id"])
                    finally:
                        await more.stop()
                    say(f"rollout 3 ended {r['state']}: {r['reason']}")
                    served = load.codes + more.codes - before
                    failed = sum(n for (v, c), n in served.items() if v == "v4" and c >= 500)
                    say(f"requests failed by v4 before the rollback: {failed} of "
                        f"{sum(n for (v, _), n in served.items() if v == 'v4')} it served")
                    code |= int(r["state"] != "rolled_back")
                    pg.stable.error_rate = 0.0
                    if keep:
                        say(f"playground left running; API {pg.api}, tokens {pg.tokens}; Ctrl-C ends")
                        await asyncio.Event().wait()
        finally:
            await load.stop()
            await pg.stop()
        say("demo " + ("passed: the healthy release was promoted, the faulty and the subtly "
                       "worse ones rolled back"
                       if code == 0 else "FAILED: see above"))
        return code


def main(args: argparse.Namespace) -> int:
    # the demo prints its own story; the controller's log lines would repeat it
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    try:
        code: int = asyncio.run(demo(args.keep))
        return code
    except RuntimeError as e:
        print(f"canary demo: {e}", file=sys.stderr)
        return 2
