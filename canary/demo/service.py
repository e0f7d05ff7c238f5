"""A small HTTP service standing in for one version of an application. It counts its
requests in Prometheus form, and can be told to fail a share of requests or be slow."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from canary.demo.procs import serve_app

VERSION_PATH = "/version"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Service:
    """One version of the service on 127.0.0.1:port. Change `version`, `error_rate` and
    `latency` at any time; errors are spread evenly (every 1/error_rate-th request)."""

    service: str
    version: str
    port: int
    error_rate: float = 0.0
    latency: float = 0.0
    served: dict[str, int] = field(default_factory=dict)
    _n: int = 0
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "Requests served", ["service", "version", "code"],
                                registry=self.registry)
        self.duration = Histogram("http_request_duration_seconds", "Time to serve a request",
                                  ["service", "version"], buckets=BUCKETS, registry=self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        version = self.version
        if self.latency:
            await asyncio.sleep(self.latency)
        n, self._n = self._n, self._n + 1
        fail = int((n + 1) * self.error_rate) > int(n * self.error_rate)
        code = 500 if fail else 200
        self.served[version] = self.served.get(version, 0) + 1
        self.requests.labels(self.service, version, str(code)).inc()
        self.duration.labels(self.service, version).observe(loop.time() - t0)
        return web.Response(status=code, text=f"{self.service} {version}\n",
                            headers={"X-Version": version})

    async def version_probe(self, request: web.Request) -> web.Response:
        """What this service runs, for canary's version_probe (not counted as traffic)."""
        return web.json_response({"service": self.service, "version": self.version})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get(VERSION_PATH, self.version_probe)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = await serve_app(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
