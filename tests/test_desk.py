"""Assignment, presence, SLA clocks, escalation, acks and poison messages,
driven through the pipeline with a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from channels.webhook import WebhookChannel
from router import agents, triage
from router import config as configuration
from router.acks import Templates
from router.desk import Desk
from router.errors import Conflict
from router.model import Agent, DeliveryStatus, Direction, Kind, Message, Presence, Status
from router.outbox import Outbox
from router.pipeline import Pipeline
from router.store.sqlite import SQLiteStore
from tests.conftest import Receiver, customer_message, write_config

RULES = triage.load_rules()


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Desk_:
    store: SQLiteStore
    pipeline: Pipeline
    desk: Desk
    clock: Clock
    outbox: Outbox

    async def receive(self, text: str, sender: str = "u-1", key: str | None = None, **extra) -> Message:
        message = await self.queue(text, sender, key, **extra)
        await self.pipeline.drain()
        return message

    async def queue(self, text: str, sender: str = "u-1", key: str | None = None, **extra) -> Message:
        """Accepted, not handled yet."""
        message = customer_message(text, sender, at=self.clock(), **extra)
        message.thread_key = key or sender
        await self.pipeline.accept(message)
        return message


@pytest.fixture
async def desk(tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Desk_]:
    monkeypatch.chdir(tmp_path)
    config = configuration.load(str(write_config(tmp_path, receiver.url)))
    store = SQLiteStore(config.settings.store.url)
    await store.open()
    clock = Clock()
    channel = WebhookChannel(
        "web", WebhookChannel.Settings.model_validate(config.settings.channels[0].options), tmp_path
    )
    pipeline = Pipeline(store, config, RULES, Templates(None), clock)
    yield Desk_(
        store, pipeline, Desk(store, config, clock), clock, Outbox(store, config, {"web": channel}, clock)
    )
    await channel.close()
    await store.close()


async def add_agents(store: SQLiteStore, *names: str, team: str = "support") -> dict[str, Agent]:
    for name in names:
        await agents.create(store, name, [team])
    return {name: await store.get_agent(name) for name in names}


async def conversations(d: Desk_):
    from router.model import InboxQuery

    return (await d.store.list_conversations(InboxQuery(status=None, limit=500))).conversations


async def test_deadline_is_absolute_and_only_a_human_reply_counts(desk: Desk_) -> None:
    crew = await add_agents(desk.store, "bob")
    await desk.receive("what is the fee for BTC withdrawals?")
    [conv] = await conversations(desk)
    assert conv.first_response_due == desk.clock.now + desk.pipeline.settings.sla.target(conv.urgency)
    acks = [m for m in await desk.store.conversation_messages(conv.id) if m.kind is Kind.ACK]
    assert len(acks) == 1
    assert conv.first_response_at is None  # the ack does not count

    desk.clock.advance(hours=30)
    [conv] = await conversations(desk)
    assert conv.first_response_due < desk.clock.now  # overdue, without anyone sleeping

    await desk.desk.reply(conv.ref, crew["bob"], "The fee is 0.0002 BTC.")
    [conv] = await conversations(desk)
    assert conv.first_response_at == desk.clock.now
    desk.clock.advance(minutes=5)
    await desk.desk.reply(conv.ref, crew["bob"], "Anything else?")
    [later] = await conversations(desk)
    assert later.first_response_at == conv.first_response_at


async def test_the_sla_runs_from_when_the_message_reached_us_not_when_a_backlog_let_it_through(
    desk: Desk_,
) -> None:
    """A backlog (a burst, a restart) must not make a late answer look on
    time; nor may a sender's own Date header (here a year old) set the clock."""
    arrived = desk.clock.now
    await desk.queue("someone withdrew all my BTC, it was not me", sender="u-1")
    await desk.pipeline.accept(customer_message("what is the fee?", "u-2", at=arrived - timedelta(days=365)))
    desk.clock.advance(minutes=20)
    await desk.pipeline.drain()
    by_customer = {c.customer.id: c for c in await conversations(desk)}
    critical, routine = by_customer["u-1"], by_customer["u-2"]
    assert critical.created_at == arrived and routine.created_at == arrived
    assert critical.first_response_due == arrived + timedelta(minutes=15) < desk.clock.now
    assert routine.first_response_due == arrived + desk.pipeline.settings.sla.target(routine.urgency)


