"""One bounded thread pool per blocking dependency.

The official clients block, so each adapter runs its calls on a pool of its own, named
for the dependency. A dependency that accepts connections and never answers can then
fill only its own pool: a hung Prometheus cannot delay a state-store write, a router
file write or a Lease renewal, and so cannot delay a rollback.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Pool:
    """A named, bounded executor; `await pool.run(fn, *args)` is `asyncio.to_thread`
    on this pool only."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        # never wait: a thread stuck on a dependency that never answers must not hold
        # up the process's exit
        self._executor.shutdown(wait=False, cancel_futures=True)
