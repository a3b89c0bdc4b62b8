"""The embedded store: one SQLite file in WAL mode, the default for one host.

The connections live in `sqlite_db`, the queues and the group commit of the
webhook hot path in `sqlite_queue`, the outbox in `sqlite_outbox`, the tables
in `sqlite_schema`; this module keeps the records: messages, conversations,
agents, and the events. Each write is one synchronous function, run as one
atomic step on the writer's thread (`SQLiteDatabase.write`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator
from typing import Any

from router.errors import Conflict, NotFound
from router.model import (
    Agent,
    Conversation,
    Event,
    InboxQuery,
    Message,
    Page,
    Presence,
    Status,
    Threaded,
)
from router.store import check_updatable, mask_url
from router.store.fanout import EventHub
from router.store.sqlite_checkpoints import SQLiteCheckpoints
from router.store.sqlite_db import (
    SELECT_CONVERSATION,
    SQLiteDatabase,
    conversation_in,
    fetch_one,
    increment,
    save_conversation,
)
from router.store.sqlite_leases import SQLiteLeases
from router.store.sqlite_queue import SQLiteQueues
from router.store.sqlite_schema import (
    INSERT_CONVERSATION,
    REF_COUNTER,
    conversation_row,
    database_path,
    decode_cursor,
    dumps,
    encode_cursor,
    load_agent,
    load_conversation,
    load_message,
    priority,
    recipient_id,
)


class SQLiteStore(SQLiteQueues, SQLiteLeases, SQLiteCheckpoints):
    def __init__(self, url: str) -> None:
        self.display_url = mask_url(url)
        self.path = database_path(url)
        super().__init__(SQLiteDatabase(self.path, self.display_url))
        self._events = EventHub()

    async def open(self) -> None:
        await self._db.open()
        self._enqueues.start()

    async def close(self) -> None:
        await self._enqueues.stop()
        await self._db.close()

    async def ping(self) -> None:
        await self._db.fetch("SELECT 1")

    # -- messages --------------------------------------------------------

    async def get_message(self, message_id: str) -> Message | None:
        row = await self._db.fetch_one("SELECT seq, data FROM messages WHERE id = ?", (message_id,))
        return load_message(*row) if row else None

    async def find_message(self, channel: str, external_id: str) -> Message | None:
        """An inbound match wins; an outbound one (our own Message-ID that the
        customer answers) is the fallback."""
        return await self._db.read(lambda db: _find_message(db, channel, external_id))

    async def update_message(self, message: Message) -> None:
        """Raises NotFound. A queued message moves to the queue place of its new urgency."""
        await self._db.write(lambda db: _update_message(db, message))

    # -- conversations ---------------------------------------------------

    async def thread_message(self, message: Message, new: Conversation) -> Threaded:
        return await self._db.write(lambda db: _thread_message(db, message, new))

    async def thread_messages(self, items: list[tuple[Message, Conversation]]) -> list[Threaded | Exception]:
        return await self._db.write(lambda db: _thread_messages(db, items))

    async def get_conversation(self, id_or_ref: str) -> Conversation | None:
        row = await self._db.fetch_one(
            "SELECT data FROM conversations WHERE id = ? OR ref = ?", (id_or_ref, id_or_ref)
        )
        return load_conversation(row[0]) if row else None

    async def update_conversation(self, conversation_id: str, **changes: Any) -> Conversation:
        check_updatable(changes)
        return await self._db.write(lambda db: _update_conversation(db, conversation_id, changes))

    async def claim_conversation(
        self, conversation_id: str, agent: str | None, expected: str | None, *, available: bool = False
    ) -> Conversation | None:
        return await self._db.write(
            lambda db: _claim_conversation(db, conversation_id, agent, expected, available)
        )

    async def list_conversations(self, query: InboxQuery) -> Page:
        """Keyset paging: the cursor is the sort key of the last row served, so
        pages neither repeat nor skip while other rows come and go. A row that
        moves in the order meanwhile (its urgency or deadline changed) can show
        on two pages or on none, as with any keyset paging."""
        filters = {"status = ?": query.status, "team = ?": query.team, "assignee = ?": query.assignee}
        clauses = [clause for clause, value in filters.items() if value is not None]
        params: list[Any] = [value for value in filters.values() if value is not None]
        if query.unassigned:
            clauses.append("assignee IS NULL")
        if query.cursor:
            clauses.append("(urgency_rank, due_us, created_us, id) > (?, ?, ?, ?)")
            params.extend(decode_cursor(query.cursor))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        limit = max(1, query.limit)
        rows = await self._db.fetch(
            f"SELECT urgency_rank, due_us, created_us, id, data FROM conversations {where}"
            " ORDER BY urgency_rank, due_us, created_us, id LIMIT ?",
            [*params, limit + 1],
        )
        page = rows[:limit]
        return Page(
            conversations=[load_conversation(row[4]) for row in page],
            next_cursor=encode_cursor(page[-1][:4]) if len(rows) > limit else None,
        )

    async def conversation_messages(self, conversation_id: str) -> list[Message]:
        rows = await self._db.fetch(
            "SELECT seq, data FROM messages WHERE conversation_id = ? ORDER BY received_us, seq",
            (conversation_id,),
        )
        return [load_message(seq, data) for seq, data in rows]

    async def open_counts(self, agents: list[str]) -> dict[str, int]:
        counts = dict.fromkeys(agents, 0)
        if agents:
            marks = ", ".join("?" * len(agents))
            rows = await self._db.fetch(
                "SELECT assignee, COUNT(*) FROM conversations WHERE status IN ('open', 'pending')"
                f" AND assignee IN ({marks}) GROUP BY assignee",
                agents,
            )
            counts.update(dict(rows))
        return counts

    async def next_counter(self, name: str) -> int:
        return await self._db.write(lambda db: increment(db, name))

    # -- agents ------------------------------------------------------------

    async def add_agent(self, agent: Agent) -> None:
        await self._db.write(lambda db: _add_agent(db, agent))

    async def get_agent(self, name: str) -> Agent | None:
        row = await self._db.fetch_one("SELECT token_hash, data FROM agents WHERE name = ?", (name,))
        return load_agent(*row) if row else None

    async def agent_by_token(self, token_hash: str) -> Agent | None:
        if not token_hash:
            return None
        row = await self._db.fetch_one(
            "SELECT token_hash, data FROM agents WHERE token_hash = ?", (token_hash,)
        )
        return load_agent(*row) if row else None

    async def list_agents(self) -> list[Agent]:
        rows = await self._db.fetch("SELECT token_hash, data FROM agents ORDER BY name")
        return [load_agent(*row) for row in rows]

    async def remove_agent(self, name: str) -> bool:
        return await self._db.write(
            lambda db: db.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount > 0
        )

    async def set_agent_token(self, name: str, token_hash: str) -> None:
        await self._db.write(lambda db: _set_agent_token(db, name, token_hash))

    async def set_presence(self, name: str, presence: Presence) -> None:
        await self._db.write(lambda db: _set_presence(db, name, presence))

    # -- events --------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """In this process only: events of the CLI do not reach a running daemon."""
        self._events.publish(event)

    def subscribe(self) -> AsyncGenerator[Event, None]:
        return self._events.subscribe()


# -- transactions, run on the writer's thread (reads on the reader's) ------------


def _find_message(db: sqlite3.Connection, channel: str, external_id: str) -> Message | None:
    for direction in ("in", "out"):
        row = fetch_one(
            db,
            "SELECT seq, data FROM messages WHERE channel = ? AND external_id = ? AND direction = ?"
            " ORDER BY seq LIMIT 1",
            (channel, external_id, direction),
        )
        if row:
            return load_message(*row)
    return None


def _update_message(db: sqlite3.Connection, message: Message) -> None:
    row = fetch_one(
        db,
        "UPDATE messages SET conversation_id = ?, recipient_id = ?, data = ? WHERE id = ? RETURNING seq",
        (message.conversation_id, recipient_id(message), dumps(message.to_dict()), message.id),
    )
    if row is None:
        raise NotFound(f"no message {message.id!r}")
    db.execute("UPDATE inbound_queue SET priority = ? WHERE seq = ?", (priority(message.urgency), row[0]))


def _thread_message(db: sqlite3.Connection, message: Message, new: Conversation) -> Threaded:
    row = fetch_one(db, "SELECT seq, conversation_id FROM messages WHERE id = ?", (message.id,))
    if row is None:
        raise NotFound(f"no message {message.id!r}")
    seq, attached = row
    if attached is not None:
        return Threaded(conversation_in(db, attached)[0], created=False)
    row = fetch_one(
        db,
        f"{SELECT_CONVERSATION} WHERE channel = ? AND thread_key = ? ORDER BY seq DESC LIMIT 1",
        (new.channel, new.thread_key),
    )
    latest = load_conversation(row[-1]) if row else None
    if row is not None and latest is not None and latest.status is not Status.CLOSED:
        threaded = Threaded(latest, created=False)
        latest.absorb(message)
        save_conversation(db, latest, row[:-1])
    else:
        number = increment(db, REF_COUNTER)
        previous = latest.ref if latest else None
        threaded = Threaded(new.copy(ref=f"T-{number:06d}"), created=True, previous_ref=previous)
        threaded.conversation.absorb(message)
        db.execute(INSERT_CONVERSATION, conversation_row(threaded.conversation))
    conversation = threaded.conversation
    # The message as stored, attached in place by SQLite: re-encoding it here
    # would cost the writer's thread, which every write queues for.
    db.execute(
        "UPDATE messages SET conversation_id = ?1, data = json_set(data, '$.conversation_id', ?1)"
        " WHERE seq = ?2",
        (conversation.id, seq),
    )
    return threaded


def _thread_messages(
    db: sqlite3.Connection, items: list[tuple[Message, Conversation]]
) -> list[Threaded | Exception]:
    """Each pair in its own savepoint, so a failed one is undone alone."""
    outcomes: list[Threaded | Exception] = []
    for message, new in items:
        db.execute("SAVEPOINT thread")
        try:
            outcomes.append(_thread_message(db, message, new))
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                raise  # the transaction failed (I/O, locks): every pair fails with it
            db.execute("ROLLBACK TO thread")
            outcomes.append(exc)
        db.execute("RELEASE thread")
    return outcomes


def _update_conversation(
    db: sqlite3.Connection, conversation_id: str, changes: dict[str, Any]
) -> Conversation:
    current, stored = conversation_in(db, conversation_id)
    # Through the JSON shape, so "closed" and Status.CLOSED end up alike.
    updated = Conversation.from_dict(current.copy(**changes).to_dict())
    save_conversation(db, updated, stored)
    return updated


def _claim_conversation(
    db: sqlite3.Connection, conversation_id: str, agent: str | None, expected: str | None, available: bool
) -> Conversation | None:
    current, stored = conversation_in(db, conversation_id)
    if current.assignee != expected:
        return None
    if available:
        row = fetch_one(db, "SELECT token_hash, data FROM agents WHERE name = ?", (agent,))
        if row is None or load_agent(*row).presence is not Presence.AVAILABLE:
            return None
    claimed = current.copy(assignee=agent)
    save_conversation(db, claimed, stored)
    return claimed


def _add_agent(db: sqlite3.Connection, agent: Agent) -> None:
    cursor = db.execute(
        "INSERT INTO agents (name, token_hash, data) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
        (agent.name, agent.token_hash, dumps(agent.to_dict())),
    )
    if cursor.rowcount == 0:
        raise Conflict(f"an agent named {agent.name!r} exists already")


def _set_agent_token(db: sqlite3.Connection, name: str, token_hash: str) -> None:
    cursor = db.execute("UPDATE agents SET token_hash = ? WHERE name = ?", (token_hash, name))
    if cursor.rowcount == 0:
        raise NotFound(f"no agent {name!r}")


def _set_presence(db: sqlite3.Connection, name: str, presence: Presence) -> None:
    row = fetch_one(db, "SELECT token_hash, data FROM agents WHERE name = ?", (name,))
    if row is None:
        raise NotFound(f"no agent {name!r}")
    agent = load_agent(*row)
    agent.presence = presence
    db.execute("UPDATE agents SET data = ? WHERE name = ?", (dumps(agent.to_dict()), name))
