"""A clock the test drives, for a whole controller: time moves only when the test says."""

from __future__ import annotations

import asyncio
import contextlib


class DrivenClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t
        self._moved = asyncio.Event()

    def now(self) -> float:
        return self.t

    def not_before(self, t: float) -> None:
        self.t = max(self.t, t)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self._moved.set()

    async def sleep(self, seconds: float, wakeup: asyncio.Event | None = None) -> None:
        end = self.t + seconds
        while self.t < end and not (wakeup is not None and wakeup.is_set()):
            self._moved.clear()
            waits = [asyncio.ensure_future(self._moved.wait())]
            if wakeup is not None:
                waits.append(asyncio.ensure_future(wakeup.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await w
        if wakeup is not None:
            wakeup.clear()
