"""The embedded store: one SQLite file, one row per rollout, WAL and full fsync.

A partial unique index allows one active rollout per target, so two racing starts
yield exactly one rollout. Listing is paged and filtered in SQL, newest first, and a
summary listing leaves each rollout's events inside SQLite (`json_remove`), so a read
flood costs neither Python time nor the GIL for events nobody shows.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any

from canary.errors import Conflict, NotFound, StoreConflict
from canary.model import Phase, Rollout
from canary.store import phases

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
_PAGING = """
CREATE INDEX IF NOT EXISTS by_start_id ON rollouts(started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS by_target_start ON rollouts(target, started_at DESC, id DESC);
"""


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(rollouts)")}
        if "state" not in columns:  # a file written before `state` was a column
            self._db.executescript("BEGIN; ALTER TABLE rollouts ADD COLUMN state TEXT; "
                                   "UPDATE rollouts SET state = json_extract(data, '$.state'); "
                                   "COMMIT;")
        self._db.executescript(_PAGING)
        self._mutex = threading.Lock()

    def _run(self, fn: Any, *args: Any) -> Any:
        with self._mutex:
            return fn(*args)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._run, fn, *args)

    def _create(self, r: Rollout) -> Rollout:
        try:
            self._db.execute(
                "INSERT INTO rollouts (id, target, active, started_at, version, data, state) "
                "VALUES (?, ?, ?, ?, 1, ?, ?)",
                (r.id, r.target, 0 if r.state.final else 1, r.started_at,
                 json.dumps(r.to_store()), r.state.value))
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
            raise NotFound(f"no rollout with id {rollout_id!r}")
        return Rollout.from_store(json.loads(row[0]), version=row[1])

    async def load(self, rollout_id: str) -> Rollout:
        result: Rollout = await self._call(self._load, rollout_id)
        return result

    def _save(self, r: Rollout, expected: int) -> Rollout:
        cur = self._db.execute(
            "UPDATE rollouts SET active = ?, version = version + 1, data = ?, state = ? "
            "WHERE id = ? AND version = ?",
            (0 if r.state.final else 1, json.dumps(r.to_store()), r.state.value, r.id,
             expected))
        if cur.rowcount != 1:
            raise StoreConflict(f"rollout {r.id} changed since version {expected}")
        return Rollout.from_store(r.to_store(), version=expected + 1)

    async def save(self, *, rollout: Rollout, expected_version: int) -> Rollout:
        result: Rollout = await self._call(self._save, rollout, expected_version)
        return result

    def _list(self, active_only: bool, target: str | None, states: tuple[str, ...] | None,
              limit: int | None, before: str | None, events: bool) -> list[Rollout]:
        where: list[str] = []
        args: list[Any] = []
        if active_only:
            where.append("active = 1")
        if target is not None:
            where.append("target = ?")
            args.append(target)
        if states is not None:
            where.append(f"state IN ({', '.join('?' * len(states))})" if states else "0")
            args.extend(states)
        if before is not None:
            row = self._db.execute("SELECT started_at FROM rollouts WHERE id = ?",
                                   (before,)).fetchone()
            if row is None:
                raise NotFound(f"no rollout with id {before!r}")
            where.append("(started_at, id) < (?, ?)")
            args.extend((row[0], before))
        data = "data" if events else "json_set(data, '$.events', json('[]'))"
        sql = f"SELECT {data}, version FROM rollouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._db.execute(sql, args).fetchall()
        return [Rollout.from_store(json.loads(d), version=v) for d, v in rows]

    async def list(self, *, active_only: bool = False, target: str | None = None,
                   state: Phase | Iterable[Phase] | None = None, limit: int | None = None,
                   before: str | None = None, events: bool = True) -> list[Rollout]:
        result: list[Rollout] = await self._call(self._list, active_only, target,
                                                 phases(state), limit, before, events)
        return result

    async def ping(self) -> None:
        await self._call(lambda: self._db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._call(self._db.close)
