"""The Redis store's shortcuts keep their promises across processes.

Each RedisStore below stands for one daemon: its own connection pool and its
own subscription, on one redis-server. The agent roster is cached until an
`agents` notice arrives; events travel as one PUBLISH per batch; a joined
conversation keeps its inbox entry unless the message raises its urgency.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from router.conversations import start
from router.model import (
    Agent,
    Event,
    InboxQuery,
    Party,
    Presence,
    Status,
    Urgency,
)
from router.settings import SLAConfig
from router.store.redis import RedisStore
from tests.conftest import customer_message

BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)


async def available(store: RedisStore) -> list[str]:
    return [a.name for a in await store.list_agents() if a.presence is Presence.AVAILABLE]


async def test_a_roster_change_in_one_process_reaches_the_others_cache(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    one, two = redis_pair
    await one.add_agent(Agent(name="ann", teams=["support"], token_hash="h-ann"))
    assert await available(one) == ["ann"]
    await eventually(lambda: _equals(available(two), ["ann"]))
    assert await available(two) == ["ann"]  # cached now

    await one.set_presence("ann", Presence.AWAY)
    assert await available(one) == []  # our own change: at once
    await eventually(lambda: _equals(available(two), []))

    await two.add_agent(Agent(name="bob", teams=["support"], token_hash="h-bob"))
    await two.set_agent_token("bob", "h-bob-2")
    await eventually(lambda: _equals(_tokens(one), {"ann": "h-ann", "bob": "h-bob-2"}))
    assert await two.remove_agent("ann")
    await eventually(lambda: _equals(_tokens(one), {"bob": "h-bob-2"}))


async def test_no_roster_is_cached_while_the_notices_cannot_arrive(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    one, two = redis_pair
    await one.add_agent(Agent(name="ann", teams=["support"], token_hash="h"))
    await eventually(lambda: _equals(available(two), ["ann"]))
    two._conn._lost()  # as when its subscription drops
    assert await available(two) == ["ann"]
    await _set_presence_without_notice(one, "ann", Presence.AWAY)
    assert await available(two) == []


async def test_a_change_that_sends_no_notice_is_seen_within_the_maximum_age(
    redis_pair: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older daemon, or an edit in redis-cli, changes the roster silently."""
    monkeypatch.setattr("router.store.redis.ROSTER_MAX_AGE_S", 0.2)
    one, _ = redis_pair
    await one.add_agent(Agent(name="ann", teams=["support"], token_hash="h"))
    assert await available(one) == ["ann"]
    await _set_presence_without_notice(one, "ann", Presence.AWAY)
    await eventually(lambda: _equals(available(one), []), within_s=1.0)


async def test_events_arrive_everywhere_in_the_order_published(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    one, two = redis_pair
    here, there = one.subscribe(), two.subscribe()
    for n in range(900):  # ~300 KiB: more than one PUBLISH, fewer than a subscriber keeps
        await one.publish(Event("message.created", {"n": n, "text": "x" * (n % 700)}))
    for subscription in (here, there):
        got = [(await asyncio.wait_for(anext(subscription), 2)).data["n"] for _ in range(900)]
        assert got == list(range(900))
    await here.aclose()
    await there.aclose()


async def test_an_event_from_an_older_daemon_one_object_per_publish_is_understood(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    one, _ = redis_pair
    events = one.subscribe()
    payload = json.dumps({"type": "conversation.updated", "data": {"ref": "T-000001"}})
    await one._conn.redis.publish(one._conn.keys.events, payload)
    assert await asyncio.wait_for(anext(events), 2) == Event("conversation.updated", {"ref": "T-000001"})
    await events.aclose()


async def test_joining_moves_the_inbox_entry_only_when_urgency_rises(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    store, _ = redis_pair
    first = await _threaded(store, Urgency.LOW, BASE)
    await _threaded(store, Urgency.LOW, BASE + timedelta(minutes=1))
    await _threaded(store, Urgency.CRITICAL, BASE + timedelta(minutes=2))
    later = await _threaded(store, Urgency.NORMAL, BASE + timedelta(minutes=3))
    assert later.id == first.id and later.message_count == 4 and later.urgency is Urgency.CRITICAL
    page = await store.list_conversations(InboxQuery(status=Status.OPEN, limit=10))
    assert [c.id for c in page.conversations] == [first.id]
    assert page.conversations[0].urgency is Urgency.CRITICAL
    keys = await store._conn.redis.keys(f"{store._keys.prefix}:ix:*")
    for key in keys:
        assert await store._conn.redis.zcard(key) == 1, key


async def _threaded(store: RedisStore, urgency: Urgency, at: datetime):
    # Quotes, a backslash and a slash: text the store's scripts must carry through untouched.
    message = customer_message(f'{urgency.value} "quoted" \\ text', "cust-1", at=at, urgency=urgency)
    message.sender = Party(id="cust-1", name="Ann / Ü")
    await store.enqueue_inbound(message)
    threaded = await store.thread_message(message, start(message, "cust-1", "support", at, SLAConfig()))
    return threaded.conversation


async def _set_presence_without_notice(store: RedisStore, name: str, presence: Presence) -> None:
    await store._conn.redis.hset(store._keys.presence, name, presence.value)


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _tokens(store: RedisStore) -> dict[str, str]:
    return {a.name: a.token_hash for a in await store.list_agents()}
