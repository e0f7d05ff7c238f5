"""Routers move traffic: a few async methods per backend, one file each."""

from __future__ import annotations

from typing import Any, Protocol

from canary.config import Target


class Router(Protocol):
    async def get_weight(self) -> int | None:
        """The canary's live share in percent; None when it cannot be read."""
        ...

    async def set_weight(self, weight: int, *, decision: str | None = None) -> None:
        """Put `weight` percent on the canary, idempotently; RouterError if it cannot.
        `decision` is kept in the router's own state beside the weight (a rollback made
        while the state store could not record it); any later write without one clears it."""
        ...

    async def decision(self) -> str | None:
        """The decision the last write kept, if any (None when it cannot be read)."""
        ...

    async def check(self) -> None:
        """Before a rollout starts: is everything it needs there? NotFound / InvalidInput
        say what is missing; RouterError when the backend cannot be asked."""
        ...


def for_target(target: Target, *, kube_api: Any = None) -> Router:
    """Map the config's `router:` name to its class. `kube_api` is a kubernetes ApiClient
    (canary.kube.api_client), needed by the istio router."""
    from canary.config import IstioTarget, NginxTarget
    from canary.errors import RouterError

    if isinstance(target, NginxTarget):
        from canary.routers.nginx import NginxRouter

        return NginxRouter(target)
    if isinstance(target, IstioTarget):
        from canary.routers.istio import IstioRouter

        if kube_api is None:
            raise RouterError(f"target {target.name}: the istio router needs Kubernetes "
                              "credentials (in-cluster, KUBECONFIG or ~/.kube/config)")
        return IstioRouter(target, kube_api)
    raise RouterError(f"unknown router for target {target!r}")


class Flipped:
    """A router seen from the other side: after a swap the configured `canary` side serves
    the stable version, and the next rollout's weight is the share of the `stable` side.
    Every read and write is turned around, so the rest of canary speaks of one weight."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner

    async def get_weight(self) -> int | None:
        w = await self.inner.get_weight()
        return None if w is None else 100 - w

    async def set_weight(self, weight: int, *, decision: str | None = None) -> None:
        await self.inner.set_weight(100 - weight, decision=decision)

    async def decision(self) -> str | None:
        return await self.inner.decision()

    async def check(self) -> None:
        await self.inner.check()


def toward(router: Router, side: str) -> Router:
    """The router whose weight is the share of the configured side `side`."""
    return Flipped(router) if side == "stable" else router
