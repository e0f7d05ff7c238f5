"""Assemble the playground: stable and canary services, nginx in front, Prometheus
scraping both, and a controller config + policy that point at them."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from canary.demo.procs import Nginx, Prometheus, free_port
from canary.demo.service import Service
from canary.routers.nginx import render
from canary.targets import NginxTarget

ERROR_RATE = (
    '(sum(rate(http_requests_total{service="{{ service }}",version="{{ canary_version }}",'
    'code=~"5.."}[{{ window }}])) or vector(0))\n/\n'
    'sum(rate(http_requests_total{service="{{ service }}",version="{{ canary_version }}"}'
    "[{{ window }}]))"
)
P99_LATENCY = (
    "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket"
    '{service="{{ service }}",version="{{ canary_version }}"}[{{ window }}])))'
)


def fast_policy(name: str = "fast", *, interval: str = "1s", holds: tuple[str, ...] = ("3s",) * 4,
                weights: tuple[int, ...] = (5, 25, 50, 100), failure_limit: int = 2,
                no_data: str = "hold", progress_deadline: str = "2m",
                approval_at: int | None = None, max_error: float = 0.05,
                max_latency: float = 0.25) -> dict[str, Any]:
    stages: list[dict[str, Any]] = [{"weight": w, "hold": h} for w, h in zip(weights, holds, strict=True)]
    if approval_at is not None:
        stages[approval_at]["approval"] = True
    return {
        "name": name, "interval": interval, "failure_limit": failure_limit, "no_data": no_data,
        "progress_deadline": progress_deadline, "stages": stages,
        "gates": [{"name": "error-rate", "query": ERROR_RATE, "max": max_error},
                  {"name": "p99-latency", "query": P99_LATENCY, "max": max_latency}],
    }


def sequential_policy(name: str = "seq", *, interval: str = "1s",
                      holds: tuple[str, ...] = ("3s", "3s", "2s"),
                      weights: tuple[int, ...] = (20, 50, 100), progress_deadline: str = "2m",
                      **gate: Any) -> dict[str, Any]:
    """A policy judged by one `errors` gate on the services' raw request counters."""
    counter = 'sum(http_requests_total{service="{{ service }}",version="{{ version }}"%s})'
    return {
        "name": name, "interval": interval, "failure_limit": 2,
        "progress_deadline": progress_deadline,
        "stages": [{"weight": w, "hold": h} for w, h in zip(weights, holds, strict=True)],
        "gates": [{"name": "errors", "kind": "errors", "requests": counter % "",
                   "errors": counter % ',code=~"5.."' + " or vector(0)", **gate}],
    }


@dataclass
class Playground:
    dir: Path
    service: str = "web"
    stable_version: str = "v1"
    canary_version: str = "v2"
    window: str = "5s"
    tokens: dict[str, str] = field(default_factory=dict)  # role -> plain token

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stable = Service(self.service, self.stable_version, free_port())
        self.canary = Service(self.service, self.canary_version, free_port())
        self.nginx = Nginx(self.dir / "nginx", free_port())
        self.prometheus = Prometheus(self.dir / "prometheus", free_port(),
                                     [self.stable.port, self.canary.port])
        self.api_port = free_port()
        for role in ("viewer", "pipeline", "oncall"):
            self.tokens.setdefault(role, f"{role}-{secrets.token_urlsafe(16)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.port}/"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def target(self) -> NginxTarget:
        return NginxTarget(name=self.service, file=self.nginx.upstream_file, upstream="web",
                           stable=(f"127.0.0.1:{self.stable.port}",),
                           canary=(f"127.0.0.1:{self.canary.port}",),
                           test=tuple(self.nginx.test_cmd), reload=tuple(self.nginx.reload_cmd),
                           policy="fast", vars={"service": self.service, "window": self.window})

    async def start(self) -> None:
        await self.stable.start()
        await self.canary.start()
        self.nginx.write_conf()
        # before any rollout all traffic is on stable, as it would be in production
        self.nginx.upstream_file.write_text(render(self.target(), 0))
        self.nginx.start()
        self.prometheus.start()
        await self.prometheus.ready()

    def side(self, name: str) -> Service:
        """The service running on a configured side ("stable" or "canary")."""
        return self.stable if name == "stable" else self.canary

    async def redeploy(self, side: str, version: str) -> Service:
        """What a pipeline does: stop the side's service and start `version` in its place
        (same address), a new process state with fresh counters, not a change in place."""
        old = self.side(side)
        await old.stop()
        new = Service(self.service, version, old.port)
        await new.start()
        if side == "stable":
            self.stable = new
        else:
            self.canary = new
        return new

    async def stop(self) -> None:
        self.prometheus.stop()
        self.nginx.stop()
        await self.canary.stop()
        await self.stable.stop()

    def write_config(self, policies: list[dict[str, Any]], *, state: str | None = None,
                     extra_targets: dict[str, Any] | None = None,
                     target_extra: dict[str, Any] | None = None) -> Path:
        pdir = self.dir / "policies"
        pdir.mkdir(exist_ok=True)
        for old in pdir.glob("*.yaml"):
            old.unlink()
        for p in policies:
            (pdir / f"{p['name']}.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        t = self.target()
        cfg = {
            "listen": f"127.0.0.1:{self.api_port}",
            "state": state or f"sqlite:{self.dir / 'state.db'}",
            "prometheus": {"url": self.prometheus.url, "timeout": "2s"},
            "policies": str(pdir),
            "auth": {"tokens": [
                {"name": f"{role}-token", "sha256": hashlib.sha256(tok.encode()).hexdigest(),
                 "role": role} for role, tok in self.tokens.items()]},
            "targets": {t.name: {
                "router": "nginx", "file": str(t.file), "upstream": t.upstream,
                "stable": list(t.stable), "canary": list(t.canary), "test": list(t.test),
                "reload": list(t.reload), "policy": policies[0]["name"], "vars": dict(t.vars),
                "stable_version": self.stable_version, **(target_extra or {}),
            }, **(extra_targets or {})},
        }
        path = self.dir / "canary.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
