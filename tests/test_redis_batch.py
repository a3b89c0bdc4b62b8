"""The Redis store's one-step calls cost one round trip, survive a flushed
script cache, and keep the per-sender ack cap across processes.

Round trips are counted where redis-py writes a request to a socket: a
pipeline is one write, whatever it holds. The contract itself (outcomes,
order, idempotence) is in test_store_contract; this file checks what only
the Redis side promises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection

import router.store.redis as redis_store
from router.errors import NotFound, StoreError
from router.model import Conversation, Kind, Message, Threaded, new_id
from router.store.redis import RedisStore
from tests.test_store_contract import fresh_conversation, inbound, outbound

BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """[requests written to Redis so far]: each is one round trip."""
    sent = [0]
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    yield sent


def customer(thread: str, at: datetime = BASE) -> Message:
    return inbound(new_id("x"), thread=thread, at=at)


def ack(conversation: Conversation, at: datetime = BASE) -> Message:
    return outbound(conversation, kind=Kind.ACK, at=at)


async def enqueued(store: RedisStore, *threads: str) -> list[tuple[Message, Conversation]]:
    messages = [customer(thread, BASE + timedelta(seconds=i)) for i, thread in enumerate(threads)]
    for message in messages:
        await store.enqueue_inbound(message)
    return [(message, fresh_conversation(message)) for message in messages]


def created(outcomes: list[Threaded | Exception]) -> list[bool]:
    assert all(isinstance(outcome, Threaded) for outcome in outcomes), outcomes
    return [outcome.created for outcome in outcomes if isinstance(outcome, Threaded)]


async def test_threading_a_batch_is_one_round_trip(
    redis_pair: tuple[RedisStore, RedisStore], round_trips: list[int]
) -> None:
    store, _ = redis_pair
    await store.thread_messages(await enqueued(store, "u-0"))  # Redis has the script now
    items = await enqueued(store, "u-1", "u-2", "u-1", "u-3", "u-2")
    before = round_trips[0]
    outcomes = await store.thread_messages(items)
    assert round_trips[0] - before == 1
    assert created(outcomes) == [True, True, False, True, False]


async def test_a_flushed_script_cache_costs_one_load_and_one_resend(
    redis_pair: tuple[RedisStore, RedisStore], round_trips: list[int]
) -> None:
    """As after a Redis restart: the calls answered NOSCRIPT did not run, so
    resending them gives the answers a first run would have given."""
    store, _ = redis_pair
    items = await enqueued(store, "u-1", "u-1", "u-2")
    await store._conn.redis.script_flush()
    before = round_trips[0]
    outcomes = await store.thread_messages(items)
    assert round_trips[0] - before == 3  # the batch, SCRIPT LOAD, the batch again
    assert created(outcomes) == [True, False, True]
    assert created(await store.thread_messages(await enqueued(store, "u-2"))) == [False]


async def test_a_script_error_fails_its_own_pair_only(
    redis_pair: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = redis_pair
    items = await enqueued(store, "u-1", "u-2", "u-1")
    broken_id = items[1][0].id
    original = redis_store.thread_args

    def breaking(message: Message, new: Conversation) -> list[Any]:
        args = original(message, new)
        return [*args[:-1], "not json"] if message.id == broken_id else args

    monkeypatch.setattr(redis_store, "thread_args", breaking)
    first, broken, joined = await store.thread_messages(items)
    assert isinstance(broken, StoreError)
    assert isinstance(first, Threaded) and isinstance(joined, Threaded)
    assert joined.conversation.id == first.conversation.id and joined.conversation.message_count == 2
    monkeypatch.setattr(redis_store, "thread_args", original)
    [retried] = await store.thread_messages([items[1]])
    assert isinstance(retried, Threaded) and retried.created


async def test_thread_message_raises_what_the_batch_would_hold(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    store, _ = redis_pair
    stray = customer("u-9")
    with pytest.raises(NotFound):
        await store.thread_message(stray, fresh_conversation(stray))


async def test_enqueue_ack_is_one_round_trip_and_survives_a_flushed_cache(
    redis_pair: tuple[RedisStore, RedisStore], round_trips: list[int]
) -> None:
    store, _ = redis_pair
    [(message, new)] = await enqueued(store, "u-1")
    conversation = (await store.thread_message(message, new)).conversation
    since = BASE - timedelta(hours=1)
    assert await store.enqueue_ack(ack(conversation), since, 3) is not None  # Redis has the script now
    before = round_trips[0]
    assert await store.enqueue_ack(ack(conversation), since, 3) is not None
    assert round_trips[0] - before == 1
    await store._conn.redis.script_flush()
    assert await store.enqueue_ack(ack(conversation), since, 3) is not None
    assert await store.enqueue_ack(ack(conversation), since, 3) is None


async def test_daemons_racing_never_let_a_customer_past_the_cap(
    redis_pair: tuple[RedisStore, RedisStore],
) -> None:
    one, two = redis_pair
    [(message, new)] = await enqueued(one, "u-1")
    conversation = (await one.thread_message(message, new)).conversation
    since = BASE - timedelta(hours=1)
    acks = [ack(conversation, BASE + timedelta(seconds=i)) for i in range(20)]
    stored = await asyncio.gather(
        *(store.enqueue_ack(a, since, 3) for store, a in zip([one, two] * 10, acks, strict=True))
    )
    kept = [a for a in stored if a is not None]
    assert len(kept) == 3
    queued = await two.outbound_after("web", 0, 100)
    assert sorted(m.id for m in queued) == sorted(a.id for a in kept)
    again = await one.enqueue_ack(kept[0], since, 3)
    assert again is not None and again.seq == kept[0].seq
