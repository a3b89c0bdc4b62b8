"""The SQLite store's outbox: outbound messages and their delivery queue.

An outbound message is stored like any other; a row in `outbox` means its
delivery is queued, and `due_at` hides it until its next attempt is due or
a claim runs out. Pull-mode channels read the messages by `seq` instead.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime

from router.errors import NotFound
from router.model import Delivery, DeliveryStatus, Kind, Message
from router.store.fanout import Signal, wait_for_work
from router.store.sqlite_db import Row, SQLiteDatabase, conversation_in, fetch_one, save_conversation
from router.store.sqlite_schema import (
    INSERT_MESSAGE,
    dumps,
    load_message,
    message_row,
    micros,
    recipient_id,
)


class SQLiteOutbox:
    """The outbox part of SQLiteStore; owns the database handle the other parts share."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._outbound = Signal()

    async def enqueue_outbound(self, message: Message) -> Message:
        stored = await self._db.write(lambda db: _enqueue_outbound(db, message))
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
        if not channels:
            return []

        async def attempt(elapsed_s: float) -> list[Message]:
            at = now.timestamp() + elapsed_s
            rows = await self._db.write(
                lambda db: _claim_outbound(db, consumer, channels, at, limit, visibility_s)
            )
            # Decoded here: the writer's thread is what every write queues for.
            return [load_message(seq, data) for seq, data in rows]

        return await wait_for_work(self._outbound, block_s, attempt)

    async def record_delivery(self, message_id: str, delivery: Delivery) -> Message:
        message = await self._db.write(lambda db: _record_delivery(db, message_id, delivery))
        if delivery.status is DeliveryStatus.QUEUED:
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
        await self._db.write(lambda db: _mark_pulled(db, channel, upto))

    async def enqueue_ack(self, ack: Message, since: datetime, cap: int) -> Message | None:
        stored = await self._db.write(lambda db: _enqueue_ack(db, ack, since, cap))
        if stored is not None:
            self._outbound.fire()
        return stored


# -- transactions, run on the writer's thread -------------------------------------


def _enqueue_ack(db: sqlite3.Connection, ack: Message, since: datetime, cap: int) -> Message | None:
    stored = fetch_one(db, "SELECT seq, data FROM messages WHERE id = ?", (ack.id,))
    if stored is not None:
        return load_message(*stored)
    row = fetch_one(
        db,
        "SELECT COUNT(*) FROM messages WHERE kind = 'ack' AND channel = ? AND recipient_id = ?"
        " AND received_us >= ?",
        (ack.channel, recipient_id(ack), micros(since)),
    )
    count = row[0] if row else 0
    return _enqueue_outbound(db, ack) if count < cap else None


def _enqueue_outbound(db: sqlite3.Connection, message: Message) -> Message:
    row = fetch_one(db, "SELECT seq, data FROM messages WHERE id = ?", (message.id,))
    if row is not None:
        return load_message(*row)
    if message.conversation_id is not None:
        conversation, stored_columns = conversation_in(db, message.conversation_id)
        conversation.message_count += 1
        conversation.last_message_at = max(conversation.last_message_at, message.received_at)
        if message.kind is Kind.AGENT and conversation.first_response_at is None:
            conversation.first_response_at = message.received_at
        if message.kind is Kind.ACK:
            conversation.acked = True
        save_conversation(db, conversation, stored_columns)
    stored = replace(message, delivery=message.delivery or Delivery())
    stored.seq = db.execute(INSERT_MESSAGE, message_row(stored)).lastrowid
    if stored.delivery and stored.delivery.status is DeliveryStatus.QUEUED:
        _queue_outbound(db, stored)
    return stored


def _claim_outbound(
    db: sqlite3.Connection, consumer: str, channels: list[str], at: float, limit: int, visibility_s: float
) -> list[Row]:
    """(seq, data) of the claimed messages."""
    marks = ", ".join("?" * len(channels))
    rows: list[Row] = db.execute(
        "SELECT o.seq, m.data FROM outbox o JOIN messages m ON m.seq = o.seq"
        f" WHERE o.channel IN ({marks}) AND (o.due_at <= ? OR o.consumer = ?) ORDER BY o.seq LIMIT ?",
        (*channels, at, consumer, limit),
    ).fetchall()
    db.executemany(
        "UPDATE outbox SET due_at = ?, consumer = ? WHERE seq = ?",
        [(at + visibility_s, consumer, seq) for seq, _ in rows],
    )
    return rows


def _record_delivery(db: sqlite3.Connection, message_id: str, delivery: Delivery) -> Message:
    row = fetch_one(db, "SELECT seq, data FROM messages WHERE id = ?", (message_id,))
    if row is None:
        raise NotFound(f"no message {message_id!r}")
    message = load_message(*row)
    message.delivery = replace(delivery)
    db.execute("UPDATE messages SET data = ? WHERE seq = ?", (dumps(message.to_dict()), message.seq))
    if delivery.status is DeliveryStatus.QUEUED:
        _queue_outbound(db, message)
    else:
        db.execute("DELETE FROM outbox WHERE seq = ?", (message.seq,))
    return message


def _mark_pulled(db: sqlite3.Connection, channel: str, upto: int) -> None:
    rows = db.execute(
        "SELECT o.seq, m.data FROM outbox o JOIN messages m ON m.seq = o.seq"
        " WHERE o.channel = ? AND o.seq <= ?",
        (channel, upto),
    ).fetchall()
    updates = []
    for seq, data in rows:
        message = load_message(seq, data)
        attempts = (message.delivery.attempts if message.delivery else 0) + 1
        message.delivery = Delivery(DeliveryStatus.SENT, attempts)
        updates.append((dumps(message.to_dict()), seq))
    db.executemany("UPDATE messages SET data = ? WHERE seq = ?", updates)
    db.execute("DELETE FROM outbox WHERE channel = ? AND seq <= ?", (channel, upto))


def _queue_outbound(db: sqlite3.Connection, message: Message) -> None:
    """Due at `next_attempt_at`, or at once (0 is before any clock a caller
    passes); unclaimed, so the retry waits for its time even for the sender
    that claimed it before."""
    due = message.delivery.next_attempt_at if message.delivery else None
    db.execute(
        "INSERT INTO outbox (seq, channel, due_at) VALUES (?, ?, ?)"
        " ON CONFLICT (seq) DO UPDATE SET due_at = excluded.due_at, consumer = NULL",
        (message.seq, message.channel, due.timestamp() if due else 0),
    )
