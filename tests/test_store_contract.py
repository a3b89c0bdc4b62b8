"""The Store contract, once, for every backend (router/store/__init__.py).

A backend joins by adding its name to BACKENDS and a fixture
`<name>_factory` that returns a StoreFactory: each call builds a new,
unopened store on the same data (the durability tests open a second one),
and the data is fresh for every test. Everything else here is written as a
user of the store would notice behaviour, never by looking inside it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from router.errors import ConfigError, Conflict, NotFound, StoreError
from router.model import (
    Accepted,
    Agent,
    Category,
    Conversation,
    Delivery,
    DeliveryStatus,
    Direction,
    Event,
    InboxQuery,
    Kind,
    Message,
    Party,
    Presence,
    Role,
    Status,
    Threaded,
    Urgency,
    new_id,
)
from router.store import Store
from router.store.redis import RedisStore
from router.store.sqlite import SQLiteStore
from tests.services import RedisServer

StoreFactory = Callable[[], Store]
BACKENDS = ["sqlite", "redis"]
BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_factory(tmp_path: Path) -> StoreFactory:
    return lambda: SQLiteStore(f"sqlite:///{tmp_path}/router.db")


@pytest.fixture
def redis_factory(shared_redis: RedisServer) -> StoreFactory:
    """A key prefix of its own: fresh data on one server for the whole session."""
    url = shared_redis.url(f"contract-{uuid.uuid4().hex[:12]}")
    return lambda: RedisStore(url)


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    factory: StoreFactory = request.getfixturevalue(f"{request.param}_factory")
    return factory


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


def inbound(
    external_id: str,
    *,
    channel: str = "web",
    thread: str = "user-1",
    urgency: Urgency | None = Urgency.LOW,
    category: Category = Category.GENERAL,
    reason: str | None = None,
    at: datetime = BASE,
) -> Message:
    return Message(
        id=new_id("m"),
        channel=channel,
        channel_type="webhook",
        direction=Direction.IN,
        kind=Kind.CUSTOMER,
        external_id=external_id,
        sender=Party(id=thread, name="Ann"),
        text=f"text of {external_id}",
        received_at=at,
        urgency=urgency,
        category=category,
        reason=reason,
        thread_key=thread,
    )


def fresh_conversation(message: Message) -> Conversation:
    """What the pipeline passes as `new`: nothing absorbed yet."""
    return Conversation(
        id=new_id("c"),
        channel=message.channel,
        customer=message.sender,
        thread_key=message.thread_key or message.sender.id,
        created_at=message.received_at,
        last_message_at=message.received_at,
        team="support",
    )


async def ingest(store: Store, external_id: str, **fields: Any) -> Threaded:
    message = inbound(external_id, **fields)
    await store.enqueue_inbound(message)
    return await store.thread_message(message, fresh_conversation(message))


def outbound(
    conversation: Conversation,
    *,
    kind: Kind = Kind.AGENT,
    at: datetime = BASE,
    recipient: str | None = None,
    next_attempt_at: datetime | None = None,
) -> Message:
    message_id = new_id("m")
    return Message(
        id=message_id,
        channel=conversation.channel,
        channel_type="webhook",
        direction=Direction.OUT,
        kind=kind,
        external_id=message_id,
        sender=Party(id="agent"),
        text="reply",
        received_at=at,
        conversation_id=conversation.id,
        recipient=Party(id=recipient or conversation.customer.id),
        delivery=Delivery(next_attempt_at=next_attempt_at),
    )


async def stored_outbound(store: Store, conversation: Conversation, **fields: Any) -> Message:
    return await store.enqueue_outbound(outbound(conversation, **fields))


# -- lifecycle ----------------------------------------------------------------


async def test_open_is_idempotent_and_ping_answers(store: Store) -> None:
    await store.open()
    await store.ping()
    assert "password" not in store.display_url


# -- inbound queue --------------------------------------------------------------


async def test_enqueue_inbound_stores_once_per_channel_and_external_id(store: Store) -> None:
    first = inbound("ext-1")
    assert await store.enqueue_inbound(first) == Accepted(first.id, None, duplicate=False)
    assert await store.enqueue_inbound(inbound("ext-1")) == Accepted(first.id, None, duplicate=True)
    assert await store.inbound_backlog() == 1
    stored = await store.get_message(first.id)
    assert stored is not None and replace(stored, seq=None) == first
    assert await store.find_message("web", "ext-1") == stored
    assert await store.find_message("web", "ext-2") is None
    elsewhere = await store.enqueue_inbound(inbound("ext-1", channel="mail"))
    assert not elsewhere.duplicate
    assert await store.inbound_backlog() == 2


async def test_a_repeat_after_threading_answers_the_conversation_ref(store: Store) -> None:
    threaded = await ingest(store, "ext-1")
    again = await store.enqueue_inbound(inbound("ext-1"))
    assert again.duplicate
    assert again.conversation_ref == threaded.conversation.ref


async def test_ten_thousand_concurrent_copies_store_one_message(store: Store) -> None:
    results = await asyncio.gather(*(store.enqueue_inbound(inbound("same")) for _ in range(10_000)))
    originals = [result for result in results if not result.duplicate]
    assert len(originals) == 1
    assert {result.message_id for result in results} == {originals[0].message_id}
    assert await store.inbound_backlog() == 1
    claimed = await store.claim_inbound("w", 10, 60)
    assert [message.id for message in claimed] == [originals[0].message_id]


async def test_concurrent_distinct_messages_are_all_queued(store: Store) -> None:
    results = await asyncio.gather(*(store.enqueue_inbound(inbound(f"ext-{i}")) for i in range(3000)))
    assert not any(result.duplicate for result in results)
    assert await store.inbound_backlog() == 3000


async def test_a_message_the_store_cannot_encode_fails_alone_not_its_batch(store: Store) -> None:
    """Enqueues are written in batches; text that is no UTF-8 (a lone
    surrogate, as a mis-decoded mail header leaves) must fail only its own."""
    good, bad, other = inbound("a", thread="u-a"), inbound("b", thread="u-b"), inbound("c", thread="u-c")
    bad.text = "half an emoji \ud83d"
    results = await asyncio.gather(
        *(store.enqueue_inbound(m) for m in (good, bad, other)), return_exceptions=True
    )
    assert results[0] == Accepted(good.id, None, duplicate=False)
    assert isinstance(results[1], UnicodeEncodeError)
    assert results[2] == Accepted(other.id, None, duplicate=False)
    assert await store.inbound_backlog() == 2
    assert await store.find_message("web", "b") is None


async def test_claims_most_urgent_first_then_oldest(store: Store) -> None:
    arrivals = [
        ("low-1", Urgency.LOW),
        ("normal-1", Urgency.NORMAL),
        ("low-2", Urgency.LOW),
        ("critical-1", Urgency.CRITICAL),
        ("high-1", Urgency.HIGH),
        ("critical-2", Urgency.CRITICAL),
    ]
    for external_id, urgency in arrivals:
        await store.enqueue_inbound(inbound(external_id, urgency=urgency))
    claimed = await store.claim_inbound("w", 10, 60)
    assert [m.external_id for m in claimed] == [
        "critical-1",
        "critical-2",
        "high-1",
        "normal-1",
        "low-1",
        "low-2",
    ]


async def test_claimed_messages_are_hidden_from_other_consumers(store: Store) -> None:
    for i in range(3):
        await store.enqueue_inbound(inbound(f"ext-{i}"))
    first = await store.claim_inbound("a", 2, 60)
    second = await store.claim_inbound("b", 10, 60)
    assert [m.external_id for m in first] == ["ext-0", "ext-1"]
    assert [m.external_id for m in second] == ["ext-2"]
    assert await store.claim_inbound("c", 10, 60) == []
    assert await store.inbound_backlog() == 3


async def test_an_unfinished_claim_is_handed_out_again_after_visibility(store: Store) -> None:
    message = inbound("ext-1")
    await store.enqueue_inbound(message)
    assert [m.id for m in await store.claim_inbound("a", 1, 0.2)] == [message.id]
    assert await store.claim_inbound("b", 1, 60) == []
    await asyncio.sleep(0.3)
    assert [m.id for m in await store.claim_inbound("b", 1, 60)] == [message.id]


async def test_a_consumer_gets_its_own_unfinished_claims_back_at_once(store: Store) -> None:
    message = inbound("ext-1")
    await store.enqueue_inbound(message)
    assert [m.id for m in await store.claim_inbound("host-0", 10, 60)] == [message.id]
    assert await store.claim_inbound("host-1", 10, 60) == []
    assert [m.id for m in await store.claim_inbound("host-0", 10, 60)] == [message.id]


async def test_complete_removes_a_batch_of_messages_from_the_queue(store: Store) -> None:
    first, second, kept = inbound("ext-1"), inbound("ext-2"), inbound("ext-3")
    for message in (first, second, kept):
        await store.enqueue_inbound(message)
    await store.claim_inbound("a", 3, 0.1)
    await store.complete_inbound([first.id, second.id, "m_unknown"])
    assert await store.inbound_backlog() == 1
    await store.complete_inbound([first.id])
    await store.complete_inbound([])
    await asyncio.sleep(0.2)
    assert [m.id for m in await store.claim_inbound("a", 10, 60)] == [kept.id]
    assert await store.get_message(first.id) is not None


async def test_failures_retry_then_dead_letter_and_the_queue_flows_on(store: Store) -> None:
    poison = inbound("poison", urgency=Urgency.CRITICAL)
    behind = inbound("behind")
    await store.enqueue_inbound(poison)
    await store.enqueue_inbound(behind)
    for attempt in (1, 2):
        assert [m.id for m in await store.claim_inbound("w", 1, 60)] == [poison.id]
        assert await store.fail_inbound(poison.id, f"boom {attempt}", max_attempts=3) is False
    assert [m.id for m in await store.claim_inbound("w", 1, 60)] == [poison.id]
    assert await store.fail_inbound(poison.id, "boom 3", max_attempts=3) is True
    assert await store.inbound_backlog() == 1
    assert [m.id for m in await store.claim_inbound("w", 10, 60)] == [behind.id]
    [dead] = await store.list_dead_letters()
    assert (dead.message_id, dead.channel, dead.error, dead.attempts) == (poison.id, "web", "boom 3", 3)
    assert Message.from_dict(json.loads(dead.payload)).text == poison.text
    assert await store.fail_inbound("m_unknown", "boom", 3) is False


async def test_a_message_whose_worker_keeps_dying_comes_back_alone_then_goes_to_the_dead_letters(
    store: Store,
) -> None:
    """Crashes `fail_inbound` never saw. After one, the batch comes back
    whole; after a second, the worker gets one unfinished message at a time,
    so the others cannot die with it again, and after its attempts that
    message stops taking the desk down."""
    killer = inbound("killer", urgency=Urgency.CRITICAL)
    first, second = inbound("ext-1", thread="user-2"), inbound("ext-2", thread="user-3")
    for message in (killer, first, second):
        await store.enqueue_inbound(message)
    everything = [killer.id, first.id, second.id]
    for _start in (1, 2):
        assert [m.id for m in await store.claim_inbound("w", 10, 60, max_attempts=4)] == everything
    for _restart in (3, 4):
        assert [m.id for m in await store.claim_inbound("w", 10, 60, max_attempts=4)] == [killer.id]
    assert [m.id for m in await store.claim_inbound("w", 10, 60, max_attempts=4)] == [first.id]
    [dead] = await store.list_dead_letters()
    assert (dead.message_id, dead.channel, dead.attempts) == (killer.id, "web", 4)
    assert "never finished in 4 attempts" in dead.error
    assert Message.from_dict(json.loads(dead.payload)).text == killer.text
    await store.complete_inbound([first.id])
    assert [m.id for m in await store.claim_inbound("w", 10, 60, max_attempts=4)] == [second.id]
    await store.complete_inbound([second.id])
    assert await store.inbound_backlog() == 0
    assert await store.retry_dead_letter(dead.id) is True
    assert [m.id for m in await store.claim_inbound("w", 10, 60, max_attempts=4)] == [killer.id]


async def test_expired_claims_go_to_another_worker_whole_then_one_at_a_time(store: Store) -> None:
    """A vanished daemon's claims run out and another worker takes them
    over as a batch; if that one vanishes too, they come one by one, then
    queued messages in batches again."""
    claimed = [inbound(f"ext-{i}", thread=f"user-{i}") for i in range(3)]
    for message in claimed:
        await store.enqueue_inbound(message)
    assert len(await store.claim_inbound("gone", 3, 0.1)) == 3
    await asyncio.sleep(0.3)
    assert [m.id for m in await store.claim_inbound("gone too", 10, 0.1)] == [m.id for m in claimed]
    fresh = [inbound(f"new-{i}", thread=f"user-new-{i}") for i in range(2)]
    for message in fresh:
        await store.enqueue_inbound(message)
    await asyncio.sleep(0.3)
    for message in claimed:
        assert [m.id for m in await store.claim_inbound("b", 10, 60)] == [message.id]
        await store.complete_inbound([message.id])
    assert [m.id for m in await store.claim_inbound("b", 10, 60)] == [m.id for m in fresh]


async def test_a_failed_message_is_not_held_back_as_unfinished(store: Store) -> None:
    failed, other = inbound("ext-1"), inbound("ext-2", thread="user-2")
    await store.enqueue_inbound(failed)
    await store.claim_inbound("w", 1, 60)
    assert await store.fail_inbound(failed.id, "boom", max_attempts=3) is False
    await store.enqueue_inbound(other)
    assert {m.id for m in await store.claim_inbound("w", 10, 60)} == {failed.id, other.id}


async def test_retry_dead_letter_requeues_with_attempts_reset(store: Store) -> None:
    message = inbound("ext-1")
    await store.enqueue_inbound(message)
    await store.claim_inbound("w", 1, 60)
    assert await store.fail_inbound(message.id, "boom", max_attempts=1) is True
    [dead] = await store.list_dead_letters()
    assert await store.retry_dead_letter(dead.id) is True
    assert await store.list_dead_letters() == []
    assert [m.id for m in await store.claim_inbound("w", 1, 60)] == [message.id]
    assert await store.fail_inbound(message.id, "boom", max_attempts=2) is False
    assert await store.retry_dead_letter("dl_unknown") is False


async def test_raw_dead_letters_are_kept_oldest_first_and_not_retried(store: Store) -> None:
    first = await store.add_dead_letter("web", "{not json", "invalid JSON")
    second = await store.add_dead_letter("tg", "\x00", "bad update")
    assert [(d.id, d.channel, d.payload, d.error, d.message_id) for d in await store.list_dead_letters()] == [
        (first.id, "web", "{not json", "invalid JSON", None),
        (second.id, "tg", "\x00", "bad update", None),
    ]
    assert await store.retry_dead_letter(first.id) is False
    assert len(await store.list_dead_letters()) == 2


async def test_a_blocked_claim_wakes_when_a_message_arrives(store: Store) -> None:
    waiting = asyncio.create_task(store.claim_inbound("w", 1, 60, block_s=10))
    await asyncio.sleep(0.05)
    message = inbound("ext-1")
    started = time.monotonic()
    await store.enqueue_inbound(message)
    assert [m.id for m in await asyncio.wait_for(waiting, 5)] == [message.id]
    assert time.monotonic() - started < 1


async def test_a_blocked_claim_gives_up_after_block_s(store: Store) -> None:
    started = time.monotonic()
    assert await store.claim_inbound("w", 1, 60, block_s=0.3) == []
    assert 0.25 <= time.monotonic() - started < 2


async def test_a_blocked_claim_sees_what_another_store_on_the_same_data_wrote(
    store: Store, make_store: StoreFactory
) -> None:
    other = make_store()
    await other.open()
    try:
        waiting = asyncio.create_task(store.claim_inbound("w", 1, 60, block_s=10))
        await asyncio.sleep(0.05)
        message = inbound("from-the-cli")
        await other.enqueue_inbound(message)
        assert [m.id for m in await asyncio.wait_for(waiting, 3)] == [message.id]
    finally:
        await other.close()


# -- messages and conversations ---------------------------------------------------


async def test_update_message_persists_tags(store: Store) -> None:
    message = inbound("ext-1", urgency=None)
    await store.enqueue_inbound(message)
    tagged = replace(message, urgency=Urgency.HIGH, category=Category.TRANSACTION, reason="deposit missing")
    await store.update_message(tagged)
    stored = await store.get_message(message.id)
    assert stored is not None
    assert (stored.urgency, stored.category, stored.reason) == (
        Urgency.HIGH,
        Category.TRANSACTION,
        "deposit missing",
    )
    with pytest.raises(NotFound):
        await store.update_message(inbound("never-stored"))


async def test_threading_starts_a_conversation_then_joins_it(store: Store) -> None:
    first = await ingest(store, "e1", thread="user-1")
    assert first.created and first.previous_ref is None
    assert first.conversation.ref == "T-000001"
    assert first.conversation.message_count == 1
    second = await ingest(store, "e2", thread="user-1", at=BASE + timedelta(minutes=1))
    assert not second.created
    assert second.conversation.id == first.conversation.id
    assert second.conversation.message_count == 2
    assert second.conversation.last_message_at == BASE + timedelta(minutes=1)
    other = await ingest(store, "e3", thread="user-2")
    assert other.created and other.conversation.ref == "T-000002"
    messages = await store.conversation_messages(first.conversation.id)
    assert [m.external_id for m in messages] == ["e1", "e2"]
    assert {m.conversation_id for m in messages} == {first.conversation.id}
    found = await store.find_message("web", "e1")
    assert found is not None and found.conversation_id == first.conversation.id


async def test_a_pending_conversation_is_joined_and_a_closed_one_followed(store: Store) -> None:
    first = await ingest(store, "e1")
    await store.update_conversation(first.conversation.id, status=Status.PENDING)
    joined = await ingest(store, "e2")
    assert not joined.created and joined.conversation.id == first.conversation.id
    assert joined.conversation.status is Status.PENDING
    await store.update_conversation(first.conversation.id, status=Status.CLOSED)
    after = await ingest(store, "e3")
    assert after.created and after.previous_ref == first.conversation.ref
    assert after.conversation.id != first.conversation.id
    assert after.conversation.ref == "T-000002"
    assert after.conversation.message_count == 1
    closed = await store.get_conversation(first.conversation.id)
    assert closed is not None and closed.message_count == 2


async def test_threading_is_idempotent(store: Store) -> None:
    message = inbound("e1")
    await store.enqueue_inbound(message)
    first = await store.thread_message(message, fresh_conversation(message))
    again = await store.thread_message(message, fresh_conversation(message))
    assert not again.created
    assert again.conversation == first.conversation
    assert again.conversation.message_count == 1
    with pytest.raises(NotFound):
        await store.thread_message(inbound("never-stored"), fresh_conversation(message))


async def test_threading_a_batch_is_threading_each_in_turn(store: Store) -> None:
    """A later message on the same key joins what an earlier one created; a
    message never enqueued fails alone."""
    messages = [
        inbound("e1", thread="user-1"),
        inbound("e2", thread="user-2"),
        inbound("e3", thread="user-1", at=BASE + timedelta(minutes=1)),
    ]
    for message in messages:
        await store.enqueue_inbound(message)
    stray = inbound("never-stored", thread="user-3")
    items = [(m, fresh_conversation(m)) for m in [messages[0], messages[1], stray, messages[2]]]
    first, second, failed, joined = await store.thread_messages(items)
    assert isinstance(first, Threaded) and isinstance(second, Threaded) and isinstance(joined, Threaded)
    assert isinstance(failed, NotFound)
    assert (first.created, second.created, joined.created) == (True, True, False)
    assert [first.conversation.ref, second.conversation.ref] == ["T-000001", "T-000002"]
    assert joined.conversation.id == first.conversation.id
    assert joined.conversation.message_count == 2
    history = await store.conversation_messages(first.conversation.id)
    assert [m.external_id for m in history] == ["e1", "e3"]
    again = await store.thread_messages([(messages[0], fresh_conversation(messages[0]))])
    assert isinstance(again[0], Threaded) and not again[0].created
    assert again[0].conversation.message_count == 2
    assert await store.thread_messages([]) == []


async def test_the_most_urgent_message_decides_urgency_category_and_reason(store: Store) -> None:
    steps = [
        (Urgency.LOW, Category.GENERAL, None, Urgency.LOW, None),
        (Urgency.HIGH, Category.TRANSACTION, "withdrawal missing", Urgency.HIGH, "withdrawal missing"),
        (Urgency.NORMAL, Category.ACCOUNT_ACCESS, "password reset", Urgency.HIGH, "withdrawal missing"),
        (Urgency.HIGH, Category.COMPLAINT, "charged twice", Urgency.HIGH, "charged twice"),
        (Urgency.CRITICAL, Category.SECURITY, "unknown login", Urgency.CRITICAL, "unknown login"),
        (Urgency.LOW, Category.GENERAL, "thanks", Urgency.CRITICAL, "unknown login"),
    ]
    for i, (urgency, category, reason, want_urgency, want_reason) in enumerate(steps):
        threaded = await ingest(store, f"e{i}", urgency=urgency, category=category, reason=reason)
        assert (threaded.conversation.urgency, threaded.conversation.reason) == (want_urgency, want_reason)
    stored = await store.get_conversation(threaded.conversation.id)
    assert stored is not None
    assert (stored.urgency, stored.category, stored.message_count) == (Urgency.CRITICAL, Category.SECURITY, 6)


async def test_concurrent_messages_on_one_thread_make_one_conversation(store: Store) -> None:
    messages = [inbound(f"e{i}", thread="busy") for i in range(50)]
    await asyncio.gather(*(store.enqueue_inbound(m) for m in messages))
    results = await asyncio.gather(*(store.thread_message(m, fresh_conversation(m)) for m in messages))
    assert sum(result.created for result in results) == 1
    assert len({result.conversation.id for result in results}) == 1
    stored = await store.get_conversation(results[0].conversation.id)
    assert stored is not None and stored.message_count == 50


async def test_get_conversation_by_id_or_ref(store: Store) -> None:
    threaded = await ingest(store, "e1")
    assert await store.get_conversation(threaded.conversation.id) == threaded.conversation
    assert await store.get_conversation(threaded.conversation.ref) == threaded.conversation
    assert await store.get_conversation("T-999999") is None


async def test_update_conversation_sets_plain_fields(store: Store) -> None:
    threaded = await ingest(store, "e1")
    due = BASE + timedelta(minutes=15, microseconds=250)
    updated = await store.update_conversation(
        threaded.conversation.id,
        status=Status.PENDING,
        urgency=Urgency.CRITICAL,
        category=Category.SECURITY,
        reason="set by ann",
        team="security",
        acked=True,
        first_response_due=due,
    )
    assert (updated.status, updated.urgency, updated.category) == (
        Status.PENDING,
        Urgency.CRITICAL,
        Category.SECURITY,
    )
    assert (updated.reason, updated.team, updated.acked, updated.first_response_due) == (
        "set by ann",
        "security",
        True,
        due,
    )
    assert await store.get_conversation(threaded.conversation.id) == updated
    with pytest.raises(NotFound):
        await store.update_conversation("c_unknown", status=Status.CLOSED)


async def test_claim_conversation_is_a_compare_and_set(store: Store) -> None:
    conversation = (await ingest(store, "e1")).conversation
    results = await asyncio.gather(
        store.claim_conversation(conversation.id, "ann", None),
        store.claim_conversation(conversation.id, "bob", None),
    )
    [winner] = [result for result in results if result is not None]
    assert winner.assignee in ("ann", "bob")
    stored = await store.get_conversation(conversation.id)
    assert stored is not None and stored.assignee == winner.assignee
    loser = "bob" if winner.assignee == "ann" else "ann"
    assert await store.claim_conversation(conversation.id, loser, None) is None
    released = await store.claim_conversation(conversation.id, None, winner.assignee)
    assert released is not None and released.assignee is None
    with pytest.raises(NotFound):
        await store.claim_conversation("c_unknown", "ann", None)


async def test_a_claim_for_an_available_agent_refuses_one_away_or_gone(store: Store) -> None:
    """Assignment claims with `available`: an agent set away between the pick
    and the claim has had their conversations handed back already."""
    conversation = (await ingest(store, "e1")).conversation
    await store.add_agent(Agent("ann", ["support"], token_hash="hash-1"))
    await store.add_agent(Agent("bob", ["support"], token_hash="hash-2"))
    await store.set_presence("ann", Presence.AWAY)
    assert await store.claim_conversation(conversation.id, "ann", None, available=True) is None
    assert await store.claim_conversation(conversation.id, "zed", None, available=True) is None
    stored = await store.get_conversation(conversation.id)
    assert stored is not None and stored.assignee is None
    claimed = await store.claim_conversation(conversation.id, "bob", None, available=True)
    assert claimed is not None and claimed.assignee == "bob"
    # A manual assignment (an admin's choice) is not bound by presence.
    manual = await store.claim_conversation(conversation.id, "ann", "bob")
    assert manual is not None and manual.assignee == "ann"


async def conversation_with(
    store: Store, name: str, urgency: Urgency, due: timedelta | None, created: timedelta
) -> Conversation:
    threaded = await ingest(store, name, thread=name, urgency=urgency, at=BASE + created)
    if due is None:
        return threaded.conversation
    return await store.update_conversation(threaded.conversation.id, first_response_due=BASE + due)


async def test_inbox_order_is_urgency_then_due_then_created(store: Store) -> None:
    second = timedelta(seconds=1)
    minute = timedelta(minutes=1)
    specs = [
        ("low", Urgency.LOW, 60 * minute, 0 * second),
        ("critical-late-due", Urgency.CRITICAL, 30 * minute, 2 * second),
        ("critical-created-3s", Urgency.CRITICAL, 15 * minute, 3 * second),
        ("critical-no-due", Urgency.CRITICAL, None, 1 * second),
        ("high", Urgency.HIGH, 10 * minute, 0 * second),
        ("critical-created-1s", Urgency.CRITICAL, 15 * minute, 1 * second),
        ("critical-created-1.5s", Urgency.CRITICAL, 15 * minute, 1.5 * second),
    ]
    for name, urgency, due, created in specs:
        await conversation_with(store, name, urgency, due, created)
    page = await store.list_conversations(InboxQuery(status=None, limit=50))
    assert [c.thread_key for c in page.conversations] == [
        "critical-created-1s",
        "critical-created-1.5s",
        "critical-created-3s",
        "critical-late-due",
        "critical-no-due",
        "high",
        "low",
    ]
    assert page.conversations == sorted(page.conversations, key=Conversation.sort_key)
    assert page.next_cursor is None


async def test_inbox_filters(store: Store) -> None:
    made = {}
    for name in ("open-ann", "open-bob", "open-free", "pending-ann", "closed-ann"):
        made[name] = (await ingest(store, name, thread=name)).conversation
    for name in ("open-ann", "pending-ann", "closed-ann"):
        await store.claim_conversation(made[name].id, "ann", None)
    await store.claim_conversation(made["open-bob"].id, "bob", None)
    await store.update_conversation(made["pending-ann"].id, status=Status.PENDING)
    await store.update_conversation(made["closed-ann"].id, status=Status.CLOSED)
    await store.update_conversation(made["open-free"].id, team="security")

    async def names(**query: Any) -> set[str]:
        page = await store.list_conversations(InboxQuery(**query))
        return {c.thread_key for c in page.conversations}

    assert await names() == {"open-ann", "open-bob", "open-free"}
    assert await names(status=Status.PENDING) == {"pending-ann"}
    assert await names(status=None) == set(made)
    assert await names(team="security") == {"open-free"}
    assert await names(team="support", assignee="ann") == {"open-ann"}
    assert await names(status=None, assignee="ann") == {"open-ann", "pending-ann", "closed-ann"}
    assert await names(unassigned=True) == {"open-free"}


@pytest.mark.parametrize("limit", [7, 10, 500])
async def test_cursor_paging_has_no_repeats_or_gaps(store: Store, limit: int) -> None:
    urgencies = list(Urgency)
    for i in range(120):
        due = None if i % 5 == 0 else timedelta(minutes=i % 7)
        await conversation_with(store, f"c{i:03d}", urgencies[i % 4], due, timedelta(seconds=i % 3))
    everything = await store.list_conversations(InboxQuery(limit=500))
    assert len(everything.conversations) == 120
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await store.list_conversations(InboxQuery(limit=limit, cursor=cursor))
        pages += 1
        assert len(page.conversations) <= limit
        seen += [c.id for c in page.conversations]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == [c.id for c in everything.conversations]
    assert pages == -(-120 // limit)


async def test_a_cursor_the_store_did_not_give_out_is_a_value_error(store: Store) -> None:
    for cursor in ("garbage!", "W1sxXV0", "e30"):
        with pytest.raises(ValueError):
            await store.list_conversations(InboxQuery(cursor=cursor))


async def test_conversation_messages_are_oldest_first_in_and_out(store: Store) -> None:
    conversation = (await ingest(store, "e1", at=BASE)).conversation
    ack = await stored_outbound(store, conversation, kind=Kind.ACK, at=BASE + timedelta(seconds=1))
    await ingest(store, "e2", at=BASE + timedelta(minutes=1))
    reply = await stored_outbound(store, conversation, at=BASE + timedelta(minutes=2))
    messages = await store.conversation_messages(conversation.id)
    assert [m.id for m in messages][1::2] == [ack.id, reply.id]
    assert [m.external_id for m in messages][0::2] == ["e1", "e2"]


async def test_open_counts_count_open_and_pending_per_assignee(store: Store) -> None:
    for name, agent, status in [
        ("a1", "ann", Status.OPEN),
        ("a2", "ann", Status.PENDING),
        ("a3", "ann", Status.CLOSED),
        ("b1", "bob", Status.OPEN),
    ]:
        conversation = (await ingest(store, name, thread=name)).conversation
        await store.claim_conversation(conversation.id, agent, None)
        await store.update_conversation(conversation.id, status=status)
    assert await store.open_counts(["ann", "bob", "carl"]) == {"ann": 2, "bob": 1, "carl": 0}
    assert await store.open_counts([]) == {}


async def test_next_counter_counts_from_one_per_name(store: Store) -> None:
    assert [await store.next_counter("round_robin:support") for _ in range(3)] == [1, 2, 3]
    assert await store.next_counter("round_robin:security") == 1
    turns = await asyncio.gather(*(store.next_counter("busy") for _ in range(100)))
    assert sorted(turns) == list(range(1, 101))


# -- outbox ---------------------------------------------------------------------


async def test_enqueue_outbound_is_idempotent_and_counts_in_the_conversation(store: Store) -> None:
    conversation = (await ingest(store, "e1")).conversation
    ack = outbound(conversation, kind=Kind.ACK)
    stored = await store.enqueue_outbound(ack)
    assert stored.seq is not None
    assert stored.delivery is not None and stored.delivery.status is DeliveryStatus.QUEUED
    assert await store.enqueue_outbound(ack) == stored
    after_ack = await store.get_conversation(conversation.id)
    assert after_ack is not None
    assert (after_ack.message_count, after_ack.first_response_at, after_ack.acked) == (2, None, True)
    await stored_outbound(store, conversation, at=BASE + timedelta(minutes=5))
    await stored_outbound(store, conversation, at=BASE + timedelta(minutes=9))
    after_replies = await store.get_conversation(conversation.id)
    assert after_replies is not None
    assert after_replies.first_response_at == BASE + timedelta(minutes=5)
    assert after_replies.message_count == 4
    orphan = replace(outbound(conversation), conversation_id="c_unknown")
    with pytest.raises(NotFound):
        await store.enqueue_outbound(orphan)


async def test_only_an_ack_marks_its_conversation_acked(store: Store) -> None:
    conversation = (await ingest(store, "e1")).conversation
    await stored_outbound(store, conversation, kind=Kind.AGENT)
    replied = await store.get_conversation(conversation.id)
    assert replied is not None and not replied.acked
    await stored_outbound(store, conversation, kind=Kind.ACK)
    acked = await store.get_conversation(conversation.id)
    assert acked is not None and acked.acked


async def test_claim_outbound_respects_channels_due_time_and_visibility(store: Store) -> None:
    web = (await ingest(store, "e1")).conversation
    tg = (await ingest(store, "e2", channel="tg")).conversation
    now_web = await stored_outbound(store, web)
    later_web = await stored_outbound(store, web, next_attempt_at=BASE + timedelta(minutes=10))
    now_tg = await stored_outbound(store, tg)
    assert [m.id for m in await store.claim_outbound("a", ["web"], BASE, 10, 60)] == [now_web.id]
    assert [m.id for m in await store.claim_outbound("b", ["web", "tg"], BASE, 10, 60)] == [now_tg.id]
    assert await store.claim_outbound("c", ["web", "tg"], BASE + timedelta(seconds=30), 10, 60) == []
    due = await store.claim_outbound("c", ["web"], BASE + timedelta(minutes=10), 10, 60)
    assert [m.id for m in due] == [now_web.id, later_web.id]
    assert await store.claim_outbound("a", [], BASE + timedelta(days=1), 10, 60) == []


async def test_a_restarted_sender_takes_back_its_own_outbound_claims_at_once(store: Store) -> None:
    conversation = (await ingest(store, "e1")).conversation
    message = await stored_outbound(store, conversation)
    assert [m.id for m in await store.claim_outbound("host:8080/outbox", ["web"], BASE, 10, 120)] == [
        message.id
    ]
    assert await store.claim_outbound("other", ["web"], BASE, 10, 120) == []
    again = await store.claim_outbound("host:8080/outbox", ["web"], BASE + timedelta(seconds=1), 10, 120)
    assert [m.id for m in again] == [message.id]


async def test_record_delivery_reschedules_or_removes(store: Store) -> None:
    conversation = (await ingest(store, "e1")).conversation
    message = await stored_outbound(store, conversation)
    await store.claim_outbound("a", ["web"], BASE, 10, 60)
    retry = Delivery(DeliveryStatus.QUEUED, 1, "timeout", BASE + timedelta(minutes=5))
    recorded = await store.record_delivery(message.id, retry)
    assert recorded.delivery == retry and recorded.seq == message.seq
    assert await store.claim_outbound("a", ["web"], BASE + timedelta(minutes=4), 10, 60) == []
    assert [m.id for m in await store.claim_outbound("a", ["web"], BASE + timedelta(minutes=5), 10, 60)] == [
        message.id
    ]
    await store.record_delivery(message.id, Delivery(DeliveryStatus.SENT, 2))
    assert await store.claim_outbound("a", ["web"], BASE + timedelta(days=1), 10, 60) == []
    stored = await store.get_message(message.id)
    assert stored is not None and stored.delivery == Delivery(DeliveryStatus.SENT, 2)
    await store.record_delivery(message.id, Delivery(DeliveryStatus.DEAD, 8, "gone"))
    await store.record_delivery(message.id, Delivery(next_attempt_at=BASE + timedelta(days=2)))
    assert [m.id for m in await store.claim_outbound("a", ["web"], BASE + timedelta(days=2), 10, 60)] == [
        message.id
    ]
    with pytest.raises(NotFound):
        await store.record_delivery("m_unknown", Delivery(DeliveryStatus.SENT, 1))


async def test_a_blocked_outbound_claim_wakes_when_a_reply_is_queued(store: Store) -> None:
    conversation = (await ingest(store, "e1")).conversation
    waiting = asyncio.create_task(store.claim_outbound("a", ["web"], BASE, 10, 60, block_s=10))
    await asyncio.sleep(0.05)
    message = await stored_outbound(store, conversation)
    assert [m.id for m in await asyncio.wait_for(waiting, 1)] == [message.id]


async def test_pull_mode_reads_in_queue_order_and_marks_sent(store: Store) -> None:
    web = (await ingest(store, "e1")).conversation
    tg = (await ingest(store, "e2", channel="tg")).conversation
    first, second, third = [await stored_outbound(store, web) for _ in range(3)]
    other = await stored_outbound(store, tg)
    assert [m.id for m in await store.outbound_after("web", 0, 10)] == [first.id, second.id, third.id]
    assert [m.seq for m in await store.outbound_after("web", 0, 10)] == [first.seq, second.seq, third.seq]
    assert [m.id for m in await store.outbound_after("web", first.seq or 0, 10)] == [second.id, third.id]
    assert [m.id for m in await store.outbound_after("web", 0, 1)] == [first.id]
    await store.mark_pulled("web", second.seq or 0)
    statuses = [m.delivery.status for m in await store.outbound_after("web", 0, 10) if m.delivery]
    assert statuses == [DeliveryStatus.SENT, DeliveryStatus.SENT, DeliveryStatus.QUEUED]
    assert [m.id for m in await store.claim_outbound("a", ["web", "tg"], BASE, 10, 60)] == [
        third.id,
        other.id,
    ]


async def test_an_ack_is_queued_only_below_the_recipients_cap(store: Store) -> None:
    conversation = (await ingest(store, "e1", thread="user-1")).conversation
    tg = (await ingest(store, "e2", channel="tg", thread="user-1")).conversation
    hour_ago = BASE - timedelta(hours=1)
    queued = []
    for _ in range(2):
        ack = await store.enqueue_ack(outbound(conversation, kind=Kind.ACK, at=BASE), hour_ago, 2)
        assert ack is not None and ack.seq is not None
        queued.append(ack.id)
    await stored_outbound(store, conversation, kind=Kind.AGENT, at=BASE)  # replies do not count
    capped = outbound(conversation, kind=Kind.ACK, at=BASE + timedelta(minutes=1))
    assert await store.enqueue_ack(capped, hour_ago, 2) is None
    assert await store.get_message(capped.id) is None
    # Only acks since `since` count, and per channel and recipient.
    assert await store.enqueue_ack(capped, BASE + timedelta(seconds=1), 2) is not None
    other = outbound(conversation, kind=Kind.ACK, at=BASE, recipient="user-2")
    assert await store.enqueue_ack(other, hour_ago, 2) is not None
    assert await store.enqueue_ack(outbound(tg, kind=Kind.ACK, at=BASE), hour_ago, 2) is not None
    # A stored ack comes back as stored, even at the cap.
    again = await store.enqueue_ack(capped, hour_ago, 0)
    assert again is not None and again.id == capped.id and again.seq is not None
    stored = await store.get_conversation(conversation.id)
    assert stored is not None and stored.acked
    claimed = await store.claim_outbound("a", ["web"], BASE + timedelta(hours=1), 10, 60)
    assert {m.id for m in claimed if m.kind is Kind.ACK} == {*queued, capped.id, other.id}


# -- agents -------------------------------------------------------------------------


async def test_agents_are_added_found_changed_and_removed(store: Store) -> None:
    await store.add_agent(Agent("ann", ["support"], token_hash="hash-1"))
    with pytest.raises(Conflict):
        await store.add_agent(Agent("ann", ["security"], token_hash="hash-9"))
    await store.add_agent(Agent("bob", ["security", "support"], role=Role.ADMIN, token_hash="hash-2"))
    ann = await store.get_agent("ann")
    assert ann is not None
    assert (ann.teams, ann.role, ann.presence, ann.token_hash) == (
        ["support"],
        Role.AGENT,
        Presence.AVAILABLE,
        "hash-1",
    )
    assert await store.get_agent("carl") is None
    by_token = await store.agent_by_token("hash-2")
    assert by_token is not None and (by_token.name, by_token.role) == ("bob", Role.ADMIN)
    assert await store.agent_by_token("hash-x") is None
    assert [a.name for a in await store.list_agents()] == ["ann", "bob"]

    await store.set_agent_token("ann", "hash-3")
    assert await store.agent_by_token("hash-1") is None
    rotated = await store.agent_by_token("hash-3")
    assert rotated is not None and rotated.name == "ann"
    await store.set_presence("ann", Presence.AWAY)
    away = await store.get_agent("ann")
    assert away is not None and (away.presence, away.token_hash) == (Presence.AWAY, "hash-3")
    for change in (store.set_agent_token("carl", "h"), store.set_presence("carl", Presence.AWAY)):
        with pytest.raises(NotFound):
            await change

    assert await store.remove_agent("ann") is True
    assert await store.remove_agent("ann") is False
    assert await store.get_agent("ann") is None
    assert await store.agent_by_token("hash-3") is None


# -- events -----------------------------------------------------------------------


async def test_publish_reaches_every_subscriber_until_it_closes(store: Store) -> None:
    one, two = store.subscribe(), store.subscribe()
    created = Event("conversation.created", {"ref": "T-000001"})
    await store.publish(created)
    assert await asyncio.wait_for(anext(one), 1) == created
    assert await asyncio.wait_for(anext(two), 1) == created
    await one.aclose()
    updated = Event("conversation.updated", {"ref": "T-000001"})
    await store.publish(updated)
    assert await asyncio.wait_for(anext(two), 1) == updated
    with pytest.raises(StopAsyncIteration):
        await anext(one)
    await two.aclose()


async def test_a_slow_subscriber_never_holds_up_publishers(store: Store) -> None:
    slow = store.subscribe()
    started = time.monotonic()
    for n in range(5000):
        await store.publish(Event("message.created", {"n": n}))
    assert time.monotonic() - started < 5
    last = -1
    while last != 4999:
        last = (await asyncio.wait_for(anext(slow), 1)).data["n"]
    await slow.aclose()


# -- leases -------------------------------------------------------------------------


async def test_a_lease_has_one_holder_and_its_fencing_token_grows_with_each_new_one(store: Store) -> None:
    first = await store.acquire_lease("poller:mail", "a", 30)
    assert first is not None
    assert await store.acquire_lease("poller:mail", "b", 30) is None
    assert await store.acquire_lease("poller:mail", "a", 30) == first
    assert await store.acquire_lease("poller:tg", "b", 30) is not None
    assert await store.renew_lease("poller:mail", "a", 30) is True
    assert await store.renew_lease("poller:mail", "b", 30) is False
    await store.release_lease("poller:mail", "b")
    assert await store.acquire_lease("poller:mail", "b", 30) is None
    await store.release_lease("poller:mail", "a")
    assert await store.renew_lease("poller:mail", "a", 30) is False
    second = await store.acquire_lease("poller:mail", "b", 30)
    assert second is not None and second > first


async def test_an_expired_lease_is_lost_and_taken_with_a_higher_token(store: Store) -> None:
    first = await store.acquire_lease("poller:mail", "a", 0.2)
    await asyncio.sleep(0.3)
    assert await store.renew_lease("poller:mail", "a", 30) is False
    again = await store.acquire_lease("poller:mail", "a", 0.2)
    await asyncio.sleep(0.3)
    taken = await store.acquire_lease("poller:mail", "b", 30)
    assert first is not None and again is not None and taken is not None
    assert first < again < taken


async def test_concurrent_acquires_make_one_holder(store: Store) -> None:
    tokens = await asyncio.gather(*(store.acquire_lease("poller:mail", f"h{i}", 30) for i in range(20)))
    assert len([token for token in tokens if token is not None]) == 1


# -- durability ---------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(store: Store, make_store: StoreFactory) -> None:
    conversation = (await ingest(store, "e1")).conversation
    queued = inbound("e2", thread="user-2", urgency=Urgency.HIGH)
    await store.enqueue_inbound(queued)
    reply = await stored_outbound(store, conversation)
    await store.add_agent(Agent("ann", ["support"], token_hash="hash-1"))
    await store.next_counter("round_robin:support")
    dead = await store.add_dead_letter("web", "{", "invalid JSON")
    before = await store.get_conversation(conversation.id)
    await store.close()
    await store.close()

    reopened = make_store()
    await reopened.open()
    try:
        assert await reopened.get_conversation(conversation.ref) == before
        assert await reopened.inbound_backlog() == 2
        claimed = await reopened.claim_inbound("w", 10, 60)
        assert [m.external_id for m in claimed] == ["e2", "e1"]
        assert (await reopened.enqueue_inbound(inbound("e1"))).duplicate
        assert [m.id for m in await reopened.claim_outbound("a", ["web"], BASE, 10, 60)] == [reply.id]
        assert await reopened.agent_by_token("hash-1") is not None
        assert await reopened.next_counter("round_robin:support") == 2
        assert [d.id for d in await reopened.list_dead_letters()] == [dead.id]
        assert (
            await reopened.thread_message(queued, fresh_conversation(queued))
        ).conversation.ref == "T-000002"
    finally:
        await reopened.close()


async def test_close_commits_enqueues_already_handed_in(store: Store, make_store: StoreFactory) -> None:
    pending = [asyncio.create_task(store.enqueue_inbound(inbound(f"e{i}"))) for i in range(200)]
    await asyncio.sleep(0)
    await store.close()
    assert all(not task.result().duplicate for task in pending)
    reopened = make_store()
    await reopened.open()
    try:
        assert await reopened.inbound_backlog() == 200
    finally:
        await reopened.close()


# -- SQLite specifics -----------------------------------------------------------------


def test_sqlite_url_is_relative_with_three_slashes_and_absolute_with_four(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert SQLiteStore("sqlite:///var/router.db").path == Path.cwd() / "var" / "router.db"
    assert SQLiteStore("sqlite:////srv/router.db").path == Path("/srv/router.db")
    with pytest.raises(ConfigError):
        SQLiteStore("sqlite://")


async def test_sqlite_creates_its_directory_in_wal_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("sqlite:///var/deeper/router.db")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "var" / "deeper" / "router.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_sqlite_one_bad_message_fails_alone_not_its_whole_batch(sqlite_factory: StoreFactory) -> None:
    store = sqlite_factory()
    await store.open()
    try:
        good, other = inbound("a"), inbound("c")
        clash = replace(inbound("b"), id=good.id)
        results = await asyncio.gather(
            *(store.enqueue_inbound(m) for m in (good, clash, other)), return_exceptions=True
        )
        assert results[0] == Accepted(good.id, None, duplicate=False)
        assert isinstance(results[1], StoreError)
        assert results[2] == Accepted(other.id, None, duplicate=False)
        assert await store.inbound_backlog() == 2
    finally:
        await store.close()


KILLED_WRITER = """
import asyncio, sys
from datetime import UTC, datetime
from router.model import Direction, Kind, Message, Party
from router.store.sqlite import SQLiteStore

