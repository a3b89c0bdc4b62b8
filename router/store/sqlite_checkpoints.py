"""Checkpoints in the SQLite file: where each channel has read up to (Store protocol).

A channel's own durable memory of what it has taken, such as an IMAP
folder's `UIDVALIDITY:last UID`, written only after the messages below it
are queued (SPEC 6 promise 1).
"""

from __future__ import annotations

import sqlite3

from router.store.sqlite_db import SQLiteDatabase, fetch_one

CHECKPOINTS = (
    "CREATE TABLE IF NOT EXISTS checkpoints (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
)
"""Created by the first checkpoint call rather than in the schema, so
databases made before checkpoints existed need no migration."""


class SQLiteCheckpoints:
    _db: SQLiteDatabase

    async def get_checkpoint(self, key: str) -> str | None:
        return await self._db.read(lambda db: _get(db, key))

    async def put_checkpoint(self, key: str, value: str) -> None:
        await self._db.write(lambda db: _put(db, key, value))


def _get(db: sqlite3.Connection, key: str) -> str | None:
    """On the reader, which must not create tables: none yet means no value."""
    try:
        row = fetch_one(db, "SELECT value FROM checkpoints WHERE key = ?", (key,))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return str(row[0]) if row else None


def _put(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute(CHECKPOINTS)
    db.execute(
        "INSERT INTO checkpoints (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
