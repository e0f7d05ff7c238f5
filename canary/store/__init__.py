"""State stores: one protocol, one file per backend."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from canary.errors import NotFound
from canary.history import Point
from canary.model import Phase, Rollout, Sides


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

    async def save(self, *, rollout: Rollout, expected_version: int,
                   readings: Sequence[Point] = ()) -> Rollout:
        """Write if the stored version is still `expected_version`, else StoreConflict.
        `readings`: points the change adds to the rollout's history (canary/history.py),
        kept apart from the rollout itself (so saves stay small) and thinned by its rule."""
        ...

    async def readings(self, rollout_id: str) -> list[Point]:
        """The rollout's history points, oldest first; NotFound if there is no such
        rollout."""
        ...

    async def list(self, *, active_only: bool = False, target: str | None = None,
                   state: Phase | Iterable[Phase] | None = None, limit: int | None = None,
                   before: str | None = None, events: bool = True) -> list[Rollout]:
        """Newest first (by start time, then id). `target`, `state` (one phase or any of
        several) and `active_only` filter; `before` (a rollout id; NotFound if there is no
        such rollout) starts after that rollout, and `limit` caps the count, so pages never
        skip or repeat a rollout while new ones are started. `events=False` leaves every
        rollout's events out (`events == ()`), for listings."""
        ...

    async def ping(self) -> None:
        ...

    async def sides(self, target: str) -> Sides | None:
        """Which side of the target serves and what each runs, as last stored; None when
        nothing was stored for it yet."""
        ...

    async def save_sides(self, target: str, sides: Sides) -> None:
        """Store the target's sides (written when a rollout ends)."""
        ...

    async def close(self) -> None:
        ...


def phases(state: Phase | Iterable[Phase] | None) -> tuple[str, ...] | None:
    """The phase values a `list(state=...)` asks for; None for any."""
    if state is None:
        return None
    if isinstance(state, Phase):
        return (state.value,)
    return tuple(sorted({p.value for p in state}))


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
