"""Abort request -> VirtualService written, through the real `kubernetes` client.

Kubernetes cannot run here, so the API server is the wire-level double from the tests
(tests/kubeapi.py: real HTTP, resourceVersion conflicts, Istio's CRD schema checks); the
controller, the Istio router and the client are the real ones. Each round starts a
rollout at 10%, aborts it over the HTTP API, and times until the VirtualService the
double stores carries canary weight 0 (the moment Istio would start pushing the
change to the proxies; their propagation, typically sub-second, is not measured here).

    .venv/bin/python -m bench.istio --aborts 50
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.controller import spread
from canary.routers.istio import IstioRouter
from tests.helpers import controller, simple_policy
from tests.test_istio import cluster, target, weights


async def vs_says(kube: Any, weight: int) -> None:
    """Poll the stored VirtualService every 1 ms until the canary route carries `weight`."""
    for _ in itertools.count():
        if weights(kube)[1] == weight:
            return
        await asyncio.sleep(0.001)


async def run(aborts: int) -> dict[str, Any]:
    call_s: list[float] = []
    written_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="canary-bench-istio-") as tmp:
        async with cluster(Path(tmp)) as (kube, api):
            t = target()
            async with controller(Path(tmp), policies=[simple_policy(hold=3600)], target=t,
                                  router=IstioRouter(t, api)) as (http, _c, _t):
                for i in range(aborts):
                    async with asyncio.timeout(30):  # bounded: a stuck round ends the run
                        rid = (await http.start(canary_version=f"v{i + 2}"))["id"]
                        await http.until(rid, lambda r: r["applied_weight"] == 10)
                        t0 = time.monotonic()
                        status, _ = await http.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                                    {"reason": "bench"})
                        assert status == 200, status
                        call_s.append(time.monotonic() - t0)
                        await vs_says(kube, 0)
                        written_s.append(time.monotonic() - t0)
                        await http.until(rid, lambda r: r["state"] == "rolled_back")
    return {"abort_http_call": spread(call_s),
            "abort_to_virtualservice_written": spread(written_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aborts", type=int, default=50)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    print(json.dumps(asyncio.run(run(args.aborts)), indent=2))


if __name__ == "__main__":
    main()
