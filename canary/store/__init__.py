"""State stores: one protocol, one file per backend."""

from __future__ import annotations

from typing import Protocol

from canary.model import Rollout


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


def open_store(url: str) -> Store:
    from canary.errors import InvalidInput

    if url.startswith("sqlite:"):
        from canary.store.sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:"):])
    raise InvalidInput(f"state {url!r}: only sqlite:PATH is available in this version "
                       "(kubernetes: is planned; see README, 'Status')")
