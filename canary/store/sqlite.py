"""The embedded store: one SQLite file, one row per rollout, WAL and full fsync.

A partial unique index allows one active rollout per target, so two racing starts
yield exactly one rollout.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from typing import Any

from canary.errors import Conflict, StoreConflict
from canary.model import Rollout
from canary.store import no_such_rollout

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    active INTEGER NOT NULL,
    started_at REAL NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_per_target ON rollouts(target) WHERE active = 1;
CREATE INDEX IF NOT EXISTS by_start ON rollouts(started_at);
"""


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._mutex = threading.Lock()

    def _run(self, fn: Any, *args: Any) -> Any:
        with self._mutex:
            return fn(*args)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._run, fn, *args)

    def _create(self, r: Rollout) -> Rollout:
        try:
            self._db.execute(
                "INSERT INTO rollouts (id, target, active, started_at, version, data) "
                "VALUES (?, ?, ?, ?, 1, ?)",
                (r.id, r.target, 0 if r.state.final else 1, r.started_at,
                 json.dumps(r.to_store())))
        except sqlite3.IntegrityError as e:
            row = self._db.execute("SELECT id FROM rollouts WHERE target = ? AND active = 1",
                                   (r.target,)).fetchone()
            other = row[0] if row else "?"
            raise Conflict(f"target {r.target} already has an active rollout ({other}); "
                           "abort it or wait for it to end") from e
        return Rollout.from_store(r.to_store(), version=1)

    async def create(self, *, rollout: Rollout) -> Rollout:
        result: Rollout = await self._call(self._create, rollout)
        return result

    def _load(self, rollout_id: str) -> Rollout:
        row = self._db.execute("SELECT data, version FROM rollouts WHERE id = ?",
                               (rollout_id,)).fetchone()
        if row is None:
            raise no_such_rollout(rollout_id)
        return Rollout.from_store(json.loads(row[0]), version=row[1])

    async def load(self, rollout_id: str) -> Rollout:
        result: Rollout = await self._call(self._load, rollout_id)
        return result

    def _save(self, r: Rollout, expected: int) -> Rollout:
        cur = self._db.execute(
            "UPDATE rollouts SET active = ?, version = version + 1, data = ? "
            "WHERE id = ? AND version = ?",
            (0 if r.state.final else 1, json.dumps(r.to_store()), r.id, expected))
        if cur.rowcount != 1:
            raise StoreConflict(f"rollout {r.id} changed since version {expected}")
        return Rollout.from_store(r.to_store(), version=expected + 1)

    async def save(self, *, rollout: Rollout, expected_version: int) -> Rollout:
        result: Rollout = await self._call(self._save, rollout, expected_version)
        return result

    def _list(self, active_only: bool) -> list[Rollout]:
        sql = "SELECT data, version FROM rollouts"
        if active_only:
            sql += " WHERE active = 1"
        rows = self._db.execute(sql + " ORDER BY started_at DESC, id DESC").fetchall()
        return [Rollout.from_store(json.loads(d), version=v) for d, v in rows]

    async def list(self, *, active_only: bool = False) -> list[Rollout]:
        result: list[Rollout] = await self._call(self._list, active_only)
        return result

    async def ping(self) -> None:
        await self._call(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._call(self._db.close)
