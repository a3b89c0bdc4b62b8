"""Between model objects and the Redis store's hashes, script arguments and cursors.

Records are the JSON of their `to_dict()`, like in the SQLite store, so a
stored record and an API object never drift apart. What scripts change by
themselves (a message's conversation and delivery, a conversation's fields)
is kept beside that JSON and wins when a record is loaded.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from router.model import (
    Agent,
    Category,
    Conversation,
    DeadLetter,
    Delivery,
    Message,
    Presence,
    Role,
    Status,
    Urgency,
    format_time,
    parse_time,
)
from router.store.redis_keys import SEP

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
NO_DUE_US = 2**62
"""Sort key of a conversation without a first-response deadline: after all others."""

_MEMBER = re.compile(r"^[0-3]:[0-9a-f]{16}:[0-9a-f]{16}:[^:]+$")
Hash = dict[str, str]


dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""Compact JSON, as `json.dumps(data, ensure_ascii=False, separators=...)`
writes it, from one encoder: `json.dumps` with options builds a new encoder
each call, which cost more than encoding a short value (a new conversation's
fields took 35 µs instead of 13)."""


def micros(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def hex16(value: int) -> str:
    """Fixed width, so members of the lexicographic inbox sets sort as numbers."""
    return f"{max(0, value):016x}"


def pairs(values: list[str]) -> Hash:
    """HGETALL inside a script answers a flat list: field, value, ..."""
    return dict(zip(values[::2], values[1::2], strict=True))


def rank(urgency: Urgency | None) -> str:
    """Queue stream of a message: critical first; untriaged waits with the low ones."""
    return str((urgency or Urgency.LOW).rank)


def thread_field(channel: str, thread_key: str) -> str:
    return f"{channel}{SEP}{thread_key}"


def load_message(fields: Hash) -> Message:
    data = json.loads(fields["d"])
    data["seq"] = int(fields["s"])
    if fields.get("c"):
        data["conversation_id"] = fields["c"]
    if fields.get("dl"):
        data["delivery"] = json.loads(fields["dl"])
    return Message.from_dict(data)


def delivery_json(delivery: Delivery) -> str:
    return dumps(
        {
            "status": delivery.status.value,
            "attempts": delivery.attempts,
            "error": delivery.error,
            "next_attempt_at": format_time(delivery.next_attempt_at),
        }
    )


def due_seconds(delivery: Delivery) -> str:
    """Outbox score: 0 (before any clock a caller passes) when due at once."""
    return repr(delivery.next_attempt_at.timestamp()) if delivery.next_attempt_at else "0"


# -- conversations ---------------------------------------------------------

INDEXED = {
    "status": "_s",
    "team": "_t",
    "assignee": "_a",
    "urgency": "_r",
    "first_response_due": "_due",
}
"""Fields with a raw copy that the inbox sets are built from."""


def _raw(name: str, value: Any) -> str:
    if name == "urgency":
        return str(Urgency(value).rank)
    if name == "first_response_due":
        return hex16(NO_DUE_US if value is None else micros(value))
    if name == "status":
        return Status(value).value
    return value or ""


def conversation_fields(conversation: Conversation) -> Hash:
    fields = {name: dumps(value) for name, value in conversation.to_dict().items()}
    for name, raw in INDEXED.items():
        fields[raw] = _raw(name, getattr(conversation, name))
    fields["_cr"] = hex16(micros(conversation.created_at))
    fields["_last"] = str(micros(conversation.last_message_at))
    return fields


def new_conversation_arg(conversation: Conversation) -> str:
    """A new conversation's hash as one script argument, a JSON array of
    field, value, ...: one argument costs the client far less to send than
    fifty, and the script decodes it only when it creates the conversation."""
    return dumps([item for pair in conversation_fields(conversation).items() for item in pair])


def changed_fields(changes: dict[str, Any]) -> list[str]:
    """HSET arguments for `update_conversation`, values normalized through
    the model (so "closed" and Status.CLOSED are stored alike)."""
    kinds = {"status": Status, "urgency": Urgency, "category": Category}
    out: list[str] = []
    for name, value in changes.items():
        if name in kinds:
            value = kinds[name](value)
        out += [name, dumps(format_time(value) if isinstance(value, datetime) else value)]
        if name in INDEXED:
            out += [INDEXED[name], _raw(name, value)]
    return out


def load_conversation(fields: Hash) -> Conversation:
    return Conversation.from_dict({k: json.loads(v) for k, v in fields.items() if not k.startswith("_")})


def load_conversation_json(data: str) -> Conversation:
    """What the scripts answer (redis_lua_records.conversation_json)."""
    return Conversation.from_dict(json.loads(data))


def encode_cursor(member: str) -> str:
    """The inbox member of the last conversation served, opaque to clients."""
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """Raises ValueError for anything `encode_cursor` did not produce."""
    try:
        member = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not an inbox cursor: {cursor!r}") from exc
    if not _MEMBER.match(member):
        raise ValueError(f"not an inbox cursor: {cursor!r}")
    return member


def member_id(member: str) -> str:
    return member.rsplit(":", 1)[1]


# -- agents and dead letters -----------------------------------------------


def agent_json(agent: Agent) -> str:
    """Name, teams, role and creation; token and presence change on their own."""
    data = agent.to_dict()
    data.pop("presence")
    return dumps(data)


def load_agent(data: str, token_hash: str, presence: str | None) -> Agent:
    fields = json.loads(data)
    return Agent(
        name=fields["name"],
        teams=fields["teams"],
        role=Role(fields["role"]),
        presence=Presence(presence or Presence.AVAILABLE),
        token_hash=token_hash,
        created_at=parse_time(fields["created_at"]) or _EPOCH,
    )


def load_dead_letter(data: str) -> tuple[int, DeadLetter]:
    """(order of arrival, the dead letter)."""
    fields = json.loads(data)
    dead = DeadLetter(
        fields["id"],
        fields["channel"],
        fields["payload"],
        fields["error"],
        int(fields["attempts"]),
        parse_time(fields["created_at"]) or _EPOCH,
        fields.get("message_id"),
    )
    return int(fields["seq"]), dead
