"""Leases in the SQLite file: which process runs each poller (Store protocol).

With SQLite every process is on one host, so the wall clock of that host is
the lease clock. A row is never deleted, only released or let expire, so
its `token` only grows: every new holder gets a higher one.
"""

from __future__ import annotations

import sqlite3
import time

from router.store.sqlite_db import SQLiteDatabase, fetch_one

LEASES = """CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID"""
"""Created by the first lease call rather than in the schema, so databases
made before leases existed need no migration."""


class SQLiteLeases:
    _db: SQLiteDatabase

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        return await self._db.write(lambda db: _acquire(db, name, holder, ttl_s, time.time()))

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return await self._db.write(lambda db: _renew(db, name, holder, ttl_s, time.time()))

    async def release_lease(self, name: str, holder: str) -> None:
        await self._db.write(lambda db: _release(db, name, holder))


def _acquire(db: sqlite3.Connection, name: str, holder: str, ttl_s: float, now: float) -> int | None:
    db.execute(LEASES)
    row = fetch_one(db, "SELECT holder, token, expires_at FROM leases WHERE name = ?", (name,))
    if row is None:
        db.execute("INSERT INTO leases VALUES (?, ?, 1, ?)", (name, holder, now + ttl_s))
        return 1
    current, token, expires_at = row
    live = current is not None and expires_at > now
    if live and current != holder:
        return None
    if not live:
        token += 1
    db.execute(
        "UPDATE leases SET holder = ?, token = ?, expires_at = ? WHERE name = ?",
        (holder, token, now + ttl_s, name),
    )
    return int(token)


def _renew(db: sqlite3.Connection, name: str, holder: str, ttl_s: float, now: float) -> bool:
    db.execute(LEASES)
    cursor = db.execute(
        "UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? AND expires_at > ?",
        (now + ttl_s, name, holder, now),
    )
    return cursor.rowcount > 0


def _release(db: sqlite3.Connection, name: str, holder: str) -> None:
    db.execute(LEASES)
    db.execute(
        "UPDATE leases SET holder = NULL, expires_at = 0 WHERE name = ? AND holder = ?", (name, holder)
    )
