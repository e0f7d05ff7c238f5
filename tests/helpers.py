"""Shared test helpers: polling with a deadline, an API client, and a small controller
wired to a real nginx-format file with a metric source the test sets."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from canary.api.app import build_app, make_runner
from canary.api.auth import Role, Token
from canary.clock import RealClock
from canary.demo.procs import free_port
from canary.engine.controller import Controller
from canary.errors import MetricsError
from canary.gates.kinds import ThresholdGate
from canary.gates.prometheus import MetricSource
from canary.model import Rollout
from canary.policy import NoData, Policy
from canary.routers import Router
from canary.routers.nginx import NginxRouter
from canary.stages import Stage
from canary.store import Store
from canary.store.sqlite import SqliteStore
from canary.targets import NginxTarget, Target

T = TypeVar("T")
TOKENS = {"viewer": "tok-viewer", "pipeline": "tok-pipeline", "oncall": "tok-oncall"}


async def eventually(check: Callable[[], Awaitable[T]], *, deadline: float = 30.0,
                     what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {deadline}s; last: {last!r}")
        await asyncio.sleep(0.1)


class Api:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.s = session

    async def call(self, method: str, path: str, body: Any = None, *, role: str | None = "oncall",
                   token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {}
        tok = token or (TOKENS[role] if role else None)
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        kwargs: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self.s.request(method, self.base + path, **kwargs) as r:
            text = await r.text()
            try:
                data = await r.json(content_type=None) if text else None
            except ValueError:
                data = text
            return r.status, data

    async def rollout(self, rid: str) -> dict[str, Any]:
        status, data = await self.call("GET", f"/api/v1/rollouts/{rid}", role="viewer")
        assert status == 200, data
        return data  # type: ignore[no-any-return]

    async def start(self, **body: Any) -> dict[str, Any]:
        body.setdefault("target", "web")
        status, data = await self.call("POST", "/api/v1/rollouts", body, role="pipeline")
        assert status == 201, data
        return data  # type: ignore[no-any-return]

    async def until(self, rid: str, check: Callable[[dict[str, Any]], bool], *,
                    deadline: float = 30.0, what: str = "state") -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            r = await self.rollout(rid)
            return r if check(r) else None
        return await eventually(probe, deadline=deadline, what=what)


class SetSource:
    """A metric source whose answer the test sets: a number, None (no data) or an error."""

    def __init__(self, value: float | None = 0.0) -> None:
        self.value: float | Exception | None = value
        self.queries: list[str] = []

    async def query(self, promql: str) -> float | None:
        self.queries.append(promql)
        if isinstance(self.value, Exception):
            raise MetricsError(str(self.value))
        return self.value


def simple_policy(name: str = "p", *, hold: float = 1.0, interval: float = 0.2,
                  approval: bool = False, **kw: Any) -> Policy:
    return Policy(name=name, interval=interval, failure_limit=2, no_data=NoData.HOLD,
                  progress_deadline=kw.pop("progress_deadline", 60.0 + hold + interval),
                  stages=(Stage(10, hold), Stage(50, hold, approval=approval), Stage(100, hold)),
                  gates=(ThresholdGate("errors", 'errors{svc="{{ service }}"}', max=0.05),), **kw)


def tokens() -> tuple[Token, ...]:
    return tuple(Token(f"{role}-token", hashlib.sha256(tok.encode()).hexdigest(), Role[role.upper()])
                 for role, tok in TOKENS.items())


@asynccontextmanager
async def controller(tmp_path: Path, *, policies: list[Policy] | None = None,
                     source: MetricSource | None = None,
                     test_cmd: tuple[str, ...] = ("true",),
                     reload_cmd: tuple[str, ...] = ("true",),
                     file: Path | None = None,
                     body_timeout: float = 10.0, keepalive_timeout: float = 75.0,
                     target: Target | None = None, router: Router | None = None,
                     store: Store | None = None, heartbeat: float = 15.0,
                     ) -> AsyncIterator[tuple[Api, Controller, Any]]:
    """A controller on a free port whose nginx target runs `test_cmd` and `reload_cmd`."""
    pols = {p.name: p for p in (policies or [simple_policy()])}
    if target is None:
        target = NginxTarget(name="web", file=file or tmp_path / "upstream.conf", upstream="web",
                             stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                             test=test_cmd, reload=reload_cmd, policy=next(iter(pols)),
                             vars={"service": "web"}, stable_version="v1")
        router = NginxRouter(target)
    assert router is not None
    store = store or SqliteStore(str(tmp_path / "state.db"))
    ctl = Controller(store=store, policies=pols, targets={"web": target},
                     routers={"web": router}, source=source or SetSource(),
                     clock=RealClock(), retry_max=1.0)
    runner = make_runner(build_app(ctl, tokens(), body_timeout=body_timeout,
                                   heartbeat=heartbeat),
                         lingering_time=0.5, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            yield Api(f"http://127.0.0.1:{port}", s), ctl, target
    finally:
        await runner.cleanup()
        await store.close()


async def seed(store: Store, n: int, *, targets: tuple[str, ...] = ("web",), events: int = 3,
               start: float = 1_700_000_000.0, ties: bool = True) -> list[Rollout]:
    """`n` finished rollouts written straight to the store, oldest first, spread over
    `targets`, alternately succeeded and rolled back, each with `events` events; with
    `ties`, every third shares its start time with the one before (ids break the tie)."""
    from dataclasses import replace

    from canary.engine import decide
    from canary.model import Event, Phase

    out = []
    at = start
    for i in range(n):
        if not (ties and i % 3 == 2):
            at += 1
        r = decide.start(rollout_id=f"seed-{i:04d}", target=targets[i % len(targets)],
                         policy=simple_policy(), canary_version=f"v{i + 2}",
                         stable_version="v1", now=at, actor="seed")
        r = replace(r, state=Phase.SUCCEEDED if i % 2 else Phase.ROLLED_BACK,
                    weight=100 if i % 2 else 0,
                    events=tuple(Event(at + k / 1000, "note", f"event {k} " + "x" * 60, "seed")
                                 for k in range(events)))
        out.append(await store.create(rollout=r))
    return out
