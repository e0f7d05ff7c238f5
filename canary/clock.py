"""Time as a seam: the real clock, and a sleep that a command can cut short."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float, wakeup: asyncio.Event | None = None) -> None:
        """Sleep up to `seconds`; return early when `wakeup` is set (and clear it)."""
        ...


class RealClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float, wakeup: asyncio.Event | None = None) -> None:
        if wakeup is None:
            await asyncio.sleep(max(0.0, seconds))
            return
        if seconds > 0 and not wakeup.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), seconds)
        wakeup.clear()
