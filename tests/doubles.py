"""A Prometheus HTTP API double for fault tests and benchmarks: answers /api/v1/query with
a value the test sets, or no data, an error status, or slowly; stops to be "down"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from canary.demo.procs import free_port, serve_app


@dataclass
class PrometheusDouble:
    value: float | None = 0.0
    status: int = 200          # anything else answers an error body with this status
    delay: float = 0.0         # seconds before answering
    answer: Callable[[str], float | None] | None = None   # per-query value, when set
    port: int = field(default_factory=free_port)
    queries: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.queries += 1
        query = request.query.get("query") or (await request.post()).get("query", "")
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"status": "error", "errorType": "internal",
                                      "error": "injected failure"}, status=self.status)
        value = self.answer(str(query)) if self.answer else self.value
        result = [] if value is None else [{"metric": {}, "value": [time.time(), repr(value)]}]
        return web.json_response({"status": "success",
                                  "data": {"resultType": "vector", "result": result}})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/v1/query", self.handle)
        self._runner = await serve_app(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
