"""`kill -9` between any two store steps of handling a message (SPEC 6
promises 1 and 2): the message is handled again, and the desk ends up as if
nothing had happened.

A crash is emulated on the real SQLite store: after its first `budget`
writes every further store call raises `Crash` (a BaseException, so the
pipeline's own error handling does not catch it, as it could not catch a
SIGKILL). What those writes committed stays in the file; the message stays
claimed; the next drain takes it back and handles it again."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from router import agents, triage
from router import config as configuration
from router.acks import Templates
from router.model import Conversation, InboxQuery, Kind, Message
from router.pipeline import Pipeline
from router.store.sqlite import SQLiteStore
from tests.conftest import customer_message, write_config
from tests.test_desk import Clock

RULES = triage.load_rules()
WRITES = (
    "thread_message",
    "thread_messages",
    "update_conversation",
    "claim_conversation",
    "enqueue_outbound",
    "enqueue_ack",
    "update_message",
    "record_delivery",
    "put_checkpoint",
    "next_counter",
    "complete_inbound",
    "fail_inbound",
)


class Crash(BaseException):
    """The process died here."""


class CrashingStore(SQLiteStore):
    """The real store, dying after `budget` more writes (None: never)."""

    budget: int | None = None

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name not in WRITES:
            return attribute

        async def write(*args: Any, **kwargs: Any) -> Any:
            if self.budget is not None:
                if self.budget == 0:
                    raise Crash(name)
                self.budget -= 1
            return await attribute(*args, **kwargs)

        return write


@dataclass
class Site:
    store: CrashingStore
    pipeline: Pipeline
    clock: Clock

    async def queue(self, text: str, sender: str = "u-1", **extra: Any) -> Message:
        message = customer_message(text, sender, at=self.clock(), **extra)
        await self.pipeline.accept(message)
        return message

    async def conversations(self) -> list[Conversation]:
        return (await self.store.list_conversations(InboxQuery(status=None, limit=500))).conversations

    async def acks(self, conversation: Conversation) -> int:
        return [m.kind for m in await self.store.conversation_messages(conversation.id)].count(Kind.ACK)


async def every_crash_point(
    tmp_path: Path,
    prepare: Callable[[Site], Awaitable[None]],
    check: Callable[[Site], Awaitable[None]],
) -> int:
    """For each n: a fresh desk, `prepare`, then crash after the n-th write
    of the drain that follows, recover with a second drain, and `check`.
    Returns how many crash points there were."""
    n = 0
    while True:
        directory = tmp_path / f"crash-{n}"
        directory.mkdir()
        config = configuration.load(str(write_config(directory, None)))
        store = CrashingStore(config.settings.store.url)
        await store.open()
        try:
            clock = Clock()
            site = Site(store, Pipeline(store, config, RULES, Templates(None), clock), clock)
            await prepare(site)
            store.budget = n
            try:
                await site.pipeline.drain()
                crashed = False
            except Crash:
                crashed = True
            store.budget = None
            await site.pipeline.drain()
            assert await store.inbound_backlog() == 0
            try:
                await check(site)
            except AssertionError as exc:
                raise AssertionError(f"after a crash at write {n}: {exc}") from exc
        finally:
            await store.close()
        if not crashed:
            return n
        n += 1


async def test_a_crash_while_escalating_still_moves_the_conversation_to_security(tmp_path: Path) -> None:
    async def prepare(site: Site) -> None:
        await agents.create(site.store, "bob", ["support"])
        await agents.create(site.store, "sec1", ["security"])
        await site.queue("what is the withdrawal fee?")
        await site.pipeline.drain()
        [conversation] = await site.conversations()
        assert (conversation.team, conversation.assignee) == ("support", "bob")
        site.clock.advance(minutes=10)
        await site.queue("wait, someone just withdrew all my BTC without my permission!")

    async def check(site: Site) -> None:
        [conversation] = await site.conversations()
        assert (conversation.urgency.value, conversation.team) == ("critical", "security")
        assert conversation.assignee == "sec1"
        assert conversation.first_response_due == site.clock.now + timedelta(minutes=15)
        assert conversation.message_count == 3 and await site.acks(conversation) == 1

    assert await every_crash_point(tmp_path, prepare, check) > 3


async def test_a_crash_while_an_edit_escalates_still_tightens_the_deadline(tmp_path: Path) -> None:
    async def prepare(site: Site) -> None:
        await agents.create(site.store, "bob", ["support"])
        await agents.create(site.store, "sec1", ["security"])
        original = await site.queue("what is the withdrawal fee?")
        await site.pipeline.drain()
        site.clock.advance(minutes=10)
        await site.queue("someone withdrew all my BTC without my permission!", edit_of=original.external_id)

    async def check(site: Site) -> None:
        [conversation] = await site.conversations()
        assert (conversation.urgency.value, conversation.team) == ("critical", "security")
        assert conversation.first_response_due == site.clock.now + timedelta(minutes=15)
        assert conversation.assignee == "sec1"

    assert await every_crash_point(tmp_path, prepare, check) > 2


class KilledByOneMessage(Pipeline):
    """The process dies whenever it handles a message saying "segfault"
    (a C library's crash, the OOM killer): no exception to catch."""

    async def handle(self, message: Message, threaded: Any = None) -> Conversation:
        if "segfault" in message.text:
            raise Crash(message.id)
        return await super().handle(message, threaded)


async def test_a_message_that_kills_the_process_is_dead_lettered_and_the_desk_goes_on(tmp_path: Path) -> None:
    config = configuration.load(str(write_config(tmp_path, None)))
    store = CrashingStore(config.settings.store.url)
    await store.open()
    try:
        site = Site(store, KilledByOneMessage(store, config, RULES, Templates(None), Clock()), Clock())
        killer = await site.queue("someone withdrew all my BTC, the app shows segfault", sender="u-1")
        others = [await site.queue(f"what is the fee for order {i}?", sender=f"u-{i}") for i in (2, 3)]
        crashes, attempts = 0, config.settings.pipeline.max_attempts
        while True:
            try:
                await site.pipeline.drain()
                break
            except Crash:
                crashes += 1
                assert crashes <= attempts, "the same message keeps killing the desk"
        assert crashes == attempts
        [dead] = await store.list_dead_letters()
        assert dead.message_id == killer.id and "never finished" in dead.error
        by_customer = {c.customer.id: c for c in await site.conversations()}
        for sender, message in zip(("u-2", "u-3"), others, strict=True):
            conversation = by_customer[sender]
            [customer, ack] = await store.conversation_messages(conversation.id)
            assert (customer.id, ack.kind) == (message.id, Kind.ACK)
    finally:
        await store.close()
