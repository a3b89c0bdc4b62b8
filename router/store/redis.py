"""The Redis store: several daemons on several machines share one Redis.

`redis://[:password@]host:6379/0?prefix=support-router` (or `rediss://`).
The connection and pub/sub live in `redis_conn`, the queues in
`redis_queue`, the key names in `redis_keys`, the records' Lua in
`redis_lua_records`; this module keeps the records: messages,
conversations, the inbox, agents, events and leases. Every step that reads
and then writes runs as one Lua script, so it is atomic across every
process without locks or retries.

Redis must keep its data across restarts: run it with `appendonly yes`
(every acknowledged write is in the append-only file before the reply
leaves Redis, so killing or restarting Redis loses none of them; with
`appendfsync everysec` a power cut of the Redis host may lose the last
second).
"""

from __future__ import annotations

import heapq
import time
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
    first_line,
    format_time,
)
from router.store import check_updatable, mask_url
from router.store.redis_checkpoints import RedisCheckpoints
from router.store.redis_codec import (
    agent_json,
    changed_fields,
    decode_cursor,
    dumps,
    encode_cursor,
    load_agent,
    load_conversation,
    load_conversation_json,
    member_id,
    micros,
    new_conversation_arg,
    rank,
    thread_field,
)
from router.store.redis_conn import Connection, translate
from router.store.redis_keys import SEP, Keys, split_url
from router.store.redis_lua_queue import UPDATE_MESSAGE
from router.store.redis_lua_records import (
    ACQUIRE_LEASE,
    ADD_AGENT,
    CLAIM_CONVERSATION,
    GET_AGENT,
    GET_CONVERSATION,
    RELEASE_LEASE,
    REMOVE_AGENT,
    RENEW_LEASE,
    SET_AGENT_TOKEN,
    SET_PRESENCE,
    THREAD,
    UPDATE_CONVERSATION,
)
from router.store.redis_queue import RedisQueues

ROSTER_MAX_AGE_S = 5.0
"""A cached roster is read again after this long even without a notice, so
a writer that sends none (an older version of this store, an edit by hand
in redis-cli) is seen within that time."""


def thread_args(message: Message, new: Conversation) -> list[Any]:
    """THREAD's ARGV after the prefix: the message's fields the script needs
    to join a conversation, and `new` as it is after absorbing the message,
    for when it starts one."""
    fresh = new.copy()
    fresh.absorb(message)
    category = message.category.value if message.category else "general"
    return [
        message.id,
        thread_field(new.channel, new.thread_key),
        new.id,
        rank(message.urgency) if message.urgency else "",
        micros(message.received_at),
        *(dumps(value) for value in (format_time(message.received_at), message.subject)),
        *(dumps(value) for value in (message.urgency, category, message.reason)),
        dumps(first_line(message.text)),
        new_conversation_arg(fresh),
    ]


def threaded(message: Message, reply: Any) -> Threaded | NotFound:
    """THREAD's reply: nil when the message was never enqueued."""
    if reply is None:
        return NotFound(f"no message {message.id!r}")
    created, previous, stored = reply
    previous_ref = previous.strip('"') if previous else None
    return Threaded(load_conversation_json(stored), created=bool(created), previous_ref=previous_ref)