async def accept(store, n):
    message = Message(f"m{n}", "web", "webhook", Direction.IN, Kind.CUSTOMER, f"e{n}", Party("u"), "t",
                      datetime.now(UTC))
    await store.enqueue_inbound(message)
    print(message.id, flush=True)

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    for start in range(0, 10**9, 50):
        await asyncio.gather(*(accept(store, start + k) for k in range(50)))

asyncio.run(main())
"""


async def test_sqlite_keeps_every_acknowledged_message_across_kill_9(tmp_path: Path) -> None:
    """SPEC 6 promise 1: once enqueue_inbound returned, kill -9 loses nothing."""
    url = f"sqlite:///{tmp_path}/router.db"
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WRITER,
        url,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    assert writer.stdout is not None
    acknowledged = [
        (await asyncio.wait_for(writer.stdout.readline(), 30)).decode().strip() for _ in range(2000)
    ]
    writer.kill()
    await writer.wait()
    store = SQLiteStore(url)
    await store.open()
    try:
        assert await store.inbound_backlog() >= len(acknowledged)
        missing = [m for m in acknowledged if await store.get_message(m) is None]
        assert missing == []
    finally:
        await store.close()


# -- checkpoints -------------------------------------------------------------------------


async def test_checkpoints_are_kept_per_key_replaced_and_survive_a_reopen(
    store: Store, make_store: StoreFactory
) -> None:
    assert await store.get_checkpoint("imap/mail/INBOX") is None
    await store.put_checkpoint("imap/mail/INBOX", "1795553164:10")
    await store.put_checkpoint("imap/mail/INBOX", "1795553164:12")
    await store.put_checkpoint("imap/sales/INBOX", "7:1")
    assert await store.get_checkpoint("imap/mail/INBOX") == "1795553164:12"
    reopened = make_store()
    await reopened.open()
    try:
        assert await reopened.get_checkpoint("imap/mail/INBOX") == "1795553164:12"
        assert await reopened.get_checkpoint("imap/sales/INBOX") == "7:1"
        assert await reopened.get_checkpoint("imap/other/INBOX") is None
    finally:
        await reopened.close()
