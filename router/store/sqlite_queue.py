"""The SQLite store's queues: inbound (with group commit), dead letters, outbox.

`enqueue_inbound` is the webhook hot path: callers hand their rows to one
flusher task, which writes whatever has gathered in one transaction and
answers them all after the COMMIT, so a burst costs a few commits, not one
per message. Queue rows point at the stored message by its `seq`; being in
the queue table is what "queued" means, and `visible_at` / `due_at` hide a
claimed or backing-off row until then.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime

import aiosqlite

from router.errors import NotFound, StoreError
from router.model import (
    Accepted,
    DeadLetter,
    Delivery,
    DeliveryStatus,
    Kind,
    Message,
    format_time,
    new_id,
    utcnow,
)
from router.store.fanout import Signal, wait_for_work
from router.store.sqlite_db import Row, SQLiteDatabase, conversation_in, fetch_one
from router.store.sqlite_schema import (
    INSERT_MESSAGE,
    SAVE_CONVERSATION,
    conversation_row,
    dumps,
    load_dead_letter,
    load_message,
    message_row,
    micros,
    priority,
)

MAX_BATCH = 500
"""Enqueues per group commit; also bounds the parameters of one lookup."""


@dataclass(slots=True)
class _Enqueue:
    message: Message
    row: Row
    priority: int
    future: asyncio.Future[Accepted]


class SQLiteQueues:
    """The queue half of SQLiteStore."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._pending: list[_Enqueue] = []
        self._pending_ready = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._inbound = Signal()
        self._outbound = Signal()

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="sqlite-group-commit")

    async def _stop_flusher(self) -> None:
        """Commits and answers every enqueue already handed in."""
        if self._flusher is not None:
            flusher, self._flusher = self._flusher, None
            self._pending_ready.set()
            await flusher

    # -- inbound queue ---------------------------------------------------

    async def enqueue_inbound(self, message: Message) -> Accepted:
        if self._flusher is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.append(_Enqueue(message, message_row(message), priority(message.urgency), future))
        self._pending_ready.set()
        return await future

    async def _flush_forever(self) -> None:
        """While one batch commits, the next one gathers."""
        while True:
            await self._pending_ready.wait()
            self._pending_ready.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._flush(batch)
            if self._flusher is None:
                return

    async def _flush(self, batch: list[_Enqueue]) -> None:
        outcome: list[Accepted] | Exception
        try:
            async with self._db.write() as db:
                outcome = await _insert_inbound(db, batch)
        except StoreError as exc:
            if len(batch) > 1 and isinstance(exc.__cause__, sqlite3.IntegrityError):
                # One malformed message must not fail everyone it was batched with.
                for one in batch:
                    await self._flush([one])
                return
            outcome = exc
        except Exception as exc:
            outcome = exc
        for index, item in enumerate(batch):
            if item.future.done():
                continue
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome[index])
        self._inbound.fire()

    async def claim_inbound(
        self, consumer: str, limit: int, visibility_s: float, block_s: float = 0
    ) -> list[Message]:
        async def attempt(_elapsed_s: float) -> list[Message]:
            now = time.time()
            async with self._db.write() as db:
                rows = await db.execute_fetchall(
                    "SELECT q.seq, m.data FROM inbound_queue q JOIN messages m ON m.seq = q.seq"
                    " WHERE q.visible_at <= ? OR q.consumer = ? ORDER BY q.priority, q.seq LIMIT ?",
                    (now, consumer, limit),
                )
                await db.executemany(
                    "UPDATE inbound_queue SET visible_at = ?, consumer = ? WHERE seq = ?",
                    [(now + visibility_s, consumer, seq) for seq, _ in rows],
                )
            return [load_message(seq, data) for seq, data in rows]

        return await wait_for_work(self._inbound, block_s, attempt)

    async def complete_inbound(self, message_id: str) -> None:
        async with self._db.write() as db:
            await db.execute(
                "DELETE FROM inbound_queue WHERE seq = (SELECT seq FROM messages WHERE id = ?)", (message_id,)
            )

    async def fail_inbound(self, message_id: str, error: str, max_attempts: int) -> bool:
        """A failed message is visible again at once: its retry does not wait
        out the visibility timeout."""
        async with self._db.write() as db:
            row = await fetch_one(
                db,
                "SELECT q.seq, q.attempts + 1, m.channel, m.data FROM inbound_queue q"
                " JOIN messages m ON m.seq = q.seq WHERE m.id = ?",
                (message_id,),
            )
            if row is None:
                return False
            seq, attempts, channel, payload = row
            dead = attempts >= max_attempts
            if dead:
                await db.execute("DELETE FROM inbound_queue WHERE seq = ?", (seq,))
                await _add_dead_letter(db, channel, payload, error, attempts, message_id)
            else:
                await db.execute(
                    "UPDATE inbound_queue SET attempts = ?, visible_at = 0, consumer = NULL WHERE seq = ?",
                    (attempts, seq),
                )
        self._inbound.fire()
        return dead

    async def inbound_backlog(self) -> int:
        rows = await self._db.fetch("SELECT COUNT(*) FROM inbound_queue")
        return int(rows[0][0])

    # -- dead letters ----------------------------------------------------

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> DeadLetter:
        async with self._db.write() as db:
            return await _add_dead_letter(db, channel, payload, error, 0, None)

    async def list_dead_letters(self) -> list[DeadLetter]:
        rows = await self._db.fetch(
            "SELECT id, channel, payload, error, attempts, created_at, message_id"
            " FROM dead_letters ORDER BY seq"
        )
        return [load_dead_letter(row) for row in rows]

    async def retry_dead_letter(self, dead_id: str) -> bool:
        async with self._db.write() as db:
            row = await fetch_one(
                db,
                "SELECT m.seq, m.data FROM dead_letters d JOIN messages m ON m.id = d.message_id"
                " WHERE d.id = ?",
                (dead_id,),
            )
            if row is None:
                return False
            seq, data = row
            await db.execute(
                "INSERT INTO inbound_queue (seq, priority) VALUES (?, ?) ON CONFLICT (seq) DO NOTHING",
                (seq, priority(load_message(seq, data).urgency)),
            )
            await db.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
        self._inbound.fire()
        return True

    # -- outbox ------------------------------------------------------------

    async def enqueue_outbound(self, message: Message) -> Message:
        async with self._db.write() as db:
            row = await fetch_one(db, "SELECT seq, data FROM messages WHERE id = ?", (message.id,))
            if row is not None:
                return load_message(*row)
            if message.conversation_id is not None:
                conversation = await conversation_in(db, message.conversation_id)
                conversation.message_count += 1
                conversation.last_message_at = max(conversation.last_message_at, message.received_at)
                if message.kind is Kind.AGENT and conversation.first_response_at is None:
                    conversation.first_response_at = message.received_at
                await db.execute(SAVE_CONVERSATION, conversation_row(conversation))
            stored = replace(message, delivery=message.delivery or Delivery())
            cursor = await db.execute(INSERT_MESSAGE, message_row(stored))
            stored.seq = cursor.lastrowid
            if stored.delivery and stored.delivery.status is DeliveryStatus.QUEUED:
                await _queue_outbound(db, stored)
        self._outbound.fire()
        return stored

    async def claim_outbound(
        self,
        consumer: str,
        channels: list[str],
        now: datetime,
        limit: int,
        visibility_s: float,
        block_s: float = 0,
    ) -> list[Message]:
        """While blocked, `now` moves on with the clock, so a retry that falls
        due during the wait is handed out."""
        if not channels:
            return []
        marks = ", ".join("?" * len(channels))

        async def attempt(elapsed_s: float) -> list[Message]:
            at = now.timestamp() + elapsed_s
            async with self._db.write() as db:
                rows = await db.execute_fetchall(
                    "SELECT o.seq, m.data FROM outbox o JOIN messages m ON m.seq = o.seq"
                    f" WHERE o.channel IN ({marks}) AND (o.due_at <= ? OR o.consumer = ?)"
                    " ORDER BY o.seq LIMIT ?",
                    (*channels, at, consumer, limit),
                )
                await db.executemany(
                    "UPDATE outbox SET due_at = ?, consumer = ? WHERE seq = ?",
                    [(at + visibility_s, consumer, seq) for seq, _ in rows],
                )
            return [load_message(seq, data) for seq, data in rows]

        return await wait_for_work(self._outbound, block_s, attempt)

    async def record_delivery(self, message_id: str, delivery: Delivery) -> Message:
        queued = delivery.status is DeliveryStatus.QUEUED
        async with self._db.write() as db:
            row = await fetch_one(db, "SELECT seq, data FROM messages WHERE id = ?", (message_id,))
            if row is None:
                raise NotFound(f"no message {message_id!r}")
            message = load_message(*row)
            message.delivery = replace(delivery)
            await db.execute(
                "UPDATE messages SET data = ? WHERE seq = ?", (dumps(message.to_dict()), message.seq)
            )
            if queued:
                await _queue_outbound(db, message)
            else:
                await db.execute("DELETE FROM outbox WHERE seq = ?", (message.seq,))
        if queued:
            self._outbound.fire()
        return message

    async def outbound_after(self, channel: str, after: int, limit: int) -> list[Message]:
        rows = await self._db.fetch(
            "SELECT seq, data FROM messages WHERE direction = 'out' AND channel = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (channel, after, limit),
        )
        return [load_message(seq, data) for seq, data in rows]

    async def mark_pulled(self, channel: str, upto: int) -> None:
        async with self._db.write() as db:
            rows = await db.execute_fetchall(
                "SELECT o.seq, m.data FROM outbox o JOIN messages m ON m.seq = o.seq"
                " WHERE o.channel = ? AND o.seq <= ?",
                (channel, upto),
            )
            updates = []
            for seq, data in rows:
                message = load_message(seq, data)
                attempts = (message.delivery.attempts if message.delivery else 0) + 1
                message.delivery = Delivery(DeliveryStatus.SENT, attempts)
                updates.append((dumps(message.to_dict()), seq))
            await db.executemany("UPDATE messages SET data = ? WHERE seq = ?", updates)
            await db.execute("DELETE FROM outbox WHERE channel = ? AND seq <= ?", (channel, upto))

    async def count_acks(self, channel: str, recipient_id: str, since: datetime) -> int:
        rows = await self._db.fetch(
            "SELECT COUNT(*) FROM messages WHERE kind = 'ack' AND channel = ? AND recipient_id = ?"
            " AND received_us >= ?",
            (channel, recipient_id, micros(since)),
        )
        return int(rows[0][0])


