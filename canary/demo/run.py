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
from canary.demo.service import VERSION_PATH


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


async def follow(s: aiohttp.ClientSession, pg: Playground, rollout_id: str,
                 until: tuple[str, ...] = ("succeeded", "rolled_back")) -> dict[str, Any]:
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
        if r["state"] in until:
            return r
        await asyncio.sleep(0.5)


async def where(s: aiohttp.ClientSession, pg: Playground) -> dict[str, Any]:
    """GET /api/v1/targets/web, as a pipeline asks before deploying: print where the
    traffic is and what each side runs."""
    headers = {"Authorization": f"Bearer {pg.tokens['viewer']}"}
    async with s.get(f"{pg.api}/api/v1/targets/web", headers=headers) as resp:
        t: dict[str, Any] = await resp.json()
    canary_share = t["live_weight"] if t["live_weight"] is not None else 0
    share = {"stable": 100 - canary_share, "canary": canary_share}
    sides = "; ".join(f"{side} side ({pg.side(side).port}) runs {t['runs'][side] or '?'}, "
                      f"carries {share[side]}%" for side in ("stable", "canary"))
    say(f"  target web: {sides}. Serving: {t['serving']} side; the next version goes to the "
        f"{t['deploy_to']} side")
    return t


async def post(s: aiohttp.ClientSession, pg: Playground, path: str,
               body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    auth = {"Authorization": f"Bearer {pg.tokens['pipeline']}"}
    async with s.post(f"{pg.api}{path}", headers=auth, json=body) as resp:
        data: dict[str, Any] = await resp.json()
        return resp.status, data


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
        # return: after 100% the stable side is brought to the new version, then serves
        # again; version_probe checks what each side runs before any traffic moves
        cfg = config_mod.load_file(pg.write_config([policy, compare], target_extra={
            "promotion": "return", "version_probe": {"path": VERSION_PATH, "timeout": "1s"}}))
        load = Load(pg.url, rate=40, limit=20_000)
        code = 0
        try:
            async with serving(cfg):
                say(f"controller on {pg.api}; sending 40 requests/s through nginx at {pg.url}")
                load.start()
                await asyncio.sleep(3)
                async with aiohttp.ClientSession() as s:
                    t = await where(s, pg)
                    say(f"rollout 1: web v2, a healthy release, deployed on the {t['deploy_to']} "
                        "side (policy: 10% -> 25% -> 50% -> 100%, then hand-over)")
                    _, r = await post(s, pg, "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v2"})
                    r = await follow(s, pg, r["id"], until=("promoting", "rolled_back"))
                    await where(s, pg)
                    if r["state"] == "promoting":
                        say("  pipeline: 100% on v2; redeploying v2 on the stable side, then "
                            "calling handover")
                        await pg.redeploy("stable", "v2")
                        status, answer = await post(
                            s, pg, f"/api/v1/rollouts/{r['id']}/handover",
                            {"reason": "v2 deployed on the stable side"})
                        if status != 200:
                            say(f"  handover refused: {answer.get('error')}")
                        r = await follow(s, pg, r["id"])
                    say(f"rollout 1 ended {r['state']}: traffic so far {dict(load.versions)}")
                    code |= int(r["state"] != "succeeded")
                    t = await where(s, pg)

                    say(f"rollout 2: web v3, with a bug that fails 1 request in 5; the pipeline "
                        f"deploys it where the controller says: the {t['deploy_to']} side")
                    new = await pg.redeploy(t["deploy_to"], "v3")
                    new.error_rate = 0.2
                    before = load.codes.copy()
                    _, r = await post(s, pg, "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v3"})
                    say(f"  started: stable version {r.get('stable_version')} inferred from the "
                        "serving side")
                    r = await follow(s, pg, r["id"])
                    say(f"rollout 2 ended {r['state']}: {r['reason']}")
                    failed = sum(n for (v, c), n in (load.codes - before).items()
                                 if v == "v3" and c >= 500)
                    say(f"requests failed by v3 before the rollback: {failed}")
                    code |= int(r["state"] != "rolled_back")
                    await asyncio.sleep(2)
                    split = await procs.split(pg.url, 20)
                    say(f"after the rollback, 20 requests went to: {dict(split)}")
                    t = await where(s, pg)

                    say("rollout 3: web v4, a subtle regression: it fails 6% of requests where v2 "
                        "fails 2%. A fixed 10% bound would promote it; this rollout's policy has "
                        f"an `errors` gate that compares the canary with stable. Deployed on the "
                        f"{t['deploy_to']} side")
                    new = await pg.redeploy(t["deploy_to"], "v4")
                    new.error_rate = 0.06
                    pg.side(t["serving"]).error_rate = 0.02
                    more = Load(pg.url, rate=160, limit=20_000)  # 200 requests/s in all
                    more.start()
                    try:
                        before = load.codes + more.codes
                        _, r = await post(s, pg, "/api/v1/rollouts",
                                          {"target": "web", "canary_version": "v4",
                                           "policy": "demo-compare"})
                        r = await follow(s, pg, r["id"])
                    finally:
                        await more.stop()
                    say(f"rollout 3 ended {r['state']}: {r['reason']}")
                    served = load.codes + more.codes - before
                    failed = sum(n for (v, c), n in served.items() if v == "v4" and c >= 500)
                    say(f"requests failed by v4 before the rollback: {failed} of "
                        f"{sum(n for (v, _), n in served.items() if v == 'v4')} it served")
                    code |= int(r["state"] != "rolled_back")
                    pg.side(t["serving"]).error_rate = 0.0
                    await where(s, pg)
                    if keep:
                        say(f"playground left running; API {pg.api}, tokens {pg.tokens}; Ctrl-C ends")
                        await asyncio.Event().wait()
        finally:
            await load.stop()
            await pg.stop()
        say("demo " + ("passed: the healthy release was promoted and handed over, the faulty "
                       "and the subtly worse ones rolled back"
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