async def test_an_escalation_that_waited_in_the_queue_is_due_from_its_arrival(desk: Desk_) -> None:
    await desk.receive("what is the withdrawal fee?")
    desk.clock.advance(minutes=10)
    arrived = desk.clock.now
    await desk.queue("wait, someone just withdrew all my BTC without my permission!")
    desk.clock.advance(minutes=5)
    await desk.pipeline.drain()
    [conv] = await conversations(desk)
    assert conv.urgency.value == "critical"
    assert conv.first_response_due == arrived + timedelta(minutes=15)


async def test_a_follow_up_that_turns_an_answered_conversation_critical_is_announced(desk: Desk_) -> None:
    """The inbox learns of a conversation's changes from events alone: a
    row that turned critical must not keep looking routine until a reload."""
    crew = await add_agents(desk.store, "bob")
    await desk.receive("what is the withdrawal fee?")
    [conv] = await conversations(desk)
    await desk.desk.reply(conv.ref, crew["bob"], "It is 0.0002 BTC.")
    events = desk.store.subscribe()
    await desk.receive("someone hacked my account and stole my BTC!")
    updates = []
    while not updates:
        event = await asyncio.wait_for(anext(events), 2)
        if event.type == "conversation.updated":
            updates.append(event.data)
    await events.aclose()
    [update] = updates
    assert (update["ref"], update["urgency"], update["message_count"]) == (conv.ref, "critical", 4)


async def test_a_customer_answer_reopens_a_pending_conversation_but_their_auto_reply_does_not(
    desk: Desk_,
) -> None:
    crew = await add_agents(desk.store, "bob")
    await desk.receive("how do I verify my account?")
    [conv] = await conversations(desk)
    await desk.desk.reply(conv.ref, crew["bob"], "Send us a photo of your ID, please.")
    await desk.desk.set_status(conv.ref, Status.PENDING)
    await desk.receive("Out of office until Monday.", auto_generated=True)
    [conv] = await conversations(desk)
    assert conv.status is Status.PENDING
    await desk.receive("Here it is, attached.")
    [conv] = await conversations(desk)
    assert conv.status is Status.OPEN


async def test_a_reply_to_a_channel_taken_out_of_the_config_is_refused_not_queued_forever(
    desk: Desk_,
) -> None:
    crew = await add_agents(desk.store, "bob")
    message = customer_message("what is the fee?", "u-1", at=desk.clock())
    message.channel = "old-chat"
    await desk.pipeline.accept(message)
    await desk.pipeline.drain()
    [conv] = await conversations(desk)
    with pytest.raises(Conflict, match="'old-chat' is not configured"):
        await desk.desk.reply(conv.ref, crew["bob"], "It is 0.0002 BTC.")
    assert [m.kind for m in await desk.store.conversation_messages(conv.id)] == [Kind.CUSTOMER, Kind.ACK]


async def test_round_robin_over_available_agents_only(desk: Desk_) -> None:
    await add_agents(desk.store, "bob", "carol", "dave")
    await desk.desk.set_presence("dave", Presence.AWAY)
    for i in range(4):
        await desk.receive(f"how long do deposits take? #{i}", sender=f"u-{i}")
    assignees = sorted(c.assignee for c in await conversations(desk))
    assert assignees == ["bob", "bob", "carol", "carol"]


async def test_least_open_prefers_the_least_loaded(desk: Desk_) -> None:
    await add_agents(desk.store, "sec1", "sec2", team="security")
    await desk.receive("someone logged into my account and withdrew everything", sender="a")
    await desk.receive("my account was hacked, funds stolen", sender="b")
    first, second = await conversations(desk)
    assert {first.assignee, second.assignee} == {"sec1", "sec2"}
    await desk.desk.set_status(first.ref, Status.CLOSED)
    await desk.receive("I got a phishing email pretending to be you and entered my password", sender="c")
    newest = next(c for c in await conversations(desk) if c.customer.id == "c")
    assert newest.assignee == first.assignee  # the one whose conversation was closed has fewer open


async def test_going_away_hands_back_unanswered_conversations(desk: Desk_) -> None:
    crew = await add_agents(desk.store, "bob", "carol")
    for i in range(4):
        await desk.receive(f"what are the trading limits? #{i}", sender=f"u-{i}")
    bobs = [c for c in await conversations(desk) if c.assignee == "bob"]
    await desk.desk.reply(bobs[0].ref, crew["bob"], "Limits are on the fees page.")
    moved = await desk.desk.set_presence("bob", Presence.AWAY)
    assert [c.assignee for c in moved] == ["carol"]
    owners = {c.ref: c.assignee for c in await conversations(desk)}
    assert owners[bobs[0].ref] == "bob"  # answered: stays with bob
    assert owners[bobs[1].ref] == "carol"


