"""Routers move traffic: a few async methods per backend, one file each."""

from __future__ import annotations

from typing import Protocol

from canary.config import Target


class Router(Protocol):
    async def get_weight(self) -> int | None:
        """The canary's live share in percent; None when it cannot be read."""
        ...

    async def set_weight(self, weight: int) -> None:
        """Put `weight` percent on the canary, idempotently; RouterError if it cannot."""
        ...


def for_target(target: Target) -> Router:
    """Map the config's `router:` name to its class."""
    from canary.config import IstioTarget, NginxTarget
    from canary.errors import RouterError

    if isinstance(target, NginxTarget):
        from canary.routers.nginx import NginxRouter

        return NginxRouter(target)
    if isinstance(target, IstioTarget):
        raise RouterError(f"target {target.name}: the istio router is not available in this "
                          "version yet (see README, 'Status')")
    raise RouterError(f"unknown router for target {target!r}")
