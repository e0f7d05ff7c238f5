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
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the event fires, and a rollout task that ignores
            # its cancellation keeps Controller.stop() waiting for ever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await wakeup.wait()
        wakeup.clear()
