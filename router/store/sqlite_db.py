"""The SQLite file: two connections, one write transaction at a time.

Writes go through one connection, one transaction at a time (`write()`),
so every read-modify-write step of the Store protocol is atomic in this
process, and BEGIN IMMEDIATE makes it atomic against other processes on the
same file (the CLI). Plain reads use a second connection, so they never see
a transaction that has not committed and never queue behind one.
synchronous=NORMAL in WAL mode keeps every commit across `kill -9` of the
process, which is the promise; a power cut may lose the last ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite

from router.errors import NotFound, StoreError
from router.model import Conversation
from router.store.sqlite_schema import SCHEMA, load_conversation

BUSY_TIMEOUT_MS = 10_000
Row = tuple[Any, ...]
Params = tuple[Any, ...] | list[Any]


class SQLiteDatabase:
    def __init__(self, path: Path, display_url: str) -> None:
        self.path = path
        self.display_url = display_url
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    async def open(self) -> None:
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            await self._writer.execute_fetchall("PRAGMA journal_mode = WAL")
            await self._writer.executescript(SCHEMA)
            self._reader = await self._connect()
        except sqlite3.Error as exc:
            await self._disconnect()
            raise StoreError(f"cannot open {self.display_url}: {exc}") from exc

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in (f"busy_timeout = {BUSY_TIMEOUT_MS}", "synchronous = NORMAL", "foreign_keys = ON"):
            await db.execute_fetchall(f"PRAGMA {pragma}")
        return db

    async def close(self) -> None:
        """Waits for the transaction in progress, if any."""
        async with self._write_lock:
            await self._disconnect()

    async def _disconnect(self) -> None:
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._reader = self._writer = None

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, the only one in this process while it runs."""
        async with self._write_lock:
            if self._writer is None:
                raise StoreError("the store is not open")
            db = self._writer
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                # A cancelled COMMIT still runs on the connection's thread;
                # then there is nothing left to roll back.
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.display_url}: {exc}") from exc
                raise

    async def fetch(self, sql: str, params: Params = ()) -> list[Row]:
        if self._reader is None:
            raise StoreError("the store is not open")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.display_url}: {exc}") from exc

    async def fetch_one(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None


async def fetch_one(db: aiosqlite.Connection, sql: str, params: Params = ()) -> Row | None:
    """Inside a write transaction."""
    rows = await db.execute_fetchall(sql, params)
    return next(iter(rows), None)


async def conversation_in(db: aiosqlite.Connection, conversation_id: str) -> Conversation:
    """Inside a write transaction; raises NotFound."""
    row = await fetch_one(db, "SELECT data FROM conversations WHERE id = ?", (conversation_id,))
    if row is None:
        raise NotFound(f"no conversation {conversation_id!r}")
    return load_conversation(row[0])


async def increment(db: aiosqlite.Connection, name: str) -> int:
    rows = await db.execute_fetchall(
        "INSERT INTO counters (name, value) VALUES (?, 1)"
        " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
        (name,),
    )
    return int(next(iter(rows))[0])
