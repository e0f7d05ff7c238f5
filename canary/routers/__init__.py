"""Routers move traffic: a few async methods per backend, one file each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from canary.errors import InvalidInput, NotFound, RouterError, StoreConflict
from canary.shapes import Shape
from canary.targets import Target


class Router(Protocol):
    async def get_weight(self) -> int | None:
        """The canary's live share in percent; None when it cannot be read."""
        ...

    async def set_weight(self, weight: int, *, decision: str | None = None,
                         shape: str | None = None) -> None:
        """Put `weight` percent on the canary, idempotently; RouterError if it cannot.
        `decision` is kept in the router's own state beside the weight (a rollback made
        while the state store could not record it); any later write without one clears it.
        `shape` (a shapes.Shape key) is a match stage's rule or a mirror stage's mirror,
        written with the weight; without one, whatever canary added is removed, leaving
        the route exactly as the user wrote it."""
        ...

    async def get_shape(self) -> str | None:
        """The shape key canary's additions carry now (None: none); a key starting with
        shapes.EDITED when they were changed by someone else. RouterError when unreadable."""
        ...

    async def check_shapes(self, shapes: Sequence[Shape]) -> None:
        """Before a rollout with match or mirror stages starts: can this router apply them?
        InvalidInput says what to configure."""
        ...

    async def decision(self) -> str | None:
        """The decision the last write kept, if any (None when it cannot be read)."""
        ...

    async def check(self) -> None:
        """Before a rollout starts: is everything it needs there? NotFound / InvalidInput
        say what is missing; RouterError when the backend cannot be asked."""
        ...


async def write_route(what: str, write: Callable[[], Awaitable[None]],
                      read_back: Callable[[], Awaitable[int | None]], weight: int) -> None:
    """A Kubernetes router's write: read, change and write back the route conditionally on
    its resourceVersion, again while someone else's write moved it (409), then read the
    weight back. Every failure is a RouterError naming the object."""
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StoreConflict),
            stop=stop_after_attempt(6), wait=wait_exponential(multiplier=0.05, max=1),
            reraise=True,
        ):
            with attempt:
                await write()
    except StoreConflict as e:
        raise RouterError(f"{what} kept changing under us: {e}") from e
    except (NotFound, InvalidInput) as e:
        raise RouterError(str(e)) from e
    live = await read_back()
    if live != weight:
        raise RouterError(f"{what}: wrote canary weight {weight} but read back {live}")


def for_target(target: Target, *, kube_api: Any = None) -> Router:
    """Map the config's `router:` name to its class. `kube_api` is a kubernetes ApiClient
    (canary.kube.api_client), needed by the istio router."""
    from canary.targets import GatewayTarget, IstioTarget, NginxTarget

    if isinstance(target, NginxTarget):
        from canary.routers.nginx import NginxRouter

        return NginxRouter(target)
    if isinstance(target, IstioTarget):
        from canary.routers.istio import IstioRouter

        if kube_api is None:
            raise RouterError(f"target {target.name}: the istio router needs Kubernetes "
                              "credentials (in-cluster, KUBECONFIG or ~/.kube/config)")
        return IstioRouter(target, kube_api)
    if isinstance(target, GatewayTarget):
        from canary.routers.gateway import GatewayRouter

        if kube_api is None:
            raise RouterError(f"target {target.name}: the gateway router needs Kubernetes "
                              "credentials (in-cluster, KUBECONFIG or ~/.kube/config)")
        return GatewayRouter(target, kube_api)
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

    async def set_weight(self, weight: int, *, decision: str | None = None,
                         shape: str | None = None) -> None:
        if shape is not None:  # check_shapes refuses such a start; never route it reversed
            raise RouterError("match and mirror stages send their requests to the configured "
                              "canary side only")
        await self.inner.set_weight(100 - weight, decision=decision)

    async def get_shape(self) -> str | None:
        return await self.inner.get_shape()

    async def check_shapes(self, shapes: Sequence[Shape]) -> None:
        raise InvalidInput(
            "this policy has match or mirror stages, which send their requests to the "
            "configured canary side; after a swap the new version goes to the stable side "
            "(deploy_to: stable). Set promotion: return on this target (traffic returns to "
            "the stable side after each release, so the canary side is always the new one), "
            "or use a policy with weight stages only")

    async def decision(self) -> str | None:
        return await self.inner.decision()

    async def check(self) -> None:
        await self.inner.check()


def toward(router: Router, side: str) -> Router:
    """The router whose weight is the share of the configured side `side`."""
    return Flipped(router) if side == "stable" else router
