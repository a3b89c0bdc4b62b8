"""The SQLite file: a writer and a reader connection, each on its own thread.

Every Store operation is one synchronous function run on one of those
threads (router/store/sqlite_threads.py), so it costs one hop from the event
loop and back however many statements it runs. Writes run on the writer's
thread one at a time, each atomic (its own savepoint in a BEGIN IMMEDIATE
transaction shared with the writes waiting with it), so every
read-modify-write step of the Store protocol is atomic in this process and
against other processes on the same file (the CLI). Plain reads run on the
reader's own connection, so they never see a transaction that has not
committed and never queue behind one. synchronous=NORMAL in WAL mode keeps
every commit across `kill -9` of the process, which is the promise; a power
cut may lose the last ones.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, TypeVar

from router.errors import NotFound, StoreError
from router.model import Conversation
from router.store.sqlite_schema import (
    CHANGING_COLUMNS,
    SCHEMA,
    changing_columns,
    dumps,
    load_conversation,
)
from router.store.sqlite_threads import ConnectionThread, Work, in_one_transaction, one_by_one

BUSY_TIMEOUT_MS = 10_000
PRAGMAS = (f"busy_timeout = {BUSY_TIMEOUT_MS}", "synchronous = NORMAL", "foreign_keys = ON")
WRITE_BATCH = 16
"""Writes run in one transaction at most; bounds how long the first waits for the others."""
Row = tuple[Any, ...]
Params = tuple[Any, ...] | list[Any]
T = TypeVar("T")


class SQLiteDatabase:
    def __init__(self, path: Path, display_url: str) -> None:
        self.path = path
        self.display_url = display_url
        self._writer: ConnectionThread | None = None
        self._reader: ConnectionThread | None = None

    async def open(self) -> None:
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = ConnectionThread(
            self.path, "sqlite-writer", PRAGMAS, in_one_transaction, WRITE_BATCH, _create_schema
        )
        reader = ConnectionThread(self.path, "sqlite-reader", PRAGMAS, one_by_one, 1)
        try:
            await writer.start()
            await reader.start()
        except sqlite3.Error as exc:
            await writer.stop()
            await reader.stop()
            raise StoreError(f"cannot open {self.display_url}: {exc}") from exc
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        """Waits for the calls in progress and those already made."""
        threads = (self._reader, self._writer)
        self._reader = self._writer = None
        for thread in threads:
            if thread is not None:
                await thread.stop()

    async def write(self, work: Work[T]) -> T:
        """`work(connection)` as one atomic step, the only write in this process
        while it runs: committed when it returns, rolled back when it raises.
        It must not return a cursor (ConnectionThread refuses one)."""
        return await self._run(self._writer, work)

    async def read(self, work: Work[T]) -> T:
        """`work(connection)` on the reader: sees committed data only."""
        return await self._run(self._reader, work)

    async def _run(self, thread: ConnectionThread | None, work: Work[T]) -> T:
        if thread is None:
            raise StoreError("the store is not open")
        try:
            return await thread.call(work)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.display_url}: {exc}") from exc

    async def fetch(self, sql: str, params: Params = ()) -> list[Row]:
        return await self.read(lambda db: db.execute(sql, params).fetchall())

    async def fetch_one(self, sql: str, params: Params = ()) -> Row | None:
        return await self.read(lambda db: fetch_one(db, sql, params))


def _create_schema(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA)


def fetch_one(db: sqlite3.Connection, sql: str, params: Params = ()) -> Row | None:
    """Reads every row, so no statement stays in progress (an unfinished
    UPDATE ... RETURNING would hold up the COMMIT)."""
    rows = db.execute(sql, params).fetchall()
    return rows[0] if rows else None


SELECT_CONVERSATION = f"SELECT {', '.join(CHANGING_COLUMNS)}, data FROM conversations"
"""A conversation as `save_conversation` needs it: with its stored CHANGING_COLUMNS."""


def conversation_in(db: sqlite3.Connection, conversation_id: str) -> tuple[Conversation, Row]:
    """Inside a write transaction: the conversation and, for `save_conversation`,
    its CHANGING_COLUMNS as stored; raises NotFound."""
    row = fetch_one(db, f"{SELECT_CONVERSATION} WHERE id = ?", (conversation_id,))
    if row is None:
        raise NotFound(f"no conversation {conversation_id!r}")
    return load_conversation(row[-1]), row[:-1]


def save_conversation(db: sqlite3.Connection, conversation: Conversation, stored: Row) -> None:
    """Rewrite a stored conversation: its JSON, and only those of its
    CHANGING_COLUMNS (`stored`, as read) that differ. SQLite rewrites the
    index entries of every column an UPDATE sets, changed or not: setting all
    of them made a joining message write 7 pages where 4 do."""
    columns = changing_columns(conversation)
    changed = [index for index, value in enumerate(columns) if value != stored[index]]
    assignments = "".join(f"{CHANGING_COLUMNS[index]} = ?, " for index in changed)
    db.execute(
        f"UPDATE conversations SET {assignments}data = ? WHERE id = ?",
        (*(columns[index] for index in changed), dumps(conversation.to_dict()), conversation.id),
    )


def increment(db: sqlite3.Connection, name: str) -> int:
    rows = db.execute(
        "INSERT INTO counters (name, value) VALUES (?, 1)"
        " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
        (name,),
    ).fetchall()
    return int(rows[0][0])
