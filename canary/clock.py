"""Time as a seam: the controller's clock, and a sleep that a command can cut short.

Holds, deadlines, evaluation times and backoff are measured on the monotonic clock, so
a wall clock stepped by NTP or a VM resume changes none of them. The times a rollout
stores and shows are wall-clock-like (seconds since the epoch): the wall time when the
process started, advanced by the monotonic clock since. Within one process they never
go back and never jump; across a restart they start again from the wall clock, but
never before the latest time already stored (`not_before`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def not_before(self, t: float) -> None:
        """From now on, never report a time before `t` (a time read back from the store)."""
        ...

    async def sleep(self, seconds: float, wakeup: asyncio.Event | None = None) -> None:
        """Sleep up to `seconds`; return early when `wakeup` is set (and clear it)."""
        ...


class RealClock:
    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)

    def not_before(self, t: float) -> None:
        lag = t - self.now()
        if lag > 0:
            self._wall0 += lag

    async def sleep(self, seconds: float, wakeup: asyncio.Event | None = None) -> None:
        # asyncio's own timers run on the monotonic clock
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
