"""Outbound delivery as the customer and the desk see it: what a receiver's
answers do to the number of sends and to the reply's final status."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from channels.telegram import TelegramChannel, TelegramSettings
from channels.webhook import WebhookChannel
from router import agents, triage
from router import config as configuration
from router.acks import Templates
from router.daemon import Daemon
from router.desk import Desk
from router.errors import StoreError
from router.model import (
    Agent,
    Conversation,
    Delivery,
    DeliveryStatus,
    InboxQuery,
    Message,
    Role,
    parse_time,
    utcnow,
)
from router.outbox import Outbox
from router.pipeline import Pipeline
from router.store.sqlite import SQLiteStore
from tests.botapi import TOKEN, BotAPI
from tests.conftest import Running, customer_message, free_socket, serving, write_config
from tests.test_telegram import telegram_config


class Answering:
    """A reply_url that answers every POST with the status and headers the
    test sets, and records what it got."""

    def __init__(self) -> None:
        self.url = ""
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        self.headers: dict[str, str] = {}
        self.delay_s = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.json())
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status, headers=self.headers)


@pytest.fixture
async def answering() -> AsyncIterator[Answering]:
    peer = Answering()
    app = web.Application()
    app.router.add_post("/replies", peer.handle)
    async with serving(app) as base:
        peer.url = f"{base}/replies"
        yield peer


async def until(check: Callable[[], bool], within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def ack_delivery(router: Running) -> dict[str, Any]:
    _, inbox = await router.api("GET", "/api/v1/conversations")
    ref = inbox["conversations"][0]["ref"]
    _, conversation = await router.api("GET", f"/api/v1/conversations/{ref}")
    [ack] = [m for m in conversation["messages"] if m["kind"] == "ack"]
    return ack["delivery"]


async def test_a_retry_after_of_ages_keeps_the_ack_queued_and_posts_it_once(
    start_daemon, answering: Answering
) -> None:
    """A receiver (or the proxy in front) asking to wait longer than the
    calendar goes must not take the outbox down: before, every restart of
    the outbox loop re-sent the ack, with no attempt ever counted."""
    answering.status = 503
    answering.headers = {"Retry-After": "99999999999999"}
    router = await start_daemon(reply_url=answering.url)
    await router.post_message({"id": "r-1", "from": {"id": "u-1"}, "text": "what is the fee?"})
    await until(lambda: len(answering.posts) >= 1)
    await asyncio.sleep(1.5)
    assert len(answering.posts) == 1
    delivery = await ack_delivery(router)
    assert (delivery["status"], delivery["attempts"]) == ("queued", 1)
    assert "503" in delivery["error"]


async def test_a_desk_that_retries_for_weeks_keeps_counting_past_1024_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answering: Answering
) -> None:
    """`outbox.max_attempts = 2000` (keep trying for a fortnight at the 10m
    cap): the exponential backoff of attempt 1025 is past what a float holds.
    Before, the outbox loop crashed there and every restart re-sent the ack
    without counting the attempt, so the retries never ended."""
    monkeypatch.chdir(tmp_path)
    answering.status = 503
    answering.headers = {"Retry-After": "60"}  # so each try shows as one POST
    path = write_config(tmp_path, answering.url)
    path.write_text(path.read_text().replace("max_attempts = 3", "max_attempts = 2000"))
    daemon = Daemon(configuration.load(str(path)))
    sock = free_socket()
    await daemon.start(sock)
    router = Running(daemon, f"http://127.0.0.1:{sock.getsockname()[1]}", aiohttp.ClientSession())
    try:
        await router.post_message({"id": "w-1", "from": {"id": "u-1"}, "text": "what is the fee?"})
        await until(lambda: len(answering.posts) == 1)
        ack_id = answering.posts[0]["id"]
        for _ in range(100):
            ack = await daemon.store.get_message(ack_id)
            if ack and ack.delivery and ack.delivery.attempts == 1:
                break
            await asyncio.sleep(0.05)
        # A week of outage later: the 1024th try failed too, the next is due.
        await daemon.store.record_delivery(
            ack_id, Delivery(DeliveryStatus.QUEUED, 1024, "HTTP 503", utcnow())
        )
        await until(lambda: len(answering.posts) == 2)
        await asyncio.sleep(1.5)
        assert len(answering.posts) == 2
        ack = await daemon.store.get_message(ack_id)
        assert ack is not None and ack.delivery is not None
        assert (ack.delivery.status, ack.delivery.attempts) == (DeliveryStatus.QUEUED, 1025)
    finally:
        await router.http.close()
        await daemon.stop()


@pytest.fixture
async def api() -> AsyncIterator[BotAPI]:
    emulator = await BotAPI().start()
    yield emulator
    await emulator.stop()


async def test_replies_queued_together_reach_the_chat_whole_and_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: BotAPI
) -> None:
    """Two long replies an agent queued while the outbox was busy (or the
    daemon down) go out in one claim. Each is cut into pieces; the customer
    must read the ack, then all of the first reply, then the second. Before,
    the batch was sent all at once and the pieces alternated in the chat."""
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, None, telegram_config(api, "polling", "https://support.example.com"))
    config = configuration.load(str(path))
    store = SQLiteStore(config.settings.store.url)
    await store.open()
    tg = TelegramChannel("tg", TelegramSettings(token=TOKEN, api_url=api.url), tmp_path)
    pipeline = Pipeline(store, config, triage.load_rules(), Templates(None))
    await tg.open(pipeline.accept)
    try:
        api.say(BotAPI.user(101, "Ann"), "where is my withdrawal?")
        for update in list(api.pending.values()):
            await tg.receive(json.dumps(update).encode())
        await pipeline.drain()
        [conversation] = (await store.list_conversations(InboxQuery(status=None))).conversations
        await agents.create(store, "bob", ["support"], Role.AGENT)
        bob = await store.get_agent("bob")
        assert bob is not None
        desk = Desk(store, config)
        first = "\n\n".join(f"First reply, part {n}. " + "word " * 700 for n in range(1, 4))
        second = "\n\n".join(f"Second reply, part {n}. " + "word " * 700 for n in range(1, 4))
        await desk.reply(conversation.ref, bob, first)
        await desk.reply(conversation.ref, bob, second)

        await Outbox(store, config, {"tg": tg}).deliver_due()

        sent = api.sent_to(101)
        assert conversation.ref in sent[0]["text"], "the ack first"
        assert [m["text"].split(".")[0] for m in sent[1:]] == [
            "First reply, part 1",
            "First reply, part 2",
            "First reply, part 3",
            "Second reply, part 1",
            "Second reply, part 2",
            "Second reply, part 3",
        ]
    finally:
        await tg.close()
        await store.close()


async def test_a_retry_after_given_as_a_date_is_waited_for(start_daemon, answering: Answering) -> None:
    """RFC 9110 lets Retry-After be an HTTP date ("back at 14:00" from a
    receiver in maintenance). Before, only whole seconds were read: a date
    was ignored and the retries ran out within minutes, the reply `dead`."""
    answering.status = 503
    back_at = datetime.now(UTC) + timedelta(minutes=2)
    answering.headers = {"Retry-After": format_datetime(back_at, usegmt=True)}
    router = await start_daemon(reply_url=answering.url)
    await router.post_message({"id": "d-1", "from": {"id": "u-1"}, "text": "what is the fee?"})
    await until(lambda: len(answering.posts) >= 1)
    await asyncio.sleep(2)
    assert len(answering.posts) == 1, "the outbox config's backoff_max is 1s; the date says 2 minutes"
    delivery = await ack_delivery(router)
    assert (delivery["status"], delivery["attempts"]) == ("queued", 1)
    assert parse_time(delivery["next_attempt_at"]) >= back_at.replace(microsecond=0)


@dataclass
class PushDesk:
    """A desk whose `web` channel pushes to `answering`: customers' messages
    handled (their acks queued), and agent bob to reply."""

    config: configuration.Config
    store: SQLiteStore
    channel: WebhookChannel
    bob: Agent

    async def conversations(self) -> dict[str, Conversation]:
        listed = (await self.store.list_conversations(InboxQuery(status=None))).conversations
        return {c.customer.id: c for c in listed}

    async def reply(self, conversation: Conversation, text: str) -> Message:
        return await Desk(self.store, self.config).reply(conversation.ref, self.bob, text)


@contextlib.asynccontextmanager
async def push_desk(
    tmp_path: Path, answering: Answering, senders: list[str], store_type: type[SQLiteStore] = SQLiteStore
) -> AsyncIterator[PushDesk]:
    config = configuration.load(str(write_config(tmp_path, answering.url)))
    store = store_type(config.settings.store.url)
    await store.open()
    options = WebhookChannel.Settings.model_validate(config.settings.channels[0].options)
    channel = WebhookChannel("web", options, tmp_path)
    try:
        pipeline = Pipeline(store, config, triage.load_rules(), Templates(None))
        for sender in senders:
            await pipeline.accept(customer_message("what is the fee?", sender))
        await pipeline.drain()
        await agents.create(store, "bob", ["support"], Role.AGENT)
        bob = await store.get_agent("bob")
        assert bob is not None
        yield PushDesk(config, store, channel, bob)
    finally:
        await channel.close()
        await store.close()


async def test_a_slow_receiver_never_gets_a_reply_twice_from_two_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answering: Answering
) -> None:
    """One conversation's messages go out one after another. Were a sender
    to keep starting them after its claim ran out, another daemon (here a
    second Outbox on the same store) would take the claim over and send the
    same reply too."""
    monkeypatch.chdir(tmp_path)
    answering.delay_s = 0.3
    async with push_desk(tmp_path, answering, ["u-1"]) as desk:
        conversation = (await desk.conversations())["u-1"]
        replies = [await desk.reply(conversation, f"Reply {n}.") for n in range(3)]
        channels = {"web": desk.channel}
        first, second = (
            Outbox(desk.store, desk.config, channels, consumer=c, visibility_s=1.0) for c in "ab"
        )

        async def keep_sending(outbox: Outbox, for_s: float) -> None:
            loop = asyncio.get_running_loop()
            until_s = loop.time() + for_s
            while loop.time() < until_s:
                if not await outbox.deliver_due():
                    await asyncio.sleep(0.05)

        await asyncio.gather(keep_sending(first, 2.5), keep_sending(second, 2.5))
        assert [post["text"] for post in answering.posts][1:] == [reply.text for reply in replies]
        assert len(answering.posts) == 4


class ForgetfulStore(SQLiteStore):
    """The real store, failing to record one message's outcome (the store
    went away for a moment, mid-batch)."""

    refuse = ""

    async def record_delivery(self, message_id: str, delivery: Delivery) -> Message:
        if message_id == self.refuse:
            self.refuse = ""
            raise StoreError("the store went away")
        return await super().record_delivery(message_id, delivery)


async def test_a_store_hiccup_mid_batch_does_not_send_the_rest_of_the_batch_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answering: Answering
) -> None:
    """One outcome that could not be recorded fails the batch, and the
    restarted loop takes its claims back at once. Before, the failure was
    raised while another conversation's reply was still on its way, so the
    restart sent that reply again; now the batch ends first, and only the
    message whose outcome was lost goes again (with the same delivery id)."""
    monkeypatch.chdir(tmp_path)
    answering.delay_s = 0.3
    async with push_desk(tmp_path, answering, ["u-1", "u-2"], ForgetfulStore) as desk:
        by_customer = await desk.conversations()
        reply = await desk.reply(by_customer["u-1"], "It is 0.0002 BTC.")
        [_, lost] = await desk.store.conversation_messages(by_customer["u-2"].id)  # the customer's, the ack
        assert isinstance(desk.store, ForgetfulStore)
        desk.store.refuse = lost.id
        outbox = Outbox(desk.store, desk.config, {"web": desk.channel})
        with pytest.raises(StoreError):
            await outbox.deliver_due()
        await outbox.deliver_due()
        posted = [post["id"] for post in answering.posts]
        assert posted.count(reply.id) == 1, "the reply in flight was sent again"
        assert posted.count(lost.id) == 2, "at least once: the send whose outcome was lost goes again"
        assert len(posted) == 4
