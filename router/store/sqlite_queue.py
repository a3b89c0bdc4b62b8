"""The SQLite store's inbound queue (with group commit) and dead letters.

`enqueue_inbound` is the webhook hot path: callers hand their rows to one
flusher task, which writes whatever has gathered in one transaction (one
hop to the writer's thread) and answers them all after the COMMIT, so a
burst costs a few commits, not one per message. Queue rows point at the
stored message by its `seq`; being in the queue table is what "queued"
means, and `visible_at` hides a claimed row until then.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass

from router.errors import StoreError
from router.model import Accepted, DeadLetter, Message, format_time, new_id, utcnow
from router.store import SUSPECT_AFTER, UNFINISHED_ERROR
from router.store.batching import GroupCommit
from router.store.fanout import Signal, wait_for_work
from router.store.sqlite_db import Row, SQLiteDatabase, fetch_one
from router.store.sqlite_outbox import SQLiteOutbox
from router.store.sqlite_schema import (
    INSERT_MESSAGE,
    load_dead_letter,
    load_message,
    message_row,
    priority,
)

MAX_BATCH = 500
"""Enqueues per group commit; also bounds the parameters of one lookup."""


@dataclass(frozen=True, slots=True)
class _Claim:
    consumer: str
    limit: int
    visibility_s: float
    max_attempts: int


@dataclass(slots=True)
class _Enqueue:
    message: Message
    row: Row
    priority: int


class SQLiteQueues(SQLiteOutbox):
    """The queue half of SQLiteStore: inbound and dead letters here, the outbox in its base."""

    def __init__(self, db: SQLiteDatabase) -> None:
        super().__init__(db)
        self._enqueues: GroupCommit[_Enqueue, Accepted] = GroupCommit(
            self._write_enqueues, "sqlite-group-commit", MAX_BATCH
        )
        self._inbound = Signal()

    # -- inbound queue ---------------------------------------------------

    async def enqueue_inbound(self, message: Message) -> Accepted:
        """Text SQLite cannot take (no UTF-8: a lone surrogate from a
        mis-decoded header) raises UnicodeEncodeError here, for this message
        alone: inside the group commit it would fail every message batched with it."""
        row = message_row(message)
        for value in row:
            if isinstance(value, str):
                value.encode()
        return await self._enqueues.submit(_Enqueue(message, row, priority(message.urgency)))

    async def _write_enqueues(self, batch: list[_Enqueue]) -> list[Accepted | Exception]:
        """One transaction for the batch; one malformed message must not fail
        everyone it was batched with, so an integrity error retries one by one."""
        try:
            outcomes: list[Accepted | Exception] = list(
                await self._db.write(lambda db: _insert_inbound(db, batch))
            )
        except StoreError as exc:
            if len(batch) > 1 and isinstance(exc.__cause__, sqlite3.IntegrityError):
                return [outcome for one in batch for outcome in await self._write_enqueues([one])]
            outcomes = [exc] * len(batch)
        self._inbound.fire()
        return outcomes

    async def claim_inbound(
        self, consumer: str, limit: int, visibility_s: float, block_s: float = 0, max_attempts: int = 5
    ) -> list[Message]:
        claim = _Claim(consumer, limit, visibility_s, max_attempts)

        async def attempt(_elapsed_s: float) -> list[Message]:
            now = time.time()
            rows = await self._db.write(lambda db: _claim_inbound(db, claim, now))
            # Decoded here: the writer's thread is what every write queues for.
            return [load_message(seq, data) for seq, data in rows]

        return await wait_for_work(self._inbound, block_s, attempt)

    async def complete_inbound(self, message_ids: list[str]) -> None:
        await self._db.write(lambda db: _complete_inbound(db, message_ids))

    async def fail_inbound(self, message_id: str, error: str, max_attempts: int) -> bool:
        """A failed message is visible again at once: its retry does not wait
        out the visibility timeout."""
        dead = await self._db.write(lambda db: _fail_inbound(db, message_id, error, max_attempts))
        if dead is not None:
            self._inbound.fire()
        return bool(dead)

    async def inbound_backlog(self) -> int:
        rows = await self._db.fetch("SELECT COUNT(*) FROM inbound_queue")
        return int(rows[0][0])

    # -- dead letters ----------------------------------------------------

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> DeadLetter:
        return await self._db.write(lambda db: _add_dead_letter(db, channel, payload, error, 0, None))

    async def list_dead_letters(self) -> list[DeadLetter]:
        rows = await self._db.fetch(
            "SELECT id, channel, payload, error, attempts, created_at, message_id"
            " FROM dead_letters ORDER BY seq"
        )
        return [load_dead_letter(row) for row in rows]

    async def retry_dead_letter(self, dead_id: str) -> bool:
        retried = await self._db.write(lambda db: _retry_dead_letter(db, dead_id))
        if retried:
            self._inbound.fire()
        return retried


# -- transactions, run on the writer's thread -------------------------------------


def _insert_inbound(db: sqlite3.Connection, batch: list[_Enqueue]) -> list[Accepted]:
    """One batch of enqueues: the first of each (channel, external_id) is
    stored and queued, every other one is a duplicate of the stored message."""
    known = _known_inbound(db, {(item.message.channel, item.message.external_id) for item in batch})
    fresh: dict[tuple[str, str], _Enqueue] = {}
    results: list[Accepted] = []
    for item in batch:
        key = (item.message.channel, item.message.external_id)
        if key in known:
            results.append(Accepted(*known[key], duplicate=True))
        elif key in fresh:
            results.append(Accepted(fresh[key].message.id, None, duplicate=True))
        else:
            fresh[key] = item
            results.append(Accepted(item.message.id, None, duplicate=False))
    if fresh:
        db.executemany(INSERT_MESSAGE, [item.row for item in fresh.values()])
        db.executemany(
            "INSERT INTO inbound_queue (seq, priority) SELECT seq, ? FROM messages WHERE id = ?",
            [(item.priority, item.message.id) for item in fresh.values()],
        )
    return results


def _known_inbound(
    db: sqlite3.Connection, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(channel, external_id) -> (message id, conversation ref) of stored inbound messages."""
    by_channel: defaultdict[str, list[str]] = defaultdict(list)
    for channel, external_id in keys:
        by_channel[channel].append(external_id)
    known = {}
    for channel, external_ids in by_channel.items():
        marks = ", ".join("?" * len(external_ids))
        rows = db.execute(
            "SELECT m.external_id, m.id, c.ref FROM messages m"
            " LEFT JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.direction = 'in' AND m.channel = ? AND m.external_id IN ({marks})",
            (channel, *external_ids),
        )
        known.update({(channel, external_id): (message_id, ref) for external_id, message_id, ref in rows})
    return known