async def test_nobody_available_leaves_it_in_the_team_queue(desk: Desk_) -> None:
    await add_agents(desk.store, "bob")
    await desk.desk.set_presence("bob", Presence.AWAY)
    await desk.receive("can I change my email address?")
    [conv] = await conversations(desk)
    assert conv.team == "support" and conv.assignee is None


async def test_an_agent_coming_back_takes_up_what_waited_most_urgent_first(desk: Desk_) -> None:
    """Nobody on shift at night: in the morning the first agent to sign in
    gets the night's conversations, the security report first, not a
    queue someone has to go and look for."""
    await add_agents(desk.store, "bob")
    await add_agents(desk.store, "sec1", team="security")
    for name in ("bob", "sec1"):
        await desk.desk.set_presence(name, Presence.AWAY)
    await desk.receive("can I change my email address?", sender="u-1")
    await desk.receive("someone withdrew all my BTC without my permission!", sender="u-2")
    assert [c.assignee for c in await conversations(desk)] == [None, None]
    events = desk.store.subscribe()
    assert [c.team for c in await desk.desk.set_presence("sec1", Presence.AVAILABLE)] == ["security"]
    assert [c.customer.id for c in await desk.desk.set_presence("bob", Presence.AVAILABLE)] == ["u-1"]
    announced = [(await asyncio.wait_for(anext(events), 2)).data for _ in range(2)]
    await events.aclose()
    assert [(e["assignee"], e["customer"]["id"]) for e in announced] == [("sec1", "u-2"), ("bob", "u-1")]
    assert {c.customer.id: c.assignee for c in await conversations(desk)} == {"u-1": "bob", "u-2": "sec1"}


async def test_assignment_is_compare_and_set(desk: Desk_) -> None:
    await add_agents(desk.store, "bob", "carol", "dave")
    for name in ("bob", "carol", "dave"):
        await desk.desk.set_presence(name, Presence.AWAY)
    await desk.receive("question about fees")
    [conv] = await conversations(desk)
    assert conv.assignee is None
    assert await desk.store.claim_conversation(conv.id, "bob", expected=None)
    assert await desk.store.claim_conversation(conv.id, "carol", expected=None) is None
    both = await asyncio.gather(
        desk.store.claim_conversation(conv.id, "carol", expected="bob"),
        desk.store.claim_conversation(conv.id, "dave", expected="bob"),
    )
    assert sum(result is not None for result in both) == 1
    assert (await desk.desk.assign(conv.ref, None)).assignee is None


async def test_escalation_moves_a_waiting_conversation_to_security(desk: Desk_) -> None:
    await add_agents(desk.store, "bob")
    await add_agents(desk.store, "sec1", team="security")
    await desk.receive("what is the withdrawal fee?")
    desk.clock.advance(minutes=10)
    await desk.receive("wait, someone just withdrew all my BTC without my permission!")
    [conv] = await conversations(desk)
    assert (conv.urgency.value, conv.category.value, conv.team) == ("critical", "security", "security")
    assert conv.assignee == "sec1"
    assert conv.first_response_due == desk.clock.now + timedelta(minutes=15)


async def test_message_after_close_starts_a_new_conversation_linking_the_old(desk: Desk_) -> None:
    await desk.receive("how do I enable 2FA?")
    [old] = await conversations(desk)
    await desk.desk.set_status(old.ref, Status.CLOSED)
    await desk.receive("thanks, another question on fees")
    new = next(c for c in await conversations(desk) if c.id != old.id)
    assert old.ref in (new.reason or "")


async def test_per_sender_ack_cap_and_no_ack_for_machines(desk: Desk_) -> None:
    for i in range(5):
        await desk.receive(f"question {i} about deposits", key=f"thread-{i}")
    await desk.receive("I am out of office", sender="robot", auto_generated=True)
    acks = [
        m
        for c in await conversations(desk)
        for m in await desk.store.conversation_messages(c.id)
        if m.kind is Kind.ACK
    ]
    assert len(acks) == 3
    assert all(m.recipient.id == "u-1" for m in acks)


