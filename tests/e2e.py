"""Fixtures for end-to-end tests: a real playground (nginx, Prometheus, two service
versions) and the real controller serving its HTTP API, all on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from canary import config as config_mod
from canary.cli import serving
from canary.demo import procs
from canary.demo.playground import Playground
from canary.demo.procs import Load
from canary.routers.nginx import parse_weight
from tests.helpers import Api, eventually


@asynccontextmanager
async def playground(tmp_path: Path) -> AsyncIterator[Playground]:
    pg = Playground(tmp_path / "pg")
    pg.tokens.update({"viewer": "tok-viewer", "pipeline": "tok-pipeline", "oncall": "tok-oncall"})
    try:
        await pg.start()
        yield pg
    finally:
        await pg.stop()


@asynccontextmanager
async def running(pg: Playground, policies: list[dict[str, Any]], *,
                  rate: float = 30.0, target_extra: dict[str, Any] | None = None,
                  ) -> AsyncIterator[tuple[Api, Load]]:
    """The controller in this process, and steady load through nginx."""
    cfg = config_mod.load_file(pg.write_config(policies, target_extra=target_extra))
    load = Load(pg.url, rate=rate, limit=int(rate * 600))
    async with serving(cfg):
        try:
            load.start()
            async with aiohttp.ClientSession() as s:
                yield Api(pg.api, s), load
        finally:
            await load.stop()


def file_weight(pg: Playground) -> int | None:
    return parse_weight(pg.target(), pg.nginx.upstream_file.read_text())


async def canary_share(pg: Playground, n: int = 40) -> float:
    """Send n requests through nginx; the share the canary answered."""
    got = await procs.split(pg.url, n)
    return got.get(pg.canary.version, 0) / n


async def traffic_settles_at(pg: Playground, weight: int, *, tolerance: float = 0.1) -> float:
    """nginx reloads asynchronously: poll until the split of real requests matches."""
    async def check() -> list[float] | None:
        share = await canary_share(pg)
        return [share] if abs(share - weight / 100) <= tolerance + 1e-9 else None
    return (await eventually(check, deadline=20, what=f"traffic split at {weight}%"))[0]


async def gate_verdicts(api: Api, gate: str, verdict: str) -> float:
    _, text = await api.call("GET", "/metrics", role=None)
    for line in text.splitlines():
        if line.startswith("canary_gate_verdicts_total{") and f'gate="{gate}"' in line \
                and f'verdict="{verdict}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
