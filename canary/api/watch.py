"""Watchers of one rollout (GET /api/v1/rollouts/{id}/watch): Server-Sent Events.

The control loop pays one dictionary lookup per save for them (`notify`): a rollout
nobody watches costs nothing more, and a watched one costs one `call_soon_threadsafe`
however many watch it. The rollout's JSON is made once per change, on the API's loop,
and every watcher of it sends that same text.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from canary import jsonsafe
from canary.model import Rollout

HEARTBEAT = 15.0      # seconds between heartbeats (an SSE comment) on a quiet stream
FOLLOWER_POLL = 2.0   # a replica that does not run rollouts reads the store this often
MAX_WATCHERS = 2000   # open streams at once; more are answered 503
MAX_PER_TOKEN = MAX_WATCHERS // 2  # streams one token may hold: more are answered 429, so a
# runaway dashboard or a leaked viewer token cannot take every place from the on-call
WRITE_TIMEOUT = 30.0  # a write to a watcher that does not go out in this long ends its stream


@dataclass
class Latest:
    version: int
    final: bool
    data: str


@dataclass
class Hub:
    _loop: asyncio.AbstractEventLoop | None = None
    _watchers: dict[str, set[asyncio.Event]] = field(default_factory=dict)
    _latest: dict[str, Latest] = field(default_factory=dict)
    _held: Counter[str] = field(default_factory=Counter)
    closing: bool = False

    def held(self, token: str) -> int:
        """Streams `token` holds open now."""
        return self._held[token]

    def hold(self, token: str, change: int) -> None:
        self._held[token] += change
        if self._held[token] <= 0:
            del self._held[token]

    def count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def notify(self, r: Rollout) -> None:
        """Called by the controller after every save, on the control loop: never waits."""
        loop = self._loop
        if loop is not None and r.id in self._watchers:
            try:
                loop.call_soon_threadsafe(self._publish, r)
            except RuntimeError:  # the API's loop has closed: nobody is watching
                pass

    def _publish(self, r: Rollout) -> None:
        watchers = self._watchers.get(r.id)
        if not watchers:
            return
        have = self._latest.get(r.id)
        if have is not None and have.version >= r.version:
            return
        self._latest[r.id] = Latest(r.version, r.state.final, jsonsafe.dumps(r.to_api()))
        for ev in watchers:
            ev.set()

    def offer(self, r: Rollout) -> Latest:
        """A rollout read from the store by a watcher: kept if newer than what is known."""
        self._publish(r)
        have = self._latest.get(r.id)
        if have is None or have.version < r.version:
            have = Latest(r.version, r.state.final, jsonsafe.dumps(r.to_api()))
        return have

    def latest(self, rollout_id: str) -> Latest | None:
        return self._latest.get(rollout_id)

    def join(self, rollout_id: str) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        self._watchers.setdefault(rollout_id, set()).add(ev)
        return ev

    def leave(self, rollout_id: str, ev: asyncio.Event) -> None:
        watchers = self._watchers.get(rollout_id)
        if watchers is None:
            return
        watchers.discard(ev)
        if not watchers:
            del self._watchers[rollout_id]
            self._latest.pop(rollout_id, None)

    def close(self) -> None:
        """At shutdown: every stream ends now rather than holding the server open."""
        self.closing = True
        for watchers in self._watchers.values():
            for ev in watchers:
                ev.set()
