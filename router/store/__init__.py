"""The Store: one interface, chosen by URL scheme (`sqlite://`, `redis://`).

Every method is one atomic, idempotent step, so the pipeline can crash
between any two of them and simply run the message again (at least once
processing, SPEC 6 promise 2). The contract is written down once here and
tested once, in tests/test_store_contract.py, against every implementation.

Blocking reads (`claim_inbound`, `claim_outbound`) wait up to `block_s` for
work, the way Redis XREADGROUP BLOCK does, so workers need no sleep loops.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any, Protocol

from router.model import (
    Accepted,
    Agent,
    Conversation,
    DeadLetter,
    Delivery,
    Event,
    InboxQuery,
    Message,
    Page,
    Presence,
    Threaded,
)

SUSPECT_AFTER = 2
"""Hand-outs without a finish after which a message goes alone (`claim_inbound`)."""
UNFINISHED_ERROR = "handling never finished in %d attempts: the process died or stalled on it"
"""The dead letter's error (%-format, Lua's too) for a message whose handling never ended."""


class Store(Protocol):
    display_url: str
    """The store URL with any password masked: safe to log."""

    async def open(self) -> None:
        """Connect and create the schema; idempotent."""

    async def close(self) -> None:
        """Flush pending writes and disconnect; idempotent."""

    async def ping(self) -> None:
        """Raise StoreError when the store cannot serve (backs /readyz)."""

    # -- inbound queue ---------------------------------------------------

    async def enqueue_inbound(self, message: Message) -> Accepted:
        """Store and queue an inbound message once per (channel, external_id).

        Returns only when the message is durable. A repeat returns the first
        message's id and its conversation ref (None while untriaged) with
        `duplicate=True`, and queues nothing."""

    async def claim_inbound(
        self, consumer: str, limit: int, visibility_s: float, block_s: float = 0, max_attempts: int = 5
    ) -> list[Message]:
        """Take up to `limit` queued messages, most urgent first, then oldest.

        Claimed messages are invisible to other consumers for `visibility_s`;
        if not completed by then they are handed out again. The claiming
        consumer gets its unfinished ones back at once, so a worker restarted
        under the same name resumes its work without waiting that long.

        Every hand-out counts as an attempt. A message handed out and
        neither completed nor failed may be what killed its worker (a crash
        `fail_inbound` never saw). After one such death its batch comes back
        whole (a restart resumes at full speed); after SUSPECT_AFTER, each
        of them is handed out alone, never with messages that would die with
        it, and once it has had `max_attempts` it goes to the dead letters
        instead, so the queue flows on."""

    async def complete_inbound(self, message_ids: list[str]) -> None:
        """Remove handled messages from the queue, in one step: a worker
        completes its claimed batch at once. Ids no longer queued are skipped."""

    async def fail_inbound(self, message_id: str, error: str, max_attempts: int) -> bool:
        """Record a failed attempt; at `max_attempts` move the message to the
        dead letters (with its payload and the error) and return True, else
        hand it out again at once. False too for a message not in the queue."""

    async def inbound_backlog(self) -> int:
        """Messages queued or claimed but not completed."""

    # -- dead letters ----------------------------------------------------

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> DeadLetter:
        """Keep raw input a channel could not turn into a Message."""

    async def list_dead_letters(self) -> list[DeadLetter]:
        """Oldest first."""

    async def retry_dead_letter(self, dead_id: str) -> bool:
        """Put a dead-lettered message back on the inbound queue with its
        attempts reset; False when there is no such dead letter or it holds
        raw input rather than a stored message."""

    # -- messages and conversations --------------------------------------

    async def get_message(self, message_id: str) -> Message | None: ...

    async def find_message(self, channel: str, external_id: str) -> Message | None: ...

    async def update_message(self, message: Message) -> None:
        """Persist a message's changed tags (triage ran, text edited); raises NotFound."""

    async def thread_message(self, message: Message, new: Conversation) -> Threaded:
        """Attach an inbound message to its conversation, atomically.

        The conversation is the latest one on (new.channel, new.thread_key).
        If it is open or pending the message joins it (`Conversation.absorb`);
        otherwise `new` absorbs the message and is created with the next ref
        (`T-000001`, ...), and `previous_ref` names the closed one. Idempotent:
        a message already attached returns its conversation with
        `created=False`. Raises NotFound for a message never enqueued."""

    async def thread_messages(self, items: list[tuple[Message, Conversation]]) -> list[Threaded | Exception]:
        """`thread_message` for each (message, new conversation) pair, in order,
        in one step (one round trip, one write): the same outcome as calling it
        for each in turn, so a later message on the same thread key joins the
        conversation an earlier one created. Each pair is atomic on its own; a
        pair that fails (NotFound for a message never enqueued) gets its
        exception in its place and the others go on."""

    async def get_conversation(self, id_or_ref: str) -> Conversation | None: ...

    async def update_conversation(self, conversation_id: str, **changes: Any) -> Conversation:
        """Set plain fields (status, urgency, category, reason, team, acked,
        first_response_due); raises NotFound."""

    async def claim_conversation(
        self, conversation_id: str, agent: str | None, expected: str | None, *, available: bool = False
    ) -> Conversation | None:
        """Compare-and-set the assignee: only when it is still `expected`
        and, with `available`, only while `agent` exists and is available (in
        the same atomic step: an agent set away meanwhile has had their
        conversations handed back already, and must not get one after).
        Returns the updated conversation, or None when either check failed;
        raises NotFound."""

    async def list_conversations(self, query: InboxQuery) -> Page:
        """Conversations in inbox order (Conversation.sort_key), paged by an
        opaque cursor; `status=None` means every status. Raises ValueError
        for a cursor it did not give out."""

    async def conversation_messages(self, conversation_id: str) -> list[Message]:
        """Every message of a conversation, inbound and outbound, oldest first."""

    async def open_counts(self, agents: list[str]) -> dict[str, int]:
        """Open or pending conversations per assignee, for least_open."""

    async def next_counter(self, name: str) -> int:
        """Atomic increment from 1, for round robin pointers."""

    # -- outbox ------------------------------------------------------------

    async def enqueue_outbound(self, message: Message) -> Message:
        """Store an outbound message and queue its delivery; idempotent on
        `message.id`. Counts it in its conversation's `message_count`; an
        agent reply sets `first_response_at` when it is not set yet, and an
        ack sets `acked`, in the same step, so no crash can leave an ack
        queued for a conversation that still asks for one. Returns
        the stored message (with its queue `seq`). Raises NotFound when its
        conversation does not exist."""

    async def claim_outbound(
        self,
        consumer: str,
        channels: list[str],
        now: datetime,
        limit: int,
        visibility_s: float,
        block_s: float = 0,
    ) -> list[Message]:
        """Queued outbound messages of these channels whose next attempt is
        due, oldest first; invisible to other consumers for `visibility_s`.
        Like `claim_inbound`, a consumer gets its own unfinished claims back
        at once, so a restarted sender resumes without waiting them out.
        Rescheduling (`record_delivery` queued) releases the claim. While
        blocked, `now` moves on with the clock, so a retry that falls due
        during the wait is handed out."""

    async def record_delivery(self, message_id: str, delivery: Delivery) -> Message:
        """Store a delivery outcome; a queued one is retried at
        `delivery.next_attempt_at`, sent/failed/dead leave the queue."""

    async def outbound_after(self, channel: str, after: int, limit: int) -> list[Message]:
        """Pull mode: the channel's outbound messages with seq > after, in
        queue order (sent ones included, so a client may re-read)."""

    async def mark_pulled(self, channel: str, upto: int) -> None:
        """Pull mode: the client has moved past `upto`; those are sent."""

    async def enqueue_ack(self, ack: Message, since: datetime, cap: int) -> Message | None:
        """`enqueue_outbound` for an ack, unless its recipient (`ack.recipient.id`
        on `ack.channel`) already has `cap` or more acks queued since `since`:
        then None, and nothing is stored. Counting and queuing are one atomic
        step, so daemons sharing a store never let a customer past the cap. An
        ack already stored under the same id is returned as stored, cap or not."""

    # -- agents ------------------------------------------------------------

    async def add_agent(self, agent: Agent) -> None:
        """Raises Conflict when the name is taken."""

    async def get_agent(self, name: str) -> Agent | None: ...

    async def agent_by_token(self, token_hash: str) -> Agent | None: ...

    async def list_agents(self) -> list[Agent]: ...

    async def remove_agent(self, name: str) -> bool: ...

    async def set_agent_token(self, name: str, token_hash: str) -> None:
        """Raises NotFound."""

    async def set_presence(self, name: str, presence: Presence) -> None:
        """Raises NotFound."""

    # -- events --------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Hand an event to every subscriber (of every process sharing the store)."""

    def subscribe(self) -> AsyncGenerator[Event, None]:
        """Events published from now on, until the generator is closed (`aclose()`)."""

    # -- leases --------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Hold the lease `name` for `ttl_s` when it is free, expired or already
        `holder`'s. Returns the fencing token, or None while someone else holds
        it. The token is the same for the holder's renewals and higher for every
        new holder (also after the same holder let it expire), so whatever a
        poller writes can be checked against stale holders; times are the
        store's own clock (Redis' for Redis)."""

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend `holder`'s lease to `ttl_s` from now; False when it is not
        (any more) theirs: it expired, or someone else holds it."""

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once if `holder` holds it; otherwise nothing."""

    # -- checkpoints -----------------------------------------------------------

    async def get_checkpoint(self, key: str) -> str | None:
        """The value last put under `key`, or None: a channel's durable
        memory of how far it has read (IMAP `UIDVALIDITY:last UID`)."""

    async def put_checkpoint(self, key: str, value: str) -> None:
        """Replace the value under `key`; durable when it returns."""


UPDATABLE = frozenset({"status", "urgency", "category", "reason", "team", "acked", "first_response_due"})
"""What `update_conversation` may set: the store keeps counts, refs and the
first response itself, and the assignee changes only by compare-and-set."""


def check_updatable(changes: dict[str, Any]) -> None:
    """Every store refuses the same fields in `update_conversation`."""
    if unknown := set(changes) - UPDATABLE:
        raise ValueError(f"update_conversation cannot set {', '.join(sorted(unknown))}")


def open_store(url: str) -> Store:
    """Pick the implementation by URL scheme: `sqlite:///rel` or `sqlite:////abs`,
    `redis://[:password@]host:port/db?prefix=support-router` (or `rediss://`)."""
    from router.errors import ConfigError

    if url.startswith("sqlite://"):
        from router.store.sqlite import SQLiteStore

        return SQLiteStore(url)
    if url.startswith(("redis://", "rediss://")):
        from router.store.redis import RedisStore

        return RedisStore(url)
    raise ConfigError([f"store.url: unknown scheme in {mask_url(url)!r} (sqlite:// or redis://)"])


def mask_url(url: str) -> str:
    """Hide the password of a store URL (`redis://:***@host`). Split by hand,
    not by urlsplit: a password with an unencoded `/`, `?`, `#` or `@` ends
    urlsplit's netloc early and would be shown. Everything up to the last
    `@` is user info, so an `@` later in the URL hides too much, never too
    little."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (separator and at and colon):
        return url
    return f"{scheme}://{user}:***@{host}"