def _claim_inbound(db: sqlite3.Connection, claim: _Claim, now: float) -> list[Row]:
    """(seq, data) of the claimed messages. A row that still has a consumer
    was handed out and never finished (a failure clears the consumer); after
    SUSPECT_AFTER such hand-outs it goes alone, or to the dead letters once
    it has had its attempts."""
    rows = db.execute(
        "SELECT q.seq, m.data, q.consumer IS NOT NULL AND q.attempts >= ?, q.attempts, m.channel, m.id"
        " FROM inbound_queue q JOIN messages m ON m.seq = q.seq"
        " WHERE q.visible_at <= ? OR q.consumer = ? ORDER BY q.priority, q.seq LIMIT ?",
        (SUSPECT_AFTER, now, claim.consumer, claim.limit),
    ).fetchall()
    taken: list[Row] = []
    for seq, data, suspect, attempts, channel, message_id in rows:
        if suspect and taken:
            break
        if suspect and attempts >= claim.max_attempts:
            db.execute("DELETE FROM inbound_queue WHERE seq = ?", (seq,))
            _add_dead_letter(db, channel, data, UNFINISHED_ERROR % attempts, attempts, message_id)
            continue
        taken.append((seq, data))
        if suspect:
            break
    db.executemany(
        "UPDATE inbound_queue SET visible_at = ?, consumer = ?, attempts = attempts + 1 WHERE seq = ?",
        [(now + claim.visibility_s, claim.consumer, seq) for seq, _ in taken],
    )
    return taken


def _complete_inbound(db: sqlite3.Connection, message_ids: list[str]) -> None:
    db.executemany(
        "DELETE FROM inbound_queue WHERE seq = (SELECT seq FROM messages WHERE id = ?)",
        [(message_id,) for message_id in message_ids],
    )


def _fail_inbound(db: sqlite3.Connection, message_id: str, error: str, max_attempts: int) -> bool | None:
    """Dead-lettered or not; None for a message not in the queue."""
    row = fetch_one(
        db,
        "SELECT q.seq, q.attempts, m.channel, m.data FROM inbound_queue q"
        " JOIN messages m ON m.seq = q.seq WHERE m.id = ?",
        (message_id,),
    )
    if row is None:
        return None
    seq, attempts, channel, payload = row
    if attempts >= max_attempts:
        db.execute("DELETE FROM inbound_queue WHERE seq = ?", (seq,))
        _add_dead_letter(db, channel, payload, error, attempts, message_id)
        return True
    db.execute("UPDATE inbound_queue SET visible_at = 0, consumer = NULL WHERE seq = ?", (seq,))
    return False


def _retry_dead_letter(db: sqlite3.Connection, dead_id: str) -> bool:
    row = fetch_one(
        db,
        "SELECT m.seq, m.data FROM dead_letters d JOIN messages m ON m.id = d.message_id WHERE d.id = ?",
        (dead_id,),
    )
    if row is None:
        return False
    seq, data = row
    db.execute(
        "INSERT INTO inbound_queue (seq, priority) VALUES (?, ?) ON CONFLICT (seq) DO NOTHING",
        (seq, priority(load_message(seq, data).urgency)),
    )
    db.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
    return True


def _add_dead_letter(
    db: sqlite3.Connection, channel: str, payload: str, error: str, attempts: int, message_id: str | None
) -> DeadLetter:
    dead = DeadLetter(new_id("dl"), channel, payload, error, attempts, utcnow(), message_id)
    db.execute(
        "INSERT INTO dead_letters (id, channel, payload, error, attempts, created_at, message_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (dead.id, channel, payload, error, attempts, format_time(dead.created_at), message_id),
    )
    return dead
