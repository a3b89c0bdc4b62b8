"""The SQLite store's tables and the codecs between rows and model objects.

Every record is kept whole as the JSON of its `to_dict()`, so the database
and the API never disagree on a shape; the few fields a query filters or
sorts on are copied into indexed columns next to it. Times that are sorted
or compared are integer microseconds since the epoch, because ISO strings
without fractional seconds sort after ones with them.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from router.errors import ConfigError
from router.model import Agent, Conversation, DeadLetter, Message, Presence, Role, Urgency, parse_time

SCHEMA_VERSION = 1
REF_COUNTER = "conversation_ref"
"""The counter behind `T-000123` refs; it shares the table with `next_counter`."""

NO_DUE_US = 2**62
"""Sort key of a conversation without a first-response deadline: after all others."""

# Messages and conversations carry an AUTOINCREMENT `seq`: never reused, so
# it is both the queue order and the pull-mode cursor. Inbound messages are
# unique per (channel, external_id); outbound ones need not be.
SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS conversations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    ref TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    thread_key TEXT NOT NULL,
    status TEXT NOT NULL,
    team TEXT,
    assignee TEXT,
    urgency_rank INTEGER NOT NULL,
    due_us INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_thread ON conversations (channel, thread_key, seq);
CREATE INDEX IF NOT EXISTS conversations_inbox
    ON conversations (status, urgency_rank, due_us, created_us, id);
CREATE INDEX IF NOT EXISTS conversations_order ON conversations (urgency_rank, due_us, created_us, id);
CREATE INDEX IF NOT EXISTS conversations_assignee ON conversations (assignee, status)
    WHERE assignee IS NOT NULL;

CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    external_id TEXT NOT NULL,
    direction TEXT NOT NULL,
    kind TEXT NOT NULL,
    conversation_id TEXT REFERENCES conversations (id),
    received_us INTEGER NOT NULL,
    recipient_id TEXT,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_inbound_key ON messages (channel, external_id)
    WHERE direction = 'in';
CREATE INDEX IF NOT EXISTS messages_outbound_key ON messages (channel, external_id)
    WHERE direction = 'out';
CREATE INDEX IF NOT EXISTS messages_outbound_order ON messages (channel, seq) WHERE direction = 'out';
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id, received_us)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_acks ON messages (channel, recipient_id, received_us)
    WHERE kind = 'ack';

CREATE TABLE IF NOT EXISTS inbound_queue (
    seq INTEGER PRIMARY KEY REFERENCES messages (seq),
    priority INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL DEFAULT 0,
    consumer TEXT
);
CREATE INDEX IF NOT EXISTS inbound_queue_order ON inbound_queue (priority, seq, visible_at, consumer);

CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY REFERENCES messages (seq),
    channel TEXT NOT NULL,
    due_at REAL NOT NULL,
    consumer TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (channel, due_at);

CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    payload TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    message_id TEXT
);

CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    data TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS agents_token ON agents (token_hash) WHERE token_hash != '';

PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

INSERT_MESSAGE = (
    "INSERT INTO messages (id, channel, external_id, direction, kind, conversation_id,"
    " received_us, recipient_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_CONVERSATION = (
    "INSERT INTO conversations (id, ref, channel, thread_key, status, team, assignee, urgency_rank,"
    " due_us, created_us, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
CHANGING_COLUMNS = ("status", "team", "assignee", "urgency_rank", "due_us")
"""The indexed copies of a conversation's fields that can change after it is created."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def database_path(url: str) -> Path:
    """`sqlite:///var/router.db` is relative to the working directory,
    `sqlite:////srv/router.db` absolute, as in SQLAlchemy URLs."""
    rest = url.removeprefix("sqlite://")
    if not rest.startswith("/") or len(rest) < 2:
        raise ConfigError([f"store.url: {url!r} names no file (sqlite:///relative.db or sqlite:////abs.db)"])
    return Path(rest[1:]).absolute()


def micros(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def priority(urgency: Urgency | None) -> int:
    """Queue priority: critical first; a message without a verdict waits with the low ones."""
    return (urgency or Urgency.LOW).rank


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON, through one shared encoder rather than the new one per
    call that `json.dumps` makes when given options (measured 11 vs 18 µs a
    message record)."""
    return _ENCODER.encode(data)


def recipient_id(message: Message) -> str | None:
    """Indexed for the per-sender ack cap."""
    return message.recipient.id if message.recipient else None


def message_row(message: Message) -> tuple[Any, ...]:
    """Parameters of INSERT_MESSAGE."""
    return (
        message.id,
        message.channel,
        message.external_id,
        message.direction.value,
        message.kind.value,
        message.conversation_id,
        micros(message.received_at),
        recipient_id(message),
        dumps(message.to_dict()),
    )


def load_message(seq: int, data: str) -> Message:
    """The column is the truth for `seq`: the JSON was written before it existed."""
    message = Message.from_dict(json.loads(data))
    message.seq = seq
    return message


def conversation_row(conversation: Conversation) -> tuple[Any, ...]:
    """Parameters of INSERT_CONVERSATION."""
    return (
        conversation.id,
        conversation.ref,
        conversation.channel,
        conversation.thread_key,
        *changing_columns(conversation),
        micros(conversation.created_at),
        dumps(conversation.to_dict()),
    )


def changing_columns(conversation: Conversation) -> tuple[Any, ...]:
    """The values of CHANGING_COLUMNS, in that order."""
    due = conversation.first_response_due
    return (
        conversation.status.value,
        conversation.team,
        conversation.assignee,
        conversation.urgency.rank,
        NO_DUE_US if due is None else micros(due),
    )


def load_conversation(data: str) -> Conversation:
    return Conversation.from_dict(json.loads(data))


def load_agent(token_hash: str, data: str) -> Agent:
    fields = json.loads(data)
    return Agent(
        name=fields["name"],
        teams=fields["teams"],
        role=Role(fields["role"]),
        presence=Presence(fields["presence"]),
        token_hash=token_hash,
        created_at=parse_time(fields["created_at"]) or _EPOCH,
    )


def load_dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    """From `SELECT id, channel, payload, error, attempts, created_at, message_id`."""
    dead_id, channel, payload, error, attempts, created_at, message_id = row
    return DeadLetter(
        dead_id, channel, payload, error, attempts, parse_time(created_at) or _EPOCH, message_id
    )


def encode_cursor(key: tuple[Any, ...]) -> str:
    """The inbox sort key of the last row served, opaque to clients."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int, int, str]:
    """Raises ValueError for anything `encode_cursor` did not produce."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError as exc:
        raise ValueError(f"not an inbox cursor: {cursor!r}") from exc
    types = (int, int, int, str)
    if not (isinstance(key, list) and len(key) == 4 and all(map(isinstance, key, types))):
        raise ValueError(f"not an inbox cursor: {cursor!r}")
    return key[0], key[1], key[2], key[3]
