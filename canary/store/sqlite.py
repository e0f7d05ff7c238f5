"""The embedded store: one SQLite file, one row per rollout, WAL and full fsync.

A partial unique index allows one active rollout per target, so two racing starts
yield exactly one rollout. Only one controller may act on a file: `lock()` takes an
exclusive lock on it for the life of the process. A file that cannot be written (disk
full, read-only, corrupt, deleted while running) raises StoreUnavailable, never a bare
sqlite3 error, so callers can tell "try again" from "bug". Listing is paged and filtered
in SQL, newest first, and a summary listing leaves each rollout's events inside SQLite
(`json_remove`), so a read flood costs neither Python time nor the GIL for events nobody
shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from canary import history, jsonsafe
from canary.errors import Conflict, NotFound, StoreConflict, StoreUnavailable, UserError
from canary.executors import Pool
from canary.model import Phase, Rollout, Sides
from canary.store import no_such_rollout, phases

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
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout TEXT NOT NULL,
    series TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_by_series ON readings(rollout, series, n);
CREATE TABLE IF NOT EXISTS targets (name TEXT PRIMARY KEY, sides TEXT NOT NULL);
"""
_PAGING = """
CREATE INDEX IF NOT EXISTS by_start_id ON rollouts(started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS by_target_start ON rollouts(target, started_at DESC, id DESC);
"""


