"""State stores: one protocol, one file per backend."""

from __future__ import annotations

from typing import Any, Protocol

from canary.errors import NotFound
from canary.model import Rollout


def no_such_rollout(rollout_id: str) -> NotFound:
    """The one 404 for a rollout id: every store raises it, and the API raises the same for
    a rollout outside a token's scope, so the two cannot be told apart."""
    return NotFound(f"no rollout with id {rollout_id!r}")


class Store(Protocol):
    async def create(self, *, rollout: Rollout) -> Rollout:
        """Insert a new rollout; Conflict if its target already has an active one."""
        ...

    async def load(self, rollout_id: str) -> Rollout:
        """NotFound if there is no such rollout."""
        ...

    async def save(self, *, rollout: Rollout, expected_version: int) -> Rollout:
        """Write if the stored version is still `expected_version`, else StoreConflict."""
        ...

    async def list(self, *, active_only: bool = False) -> list[Rollout]:
        """Newest first."""
        ...

    async def ping(self) -> None:
        ...

    async def close(self) -> None:
        ...


def open_store(url: str, *, kube_api: Any = None) -> Store:
    from canary.errors import InvalidInput

    if url.startswith("sqlite:"):
        from canary.store.sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:"):])
    if url.startswith("kubernetes:"):
        from canary.store.kubernetes import KubernetesStore

        if kube_api is None:
            raise InvalidInput(f"state {url!r} needs Kubernetes credentials (in-cluster, "
                               "KUBECONFIG or ~/.kube/config)")
        return KubernetesStore(url[len("kubernetes:"):], kube_api)
    raise InvalidInput(f"state {url!r}: use sqlite:PATH or kubernetes:NAMESPACE")