async def _insert_inbound(db: aiosqlite.Connection, batch: list[_Enqueue]) -> list[Accepted]:
    """One batch of enqueues, inside the caller's transaction: the first of
    each (channel, external_id) is stored and queued, every other one is a
    duplicate of the stored message."""
    known = await _known_inbound(db, {(item.message.channel, item.message.external_id) for item in batch})
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
        await db.executemany(INSERT_MESSAGE, [item.row for item in fresh.values()])
        await db.executemany(
            "INSERT INTO inbound_queue (seq, priority) SELECT seq, ? FROM messages WHERE id = ?",
            [(item.priority, item.message.id) for item in fresh.values()],
        )
    return results


async def _known_inbound(
    db: aiosqlite.Connection, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(channel, external_id) -> (message id, conversation ref) of stored inbound messages."""
    by_channel: defaultdict[str, list[str]] = defaultdict(list)
    for channel, external_id in keys:
        by_channel[channel].append(external_id)
    known = {}
    for channel, external_ids in by_channel.items():
        marks = ", ".join("?" * len(external_ids))
        rows = await db.execute_fetchall(
            "SELECT m.external_id, m.id, c.ref FROM messages m"
            " LEFT JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.direction = 'in' AND m.channel = ? AND m.external_id IN ({marks})",
            (channel, *external_ids),
        )
        known.update({(channel, external_id): (message_id, ref) for external_id, message_id, ref in rows})
    return known


async def _queue_outbound(db: aiosqlite.Connection, message: Message) -> None:
    """Due at `next_attempt_at`, or at once (0 is before any clock a caller
    passes); unclaimed, so the retry waits for its time even for the sender
    that claimed it before."""
    due = message.delivery.next_attempt_at if message.delivery else None
    await db.execute(
        "INSERT INTO outbox (seq, channel, due_at) VALUES (?, ?, ?)"
        " ON CONFLICT (seq) DO UPDATE SET due_at = excluded.due_at, consumer = NULL",
        (message.seq, message.channel, due.timestamp() if due else 0),
    )


async def _add_dead_letter(
    db: aiosqlite.Connection, channel: str, payload: str, error: str, attempts: int, message_id: str | None
) -> DeadLetter:
    dead = DeadLetter(new_id("dl"), channel, payload, error, attempts, utcnow(), message_id)
    await db.execute(
        "INSERT INTO dead_letters (id, channel, payload, error, attempts, created_at, message_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (dead.id, channel, payload, error, attempts, format_time(dead.created_at), message_id),
    )
    return dead