class RedisStore(RedisQueues, RedisCheckpoints):
    def __init__(self, url: str) -> None:
        self.display_url = mask_url(url)
        connect_url, prefix = split_url(url)
        super().__init__(Connection(connect_url, Keys(prefix), self.display_url))
        self._opened = False
        self._update_message = self._conn.script(UPDATE_MESSAGE)
        self._thread = self._conn.script(THREAD)
        self._get_conversation = self._conn.script(GET_CONVERSATION)
        self._update_conversation = self._conn.script(UPDATE_CONVERSATION)
        self._claim_conversation = self._conn.script(CLAIM_CONVERSATION)
        self._add_agent = self._conn.script(ADD_AGENT)
        self._set_agent_token = self._conn.script(SET_AGENT_TOKEN)
        self._remove_agent = self._conn.script(REMOVE_AGENT)
        self._get_agent = self._conn.script(GET_AGENT)
        self._set_presence = self._conn.script(SET_PRESENCE)
        self._acquire = self._conn.script(ACQUIRE_LEASE)
        self._renew = self._conn.script(RENEW_LEASE)
        self._release = self._conn.script(RELEASE_LEASE)
        self._roster: tuple[int, float, list[Agent]] | None = None
        """(Connection.roster_version, monotonic time, agents) of the last read."""

    async def open(self) -> None:
        if self._opened:
            return
        await self._conn.start()
        await self._create_groups()
        self._enqueues.start()
        self._opened = True

    async def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        await self._enqueues.stop()
        await self._conn.stop()

    async def ping(self) -> None:
        await self._conn.ping()

    # -- messages --------------------------------------------------------

    async def get_message(self, message_id: str) -> Message | None:
        found = await self._messages([message_id])
        return found[0] if found else None

    async def find_message(self, channel: str, external_id: str) -> Message | None:
        """An inbound match wins; an outbound one (our own Message-ID that the
        customer answers) is the fallback."""
        field = f"{channel}{SEP}{external_id}"
        with translate(self.display_url):
            pipe = self._conn.pipeline()
            pipe.hget(self._keys.inbound_keys, field)
            pipe.hget(self._keys.outbound_keys, field)
            ids = [found for found in await pipe.execute() if found]
        return await self.get_message(ids[0]) if ids else None

    async def update_message(self, message: Message) -> None:
        data = dumps(message.to_dict())
        found = await self._run(
            self._update_message, message.id, data, rank(message.urgency), message.conversation_id or ""
        )
        if not found:
            raise NotFound(f"no message {message.id!r}")

    # -- conversations ---------------------------------------------------

    async def thread_message(self, message: Message, new: Conversation) -> Threaded:
        """One script call, not a batch of one: redis-py's pipeline costs
        the client a tenth to a third more CPU per call (measured)."""
        outcome = threaded(message, await self._run(self._thread, *thread_args(message, new)))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def thread_messages(self, items: list[tuple[Message, Conversation]]) -> list[Threaded | Exception]:
        """One THREAD script call per pair, all in one pipeline: Redis runs
        them one after the other, so each sees what the ones before it wrote."""
        if not items:
            return []
        replies = await self._run_batch(self._thread, [thread_args(message, new) for message, new in items])
        return [
            reply if isinstance(reply, Exception) else threaded(message, reply)
            for (message, _), reply in zip(items, replies, strict=True)
        ]

    async def get_conversation(self, id_or_ref: str) -> Conversation | None:
        found = await self._run(self._get_conversation, id_or_ref)
        return load_conversation_json(found) if found else None

    async def update_conversation(self, conversation_id: str, **changes: Any) -> Conversation:
        check_updatable(changes)
        if not changes:
            current = await self.get_conversation(conversation_id)
            if current is None or current.id != conversation_id:
                raise NotFound(f"no conversation {conversation_id!r}")
            return current
        found = await self._run(self._update_conversation, conversation_id, *changed_fields(changes))
        if found is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return load_conversation_json(found)

    async def claim_conversation(
        self, conversation_id: str, agent: str | None, expected: str | None, *, available: bool = False
    ) -> Conversation | None:
        reply = await self._run(
            self._claim_conversation,
            conversation_id,
            agent or "",
            expected or "",
            dumps(agent),
            Presence.AVAILABLE.value if available else "",
        )
        if reply is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return load_conversation_json(reply[1]) if reply[0] else None

    async def list_conversations(self, query: InboxQuery) -> Page:
        """Keyset paging over the inbox sets: the cursor is the member of the
        last conversation served, so pages neither repeat nor skip while
        others come and go (one that moves in the order meanwhile can show
        twice or not at all). Every status means merging the three sets."""
        if query.unassigned and query.assignee is not None:
            return Page([], None)
        assignee = "" if query.unassigned else query.assignee
        statuses = [query.status] if query.status is not None else list(Status)
        start = f"({decode_cursor(query.cursor)}" if query.cursor else "-"
        limit = max(1, query.limit)
        with translate(self.display_url):
            pipe = self._conn.pipeline()
            for status in statuses:
                key = self._keys.status_index(Status(status).value, query.team, assignee)
                pipe.zrangebylex(key, start, "+", start=0, num=limit + 1)
            members = list(heapq.merge(*await pipe.execute()))[: limit + 1]
            pipe = self._conn.pipeline()
            for member in members[:limit]:
                pipe.hgetall(self._keys.conversation(member_id(member)))
            found = await pipe.execute()
        return Page(
            conversations=[load_conversation(fields) for fields in found if fields],
            next_cursor=encode_cursor(members[limit - 1]) if len(members) > limit else None,
        )

    async def conversation_messages(self, conversation_id: str) -> list[Message]:
        with translate(self.display_url):
            members = await self._conn.redis.zrange(self._keys.conversation_messages(conversation_id), 0, -1)
        return await self._messages([member.split(":", 1)[1] for member in members])

    async def open_counts(self, agents: list[str]) -> dict[str, int]:
        with translate(self.display_url):
            pipe = self._conn.pipeline()
            for agent in agents:
                for status in (Status.OPEN, Status.PENDING):
                    pipe.zcard(self._keys.status_index(status.value, None, agent))
            sizes = await pipe.execute()
        return {agent: sizes[2 * i] + sizes[2 * i + 1] for i, agent in enumerate(agents)}

    async def next_counter(self, name: str) -> int:
        with translate(self.display_url):
            return int(await self._conn.redis.hincrby(self._keys.counters, name, 1))

    # -- agents ------------------------------------------------------------

    async def add_agent(self, agent: Agent) -> None:
        try:
            added = await self._run(
                self._add_agent, agent.name, agent_json(agent), agent.token_hash, agent.presence.value
            )
        finally:
            self._roster_changed()
        if not added:
            raise Conflict(f"an agent named {agent.name!r} exists already")

    async def get_agent(self, name: str) -> Agent | None:
        found = await self._run(self._get_agent, name, "")
        return load_agent(*found) if found else None

    async def agent_by_token(self, token_hash: str) -> Agent | None:
        if not token_hash:
            return None
        found = await self._run(self._get_agent, "", token_hash)
        return load_agent(*found) if found else None

    async def list_agents(self) -> list[Agent]:
        """From a cache kept until an `agents` notice says the roster changed:
        the pipeline asks for every message it assigns, and presence or
        membership changes are rare. Within this process a change is seen at
        once, in others as soon as the notice arrives (the time a read that
        came just before the change would have been behind anyway); nothing
        is cached while the subscription that brings the notices is down.
        The agents are shared with the cache: read them, do not change them."""
        version, now = self._conn.roster_version, time.monotonic()
        cached = self._roster
        if cached is not None and cached[0] == version and now - cached[1] < ROSTER_MAX_AGE_S:
            return list(cached[2])
        with translate(self.display_url):
            pipe = self._conn.redis.pipeline(transaction=True)
            pipe.hgetall(self._keys.agents)
            pipe.hgetall(self._keys.agent_tokens)
            pipe.hgetall(self._keys.presence)
            agents, tokens, presence = await pipe.execute()
        roster = [load_agent(agents[n], tokens.get(n, ""), presence.get(n)) for n in sorted(agents)]
        if self._conn.listening and self._conn.roster_version == version:
            self._roster = (version, now, roster)
        return list(roster)

    async def remove_agent(self, name: str) -> bool:
        try:
            return bool(await self._run(self._remove_agent, name))
        finally:
            self._roster_changed()

    async def set_agent_token(self, name: str, token_hash: str) -> None:
        try:
            found = await self._run(self._set_agent_token, name, token_hash)
        finally:
            self._roster_changed()
        if not found:
            raise NotFound(f"no agent {name!r}")

    async def set_presence(self, name: str, presence: Presence) -> None:
        try:
            found = await self._run(self._set_presence, name, presence.value)
        finally:
            self._roster_changed()
        if not found:
            raise NotFound(f"no agent {name!r}")

    def _roster_changed(self) -> None:
        """Our own change is seen by our next read without waiting for its
        notice, and a read already on its way is not cached (it may predate
        the change). In `finally`: the script may have run even if its reply
        was lost."""
        self._conn.roster_version += 1

    # -- events --------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Through Redis pub/sub: SSE streams of every daemon on this Redis see it."""
        self._conn.publish(event)

    def subscribe(self) -> AsyncGenerator[Event, None]:
        return self._conn.events.subscribe()

    # -- leases ----------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        token = await self._run(self._acquire, name, holder, max(1, int(ttl_s * 1000)))
        return int(token) if token is not None else None

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(await self._run(self._renew, name, holder, max(1, int(ttl_s * 1000))))

    async def release_lease(self, name: str, holder: str) -> None:
        await self._run(self._release, name, holder)