async def test_poison_message_is_dead_lettered_and_the_queue_flows(
    desk: Desk_, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = desk.pipeline.handle

    async def explode_on_poison(message: Message, *rest: Any):
        if "POISON" in message.text:
            raise RuntimeError("cannot handle this one")
        return await real(message, *rest)

    monkeypatch.setattr(desk.pipeline, "handle", explode_on_poison)
    await desk.receive("POISON pill")
    await desk.receive("normal question about fees", sender="u-2")
    [dead] = await desk.store.list_dead_letters()
    assert "cannot handle this one" in dead.error and "POISON" in dead.payload
    assert [c.customer.id for c in await conversations(desk)] == ["u-2"]

    monkeypatch.setattr(desk.pipeline, "handle", real)
    assert await desk.store.retry_dead_letter(dead.id)
    await desk.pipeline.drain()
    assert sorted(c.customer.id for c in await conversations(desk)) == ["u-1", "u-2"]
    assert await desk.store.list_dead_letters() == []


async def test_outbox_backs_off_then_delivers_and_permanent_errors_fail(
    desk: Desk_, receiver: Receiver
) -> None:
    receiver.statuses = [503, 200, 404]
    await desk.receive("hello there")
    assert await desk.outbox.deliver_due() == 1  # 503: retry later
    [conv] = await conversations(desk)
    [ack] = [m for m in await desk.store.conversation_messages(conv.id) if m.kind is Kind.ACK]
    assert ack.delivery.status is DeliveryStatus.QUEUED and ack.delivery.attempts == 1
    assert await desk.outbox.deliver_due() == 0  # not due yet
    desk.clock.advance(seconds=2)
    assert await desk.outbox.deliver_due() == 1
    [ack] = [m for m in await desk.store.conversation_messages(conv.id) if m.kind is Kind.ACK]
    assert ack.delivery.status is DeliveryStatus.SENT

    bob = (await add_agents(desk.store, "bob"))["bob"]
    reply = await desk.desk.reply(conv.ref, bob, "hi")
    await desk.outbox.deliver_due()
    failed = await desk.store.get_message(reply.id)
    assert failed.delivery.status is DeliveryStatus.FAILED and "404" in failed.delivery.error
    retried = await desk.desk.retry_delivery(reply.id)
    assert retried.delivery.status is DeliveryStatus.QUEUED
    await desk.outbox.deliver_due()
    assert (await desk.store.get_message(reply.id)).delivery.status is DeliveryStatus.SENT
    assert [r["id"] for r in receiver.received].count(reply.id) == 2  # same delivery id on retry


async def test_a_claimed_batch_threads_like_one_message_after_another(desk: Desk_) -> None:
    """Workers thread a batch's messages in one store step: several per
    customer and several customers in one batch still make one conversation
    per customer, every message in it once, and one ack each."""
    senders = ["u-a", "u-b", "u-a", "u-c", "u-b", "u-a", "u-d", "u-c"]
    for i, sender in enumerate(senders):
        await desk.queue(f"question {i} about my deposit", sender=sender)
    await desk.pipeline.drain()
    found = {c.customer.id: c for c in await conversations(desk)}
    assert sorted(found) == ["u-a", "u-b", "u-c", "u-d"]
    for sender, conversation in found.items():
        history = await desk.store.conversation_messages(conversation.id)
        texts = [m.text for m in history if m.direction is Direction.IN]
        assert texts == [f"question {i} about my deposit" for i, s in enumerate(senders) if s == sender]
        assert [m.kind for m in history].count(Kind.ACK) == 1
        assert conversation.message_count == len(history)


async def handled(desk: Desk_, message: Message) -> bool:
    stored = await desk.store.get_message(message.id)
    return stored is not None and stored.conversation_id is not None


async def wait_until(check: Callable[[], Awaitable[bool]], within_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not handled in time"
        await asyncio.sleep(0.02)


async def test_agent_reply_answers_the_customer_not_their_auto_reply(desk: Desk_) -> None:
    question = await desk.receive("my deposit is missing")
    await desk.receive("I am out of office until Monday", auto_generated=True)
    [conversation] = await conversations(desk)
    agent = (await add_agents(desk.store, "ann"))["ann"]
    reply = await desk.desk.reply(conversation.ref, agent, "We found it, it is credited now.")
    assert reply.in_reply_to == question.external_id