class StoreLocked(UserError):
    """Another process holds the state file: this one must not act on it."""


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unavailable(path: str, e: BaseException) -> StoreUnavailable:
    text = str(e)
    hint = ""
    low = text.lower()
    if "full" in low:
        hint = "; free space on its filesystem"
    elif "readonly" in low or "read-only" in low:
        hint = "; make its filesystem and file writable"
    elif "malformed" in low or "not a database" in low:
        hint = "; the file is damaged: restore it from a backup"
    return StoreUnavailable(f"state store {path} cannot be used: {text}{hint}")


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.existed = os.path.exists(path)  # False: a fresh store, with no memory of the past
        self._pool = Pool("sqlite", 1)
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(rollouts)")}
            if "state" not in columns:  # a file written before `state` was a column
                self._db.executescript(
                    "BEGIN; ALTER TABLE rollouts ADD COLUMN state TEXT; "
                    "UPDATE rollouts SET state = json_extract(data, '$.state'); COMMIT;")
            self._db.executescript(_PAGING)
        except sqlite3.Error as e:
            raise _unavailable(path, e) from e
        self._identity = _identity(path)

    # ---- one controller per file ------------------------------------------------------

    def lock(self) -> None:
        """Take the file for this process, or raise StoreLocked naming who has it. The
        lock is flock(2) on the database file itself (SQLite's own locks are fcntl(2)
        byte ranges, which flock does not touch), held until close()."""
        pid_file = self.path + ".pid"
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = ""
            with contextlib.suppress(OSError, ValueError):
                with open(pid_file) as f:
                    who = f" (pid {int(f.read().split()[0])}, per {pid_file})"
            raise StoreLocked(f"state file {self.path} is in use by another canary "
                              f"controller{who}: only one may act on a state file; stop the "
                              "other one, or give this one its own `state:`") from None
        self._lock_fd = fd
        with contextlib.suppress(OSError):
            with open(pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")

    # ---- plumbing ---------------------------------------------------------------------

    def _check_identity(self) -> None:
        """A file deleted or replaced under us would take every later write with it."""
        now = _identity(self.path)
        if now != self._identity:
            what = "deleted" if now is None else "replaced by another file"
            raise StoreUnavailable(f"state file {self.path} was {what} while canary was "
                                   "running; nothing more is written to it. Restart the "
                                   "controller once the file is back in place (or to start "
                                   "from an empty store)")

    def _run(self, fn: Any, *args: Any, write: bool = False) -> Any:
        with self._mutex:
            if write:
                self._check_identity()
            try:
                return fn(*args)
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as e:
                # a failed write leaves SQLite's transaction rolled back; nothing half-saved
                raise _unavailable(self.path, e) from e

    async def _call(self, fn: Any, *args: Any, write: bool = False) -> Any:
        return await self._pool.run(self._run, fn, *args, write=write)

    # ---- the Store protocol -----------------------------------------------------------

    def _create(self, r: Rollout) -> Rollout:
        try:
            self._db.execute(
                "INSERT INTO rollouts (id, target, active, started_at, version, data, state) "
                "VALUES (?, ?, ?, ?, 1, ?, ?)",
                (r.id, r.target, 0 if r.state.final else 1, r.started_at,
                 jsonsafe.dumps(r.to_store()), r.state.value))
        except sqlite3.IntegrityError as e:
            row = self._db.execute("SELECT id FROM rollouts WHERE target = ? AND active = 1",
                                   (r.target,)).fetchone()
            other = row[0] if row else "?"
            raise Conflict(f"target {r.target} already has an active rollout ({other}); "
                           "abort it or wait for it to end") from e
        return Rollout.from_store(r.to_store(), version=1)

    async def create(self, *, rollout: Rollout) -> Rollout:
        result: Rollout = await self._call(self._create, rollout, write=True)
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

    def _save(self, r: Rollout, expected: int,
              readings: Sequence[history.Point] = ()) -> Rollout:
        if not readings:
            return self._save_row(r, expected)
        # the rollout and the readings it was judged by commit together (one fsync)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out = self._save_row(r, expected)
            self._add_readings(r.id, readings)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # (SQLite may have rolled back already)
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return out

    def _save_row(self, r: Rollout, expected: int) -> Rollout:
        cur = self._db.execute(
            "UPDATE rollouts SET active = ?, version = version + 1, data = ?, state = ? "
            "WHERE id = ? AND version = ?",
            (0 if r.state.final else 1, jsonsafe.dumps(r.to_store()), r.state.value, r.id,
             expected))
        if cur.rowcount != 1:
            raise StoreConflict(f"rollout {r.id} changed since version {expected}")
        return Rollout.from_store(r.to_store(), version=expected + 1)

    def _add_readings(self, rollout_id: str, readings: Sequence[history.Point]) -> None:
        self._db.executemany(
            "INSERT INTO readings (rollout, series, at, data) VALUES (?, ?, ?, ?)",
            [(rollout_id, p["series"], p["at"], jsonsafe.dumps(p)) for p in readings])
        for series in {p["series"] for p in readings}:
            (count,) = self._db.execute("SELECT count(*) FROM readings WHERE rollout = ? AND "
                                        "series = ?", (rollout_id, series)).fetchone()
            if count <= history.MAX_POINTS:
                continue
            rows = self._db.execute("SELECT n, data FROM readings WHERE rollout = ? AND "
                                    "series = ? ORDER BY n", (rollout_id, series)).fetchall()
            drop = history.thin([json.loads(d) for _, d in rows])
            self._db.executemany("DELETE FROM readings WHERE n = ?",
                                 [(rows[i][0],) for i in drop])

    async def save(self, *, rollout: Rollout, expected_version: int,
                   readings: Sequence[history.Point] = ()) -> Rollout:
        result: Rollout = await self._call(self._save, rollout, expected_version, readings,
                                           write=True)
        return result

    def _readings(self, rollout_id: str) -> list[history.Point]:
        if self._db.execute("SELECT 1 FROM rollouts WHERE id = ?", (rollout_id,)).fetchone() \
                is None:
            raise no_such_rollout(rollout_id)
        rows = self._db.execute("SELECT data FROM readings WHERE rollout = ? ORDER BY at, n",
                                (rollout_id,)).fetchall()
        return [json.loads(d) for (d,) in rows]

    async def readings(self, rollout_id: str) -> list[history.Point]:
        result: list[history.Point] = await self._call(self._readings, rollout_id)
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
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:
            if events or "malformed JSON" not in str(e):
                raise
            # a row written before stored JSON was kept strict (`Infinity`): drop events here
            rows = self._db.execute(sql.replace(data, "data", 1), args).fetchall()
            rows = [(json.dumps({**json.loads(d), "events": []}), v) for d, v in rows]
        return [Rollout.from_store(json.loads(d), version=v) for d, v in rows]

    async def list(self, *, active_only: bool = False, target: str | None = None,
                   state: Phase | Iterable[Phase] | None = None, limit: int | None = None,
                   before: str | None = None, events: bool = True) -> list[Rollout]:
        result: list[Rollout] = await self._call(self._list, active_only, target,
                                                 phases(state), limit, before, events)
        return result

    async def ping(self) -> None:
        """A real write, fsynced like every save: `SELECT 1` succeeds on a full,
        read-only or deleted file."""
        await self._call(lambda: self._db.execute(
            "INSERT OR REPLACE INTO health (id, at) VALUES (1, ?)", (time.time(),)), write=True)

    def _sides(self, target: str) -> Sides | None:
        row = self._db.execute("SELECT sides FROM targets WHERE name = ?", (target,)).fetchone()
        return Sides.from_store(json.loads(row[0])) if row else None

    async def sides(self, target: str) -> Sides | None:
        result: Sides | None = await self._call(self._sides, target)
        return result

    async def save_sides(self, target: str, sides: Sides) -> None:
        await self._call(lambda: self._db.execute(
            "INSERT OR REPLACE INTO targets (name, sides) VALUES (?, ?)",
            (target, jsonsafe.dumps(sides.to_store()))), write=True)

    def _close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".pid")
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def close(self) -> None:
        await self._call(self._close)
        self._pool.shutdown()
