"""The Telegram channel against the Bot API emulator (tests/botapi.py).

The adapter talks to the emulator only through python-telegram-bot's
`base_url`, so these tests run the library's real requests. Tables first
(which updates are taken, how they read, how errors translate), then the
daemon in polling and webhook mode, then the daemon as a real process
killed mid-stream.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from telegram import Bot
from telegram.error import Conflict

from channels.telegram import TelegramChannel, TelegramSettings
from channels.telegram_updates import split_text
from router import config as configuration
from router.daemon import Daemon
from router.errors import PermanentFailure, TemporaryFailure
from router.model import (
    Accepted,
    Conversation,
    DeadLetter,
    DeliveryStatus,
    Direction,
    InboxQuery,
    Kind,
    Message,
    Party,
    new_id,
    utcnow,
)
from tests.botapi import SECRET_HEADER, TOKEN, BotAPI
from tests.conftest import Running, free_port, free_socket, write_config
from tests.test_daemon_process import REPO, admin_token, spawn, stop, wait_ready
from tests.test_http_edge_cases import raw_exchange

FEES = "what is the withdrawal fee for USDT on TRC20? order {n}"
STOLEN = "someone logged in and withdrew all my USDT, I did not do it"


@pytest.fixture
async def api() -> AsyncIterator[BotAPI]:
    emulator = await BotAPI().start()
    yield emulator
    await emulator.stop()


class ChannelStoreInMemory:
    """The part of the store a channel uses, in memory: what two daemons on
    one store share."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, str] = {}
        self.dead_letters: list[DeadLetter] = []

    async def get_checkpoint(self, key: str) -> str | None:
        return self.checkpoints.get(key)

    async def put_checkpoint(self, key: str, value: str) -> None:
        self.checkpoints[key] = value

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> DeadLetter:
        self.dead_letters.append(DeadLetter(new_id("d"), channel, payload, error, 1, utcnow()))
        return self.dead_letters[-1]


@pytest.fixture
async def channel(api: BotAPI, tmp_path: Path) -> AsyncIterator[tuple[TelegramChannel, list[Message]]]:
    """The adapter alone, its sink a list, its store in memory."""
    adapter = TelegramChannel("tg", TelegramSettings(token=TOKEN, api_url=api.url), tmp_path)
    adapter.bind_store(ChannelStoreInMemory())
    taken: list[Message] = []

    async def sink(message: Message) -> Accepted:
        taken.append(message)
        return Accepted(message.id, None, duplicate=False)

    await adapter.open(sink)
    yield adapter, taken
    await adapter.close()


async def feed(adapter: TelegramChannel, api: BotAPI) -> None:
    """Hand every pending update to the adapter as Telegram's webhook would."""
    for update in list(api.pending.values()):
        await adapter.receive(json.dumps(update).encode())
    api.pending.clear()


async def eventually(check: Callable[[], object], what: str, within_s: float = 20) -> None:
    """Until `check()` (or what it awaits) is truthy."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- which updates are taken ---------------------------------------------------

ANN = BotAPI.user(101, "Ann", "Lee", username="annlee", language_code="zh-hans")
BOB = BotAPI.user(102, "Bob")
GROUP = BotAPI.group(-1001, "Traders")


def _bot_message(api: BotAPI) -> dict[str, Any]:
    """Something the bot said in the group, as a reply to it quotes it."""
    return {"message_id": 99, "from": api.me, "chat": GROUP, "date": 1, "text": "How can we help?"}


ADDRESSING = [
    ("private text", lambda api: api.say(ANN, "hi"), True),
    ("private photo without caption", lambda api: api.say(ANN, photo=True), True),
    ("private sticker", lambda api: api.push_raw({"message": _sticker()}), False),
    ("group chatter", lambda api: api.say(BOB, "anyone here?", chat=GROUP), False),
    ("group mention", lambda api: api.say(BOB, "@acme_support_bot my deposit", chat=GROUP), True),
    ("group mention, other case", lambda api: api.say(BOB, "hey @ACME_Support_Bot", chat=GROUP), True),
    ("group mention of another bot", lambda api: api.say(BOB, "@other_helper_bot hi", chat=GROUP), False),
    ("group command to the bot", lambda api: api.say(BOB, "/help@acme_support_bot", chat=GROUP), True),
    (
        "group caption mention",
        lambda api: api.say(BOB, caption="@acme_support_bot", photo=True, chat=GROUP),
        True,
    ),
    (
        "group reply to another user",
        lambda api: api.say(BOB, "+1", chat=GROUP, reply_to=api.say(ANN, "x")),
        False,
    ),
    ("group service message", lambda api: api.push_raw({"message": _joined()}), False),
    ("private /start", lambda api: api.say(ANN, "/start"), False),
    ("group /start for another bot", lambda api: api.say(BOB, "/start@other_helper_bot", chat=GROUP), False),
]


def _sticker() -> dict[str, Any]:
    sticker = {"file_id": "s1", "file_unique_id": "su1", "type": "regular", "width": 512, "height": 512}
    sticker |= {"is_animated": False, "is_video": False}
    chat = {"id": 101, "type": "private", "first_name": "Ann"}
    return {"message_id": 50, "date": 1, "chat": chat, "from": ANN, "sticker": sticker}


def _joined() -> dict[str, Any]:
    return {"message_id": 51, "date": 1, "chat": GROUP, "from": BOB, "new_chat_members": [BOB]}


@pytest.mark.parametrize(("case", "make", "taken"), ADDRESSING, ids=[row[0] for row in ADDRESSING])
async def test_which_updates_become_messages(channel, api: BotAPI, case: str, make, taken: bool) -> None:
    adapter, messages = channel
    api.pending.clear()
    make(api)
    last = list(api.pending.values())[-1]
    api.pending.clear()
    await adapter.receive(json.dumps(last).encode())
    assert bool(messages) is taken


async def test_a_reply_to_the_bot_in_a_group_is_taken(channel, api: BotAPI) -> None:
    adapter, messages = channel
    bot_said = _bot_message(api)
    api.pending.clear()
    api.say(BOB, "it still is not there", chat=GROUP, reply_to=bot_said)
    await feed(adapter, api)
    [message] = messages
    assert message.thread_key == "-1001" and message.sender.id == "102"
    assert message.quoted == "How can we help?" and message.references == ["-1001:99"]


# -- how they read ---------------------------------------------------------------


async def test_a_message_reads_as_sender_chat_text_language_and_attachments(channel, api: BotAPI) -> None:
    adapter, messages = channel
    first = api.say(ANN, "my deposit is missing")
    api.say(BotAPI.user(103, "Иван", language_code="en"), "у меня украли деньги")
    api.say(
        ANN, caption="receipt attached", document={"file_name": "receipt.pdf", "mime_type": "application/pdf"}
    )
    api.say(ANN, photo=True)
    await feed(adapter, api)
    text, russian, document, photo = messages
    assert text.external_id == f"101:{first['message_id']}" and text.thread_key == "101"
    assert (text.sender.id, text.sender.name, text.sender.address) == ("101", "Ann Lee", "@annlee")
    assert text.channel_type == "telegram" and text.direction is Direction.IN and text.kind is Kind.CUSTOMER
    assert text.language == "zh", "Latin text takes the user's language_code as the hint"
    assert russian.language == "ru", "the script outweighs the hint"
    assert document.text == "receipt attached"
    assert [(a.filename, a.content_type, a.size) for a in document.attachments] == [
        ("receipt.pdf", "application/pdf", 1000)
    ]
    assert photo.text == "" and [(a.content_type, a.size) for a in photo.attachments] == [
        ("image/jpeg", 64_000)
    ]
    assert photo.attachments[0].filename.startswith("pAgAC"), "the file id names an unnamed photo"


async def test_edits_name_the_message_they_change(channel, api: BotAPI) -> None:
    adapter, messages = channel
    sent = api.say(ANN, "hello")
    api.edit(sent, "hello, my withdrawal is stuck")
    await feed(adapter, api)
    original, edit = messages
    assert edit.edit_of == original.external_id and edit.external_id.startswith(
        original.external_id + ":edit:"
    )
    assert edit.text == "hello, my withdrawal is stuck"


async def test_a_redelivered_update_is_dropped_and_a_malformed_one_skipped(
    channel, api: BotAPI, caplog
) -> None:
    adapter, messages = channel
    api.say(ANN, "first")
    bad = api.push_raw({"message": {"message_id": 7, "chat": {"id": 101}}})
    api.say(ANN, "second")
    updates = list(api.pending.values())
    for update in [*updates, updates[0]]:
        await adapter.receive(json.dumps(update).encode())
    await adapter.receive(b"not json")
    assert [m.text for m in messages] == ["first", "second"]
    assert f"skipped malformed update {bad}" in caplog.text


async def test_start_gets_the_welcome_in_the_users_language(channel, api: BotAPI) -> None:
    adapter, messages = channel
    start = api.say(ANN, "/start")
    await feed(adapter, api)
    await eventually(lambda: api.sent, "the welcome")
    [welcome] = api.sent
    assert not messages
    assert welcome["chat"]["id"] == 101 and welcome["reply_to_message"]["message_id"] == start["message_id"]
    assert welcome["text"].startswith("Ann，您好") and "助记词" in welcome["text"]


# -- outbound --------------------------------------------------------------------

SPLITS = [
    ("short", "hello", 10, ["hello"]),
    ("at a paragraph", "aaaa bbbb\n\ncccc", 12, ["aaaa bbbb", "cccc"]),
    ("at a line", "aaaaaaa\nbb cc", 12, ["aaaaaaa", "bb cc"]),
    ("not in the first half", "aa\nbbbbbbbb cc", 12, ["aa\nbbbbbbbb", "cc"]),
    ("at a space", "aaaa bbbb cccc", 10, ["aaaa bbbb", "cccc"]),
    ("hard when one word", "x" * 25, 10, ["x" * 10, "x" * 10, "x" * 5]),
    ("emoji count twice", "😀" * 6, 4, ["😀😀", "😀😀", "😀😀"]),
    ("whitespace only", "  \n ", 10, []),
]


@pytest.mark.parametrize(("case", "text", "limit", "pieces"), SPLITS, ids=[row[0] for row in SPLITS])
def test_long_text_splits_cleanly(case: str, text: str, limit: int, pieces: list[str]) -> None:
    assert split_text(text, limit) == pieces


def _outbound(text: str, in_reply_to: str | None, chat_id: int = 101) -> tuple[Message, Conversation]:
    now = utcnow()
    customer = Party(id=str(chat_id))
    message = Message(
        "m_out", "tg", "telegram", Direction.OUT, Kind.AGENT, "m_out", Party("admin"), text, now
    )
    message.in_reply_to = in_reply_to
    return message, Conversation("c_1", "tg", customer, str(chat_id), now, now)


FAULTS = [
    ("429 flood control", dict(status=429, retry_after=3), TemporaryFailure, "retry after 3 s"),
    ("502 from the proxy", dict(status=502), TemporaryFailure, "Telegram unreachable: Bad Gateway"),
    ("500", dict(status=500), TemporaryFailure, "Telegram unreachable"),
    (
        "403 blocked",
        dict(status=403),
        PermanentFailure,
        "Telegram refused: Forbidden: bot was blocked by the user",
    ),
    (
        "400 chat not found",
        dict(status=400),
        PermanentFailure,
        "Telegram rejected the request: Chat not found",
    ),
]


@pytest.mark.parametrize(("case", "fault", "error", "reason"), FAULTS, ids=[row[0] for row in FAULTS])
async def test_send_errors_are_translated(channel, api: BotAPI, case: str, fault, error, reason: str) -> None:
    adapter, _ = channel
    api.say(ANN, "hi")
    api.fail("sendMessage", **fault)
    with pytest.raises(error) as raised:
        await adapter.send(*_outbound("On it.", "101:1"))
    assert reason in raised.value.reason
    if fault["status"] == 429:
        assert raised.value.retry_after_s == 3


async def test_send_replies_splits_and_resumes_where_it_failed(channel, api: BotAPI) -> None:
    adapter, _ = channel
    asked = api.say(ANN, "tell me everything")
    text = ("word " * 1000).strip() + "\n\n" + ("more " * 1000).strip()
    api.fail("sendMessage", 502, skip=1)
    message, conversation = _outbound(text, f"101:{asked['message_id']}")
    with pytest.raises(TemporaryFailure):
        await adapter.send(message, conversation)
    external_id = await adapter.send(message, conversation)
    pieces = api.sent_to(101)
    assert len(pieces) == len(split_text(text, 4096)) == 3, (
        "the piece that failed was sent once, after the first"
    )
    assert " ".join(p["text"] for p in pieces).split() == text.split(), "no word cut"
    assert all(len(p["text"]) <= 4096 and p["text"] == p["text"].strip() for p in pieces)
    assert external_id == f"101:{pieces[0]['message_id']}"
    assert pieces[0]["reply_to_message"]["message_id"] == asked["message_id"]
    assert all("reply_to_message" not in p for p in pieces[1:])


async def test_another_daemon_resumes_a_long_reply_where_the_first_stopped(
    channel, api: BotAPI, tmp_path: Path
) -> None:
    """The first daemon got one piece out, then failed; the retry runs in
    another process (or after a restart): the customer reads each piece once."""
    first, _ = channel
    assert first.store is not None
    second = TelegramChannel("tg", TelegramSettings(token=TOKEN, api_url=api.url), tmp_path)
    second.bind_store(first.store)
    asked = api.say(ANN, "tell me everything")
    text = ("word " * 1000).strip() + "\n\n" + ("more " * 1000).strip()
    message, conversation = _outbound(text, f"101:{asked['message_id']}")
    api.fail("sendMessage", 502, skip=1)
    with pytest.raises(TemporaryFailure):
        await first.send(message, conversation)
    try:
        external_id = await second.send(message, conversation)
        assert await second.send(message, conversation) == external_id, "a redelivery after the last piece"
    finally:
        await second.close()
    pieces = api.sent_to(101)
    assert [p["text"] for p in pieces] == split_text(text, 4096), "each piece once, in order"
    assert external_id == f"101:{pieces[0]['message_id']}"


async def test_a_migrated_group_gets_the_reply_in_its_new_chat(channel, api: BotAPI) -> None:
    adapter, _ = channel
    api.say(BOB, "hi", chat=GROUP)
    api.say(BOB, "hi", chat=BotAPI.group(-1002, "Traders (supergroup)"))
    api.fail("sendMessage", 400, description="Bad Request: group chat was upgraded", migrate_to_chat_id=-1002)
    assert (await adapter.send(*_outbound("On it.", None, chat_id=-1001))).startswith("-1002:")


async def test_network_errors_are_temporary_and_a_bad_token_permanent(api: BotAPI, tmp_path: Path) -> None:
    down = TelegramChannel(
        "tg", TelegramSettings(token=TOKEN, api_url=f"http://127.0.0.1:{free_port()}"), tmp_path
    )
    with pytest.raises(TemporaryFailure, match="Telegram unreachable"):
        await down.check()
    await down.close()
    wrong = TOKEN[:-4] + "zzzz"
    rejected = TelegramChannel("tg", TelegramSettings(token=wrong, api_url=api.url), tmp_path)
    with pytest.raises(PermanentFailure) as raised:
        await rejected.check()
    await rejected.close()
    assert raised.value.reason == "Telegram rejected the bot token" and wrong not in str(raised.value)


# -- the emulator itself -----------------------------------------------------------


async def test_the_emulator_keeps_the_documented_rules(api: BotAPI) -> None:
    """What the adapter does not exercise, through the library and raw HTTP."""
    async with Bot(TOKEN, base_url=f"{api.url}/bot") as bot:
        for n in range(3):
            api.say(ANN, f"m{n}")
        assert [u.message.text for u in await bot.get_updates(offset=-2)] == ["m1", "m2"]
        assert len(api.pending) == 2, "a negative offset forgets the older updates"
        waiting = asyncio.create_task(bot.get_updates(offset=max(api.pending) + 1, timeout=5))
        await asyncio.sleep(0.2)
        async with Bot(TOKEN, base_url=f"{api.url}/bot") as second_instance:
            assert await second_instance.get_updates() == ()
        with pytest.raises(Conflict, match="terminated by other getUpdates"):
            await waiting
        waiting = asyncio.create_task(bot.get_updates(timeout=5))
        await asyncio.sleep(0.2)
        late = api.say(ANN, "late")
        [update] = await asyncio.wait_for(waiting, 1.0)
        assert update.message.text == "late", "a long poll answers as soon as an update arrives"
        await bot.set_webhook("http://127.0.0.1:9/hook", secret_token="s3cret")
        with pytest.raises(Conflict, match="webhook is active"):
            await bot.get_updates()
        assert (await bot.get_webhook_info()).pending_update_count == 1
        await bot.delete_webhook(drop_pending_updates=True)
        assert await bot.get_updates() == ()
    async with aiohttp.ClientSession() as http:
        form = {"chat_id": "101", "text": "hi", "reply_to_message_id": str(late["message_id"])}
        async with http.post(f"{api.url}/bot{TOKEN}/sendMessage", data=form) as resp:
            answer = await resp.json()
        assert answer["ok"] and answer["result"]["reply_to_message"]["message_id"] == late["message_id"]
        async with http.post(f"{api.url}/bot{TOKEN[:-1]}x/getMe") as resp:
            assert (resp.status, await resp.json()) == (
                401,
                {"ok": False, "error_code": 401, "description": "Unauthorized"},
            )
        async with http.post(f"{api.url}/bot{TOKEN}/getChat") as resp:
            assert resp.status == 404


# -- the daemon, polling and webhook ------------------------------------------------


def telegram_config(api: BotAPI, mode: str, public_url: str, token: str = TOKEN) -> str:
    return f"""
[server]
public_url = "{public_url}"

[[channels]]
name = "tg"
type = "telegram"
token = "{token}"
mode = "{mode}"
api_url = "{api.url}"
"""


@pytest.fixture
async def start_router(
    api: BotAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[Callable[[str], Awaitable[Running]]]:
    """A daemon in this event loop with a `tg` channel on the emulator."""
    monkeypatch.chdir(tmp_path)
    started: list[Running] = []

    async def start(mode: str) -> Running:
        sock = free_socket()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = configuration.load(str(write_config(tmp_path, None, telegram_config(api, mode, base))))
        daemon = Daemon(config)
        await daemon.start(sock)
        out = capsys.readouterr().out
        token = next(line.rsplit(" ", 1)[1] for line in out.splitlines() if "admin agent" in line)
        running = Running(daemon, base, aiohttp.ClientSession(), token)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.http.close()
        await running.daemon.stop()


async def conversations(router: Running) -> dict[str, tuple[Conversation, list[Message]]]:
    """Every conversation of the `tg` channel by its thread key, with its messages."""
    store = router.daemon.store
    page = await store.list_conversations(InboxQuery(status=None, limit=500))
    found = {}
    for conversation in page.conversations:
        if conversation.channel == "tg":
            found[conversation.thread_key] = (
                conversation,
                await store.conversation_messages(conversation.id),
            )
    return found


def thirty_users() -> list[dict[str, Any]]:
    return [BotAPI.user(1000 + i, f"User{i}", f"N{i}", username=f"user_{i:02d}") for i in range(30)]


async def assert_300_messages_threaded_acked_and_answered(router: Running, api: BotAPI) -> None:
    """Each of 30 users sent 10: one conversation per chat with all 10, once;
    one ack per chat, replying to one of that customer's messages; an agent
    reply goes to the right chat."""
    users = thirty_users()
    said: dict[int, list[dict[str, Any]]] = {u["id"]: [] for u in users}
    for n in range(10):
        for i, user in enumerate(users):
            text = STOLEN if (i % 7 == 0 and n == 3) else FEES.format(n=f"{user['id']}-{n}")
            said[user["id"]].append(api.say(user, text))

    async def all_in() -> bool:
        found = await conversations(router)
        inbound = sum(1 for _, messages in found.values() for m in messages if m.direction is Direction.IN)
        return inbound >= 300 and await router.daemon.store.inbound_backlog() == 0

    await eventually(all_in, "300 messages in the inbox")
    await eventually(lambda: len(api.sent) >= 30, "30 acks")
    found = await conversations(router)
    assert sorted(found) == sorted(str(u["id"]) for u in users)
    for user in users:
        conversation, messages = found[str(user["id"])]
        inbound = [m.external_id for m in messages if m.direction is Direction.IN]
        assert sorted(inbound) == sorted(f"{user['id']}:{m['message_id']}" for m in said[user["id"]])
        assert conversation.customer.id == str(user["id"]) and conversation.customer.address == user_handle(
            user
        )
        assert conversation.urgency.value == ("critical" if (user["id"] - 1000) % 7 == 0 else "normal")
        [ack] = api.sent_to(user["id"])
        assert conversation.ref in ack["text"]
        assert ack["reply_to_message"]["message_id"] in {m["message_id"] for m in said[user["id"]]}

    target = users[4]
    ref = found[str(target["id"])][0].ref
    status, queued = await router.api("POST", f"/api/v1/conversations/{ref}/messages", {"text": "On it."})
    assert status == 202
    await eventually(lambda: len(api.sent_to(target["id"])) == 2, "the agent reply")
    reply = api.sent_to(target["id"])[-1]
    assert reply["text"] == "On it." and reply["reply_to_message"]["from"]["id"] == target["id"]
    await eventually(lambda: _delivered(router, queued["id"]), "the reply marked sent")
    assert len(api.sent) == 31, "nothing was sent twice"


def user_handle(user: dict[str, Any]) -> str:
    return f"@{user['username']}"


async def _delivered(router: Running, message_id: str) -> bool:
    message = await router.daemon.store.get_message(message_id)
    return (
        message is not None
        and message.delivery is not None
        and message.delivery.status is DeliveryStatus.SENT
    )


async def test_polling_300_messages_through_502s_429s_and_a_malformed_update(
    start_router, api: BotAPI, caplog
) -> None:
    api.fail("getUpdates", 502, times=2)
    api.fail("getUpdates", 429, skip=1, retry_after=1)
    api.fail("sendMessage", 429, retry_after=1)
    api.fail("sendMessage", 502, skip=3, times=2)
    broken = api.push_raw({"message": {"message_id": 1, "chat": {"id": 5, "type": "private"}}})
    router = await start_router("polling")
    await assert_300_messages_threaded_acked_and_answered(router, api)
    assert f"skipped malformed update {broken}" in caplog.text
    [dead] = await router.daemon.store.list_dead_letters()
    assert dead.channel == "tg" and json.loads(dead.payload)["update_id"] == broken
    assert api.webhook is None and api.calls["deletewebhook"] == 1


async def test_webhook_300_messages_each_delivered_twice(start_router, api: BotAPI) -> None:
    api.deliver_twice = True
    api.push_raw({"message": {"message_id": 1, "chat": {"id": 5, "type": "private"}}})
    router = await start_router("webhook")
    await eventually(lambda: api.webhook, "setWebhook")
    assert api.webhook is not None
    assert api.webhook["url"] == f"{router.base}/channels/tg/telegram"
    assert TOKEN not in api.webhook["url"] and TOKEN.split(":")[1] not in api.webhook["url"]
    await assert_300_messages_threaded_acked_and_answered(router, api)
    await eventually(lambda: not api.pending, "every update delivered")
    assert {status for _, status in api.deliveries} == {200}
    assert len(api.deliveries) == 2 * 301


async def test_webhook_ingress_checks_the_secret_before_anything(start_router, api: BotAPI) -> None:
    router = await start_router("webhook")
    await eventually(lambda: api.webhook, "setWebhook")
    assert api.webhook is not None
    chat = {"id": 101, "type": "private", "first_name": "Ann"}
    message = {"message_id": 1, "date": 1, "chat": chat, "from": ANN, "text": "forged"}
    update = json.dumps({"update_id": 1, "message": message}).encode()
    url = f"{router.base}/channels/tg/telegram"
    for headers, status in [
        ({}, 401),
        ({SECRET_HEADER: "forged"}, 401),
        ({SECRET_HEADER: api.webhook["secret_token"][:-1] + "x"}, 401),
    ]:
        async with router.http.post(url, data=update, headers=headers) as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["code"] == "bad_secret"
    async with router.http.post(f"{router.base}/channels/web/telegram", data=update) as resp:
        assert resp.status == 404
    # A secret that is not even UTF-8 is as wrong as any other.
    request = (
        b"POST /channels/tg/telegram HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + SECRET_HEADER.encode()
        + b": \xff\xfe\r\n"
        + f"Content-Length: {len(update)}\r\nConnection: close\r\n\r\n".encode()
        + update
    )
    status, answer = await raw_exchange(router, request)
    assert status == 401 and json.loads(answer)["error"]["code"] == "bad_secret"
    assert await router.daemon.store.find_message("tg", "101:1") is None


async def test_edits_start_groups_and_a_blocked_user(start_router, api: BotAPI) -> None:
    api.block(BOB["id"])
    router = await start_router("polling")
    first = api.say(ANN, "hello, a question about my account")
    api.say(BOB, "hi there")
    start = api.say(BotAPI.user(104, "Chen", language_code="en"), "/start")
    api.say(BotAPI.user(105, "Dana"), "@acme_support_bot my deposit is missing", chat=GROUP)
    api.say(BotAPI.user(106, "Eli"), "just chatting", chat=GROUP)

    async def settled() -> bool:
        found = await conversations(router)
        return len(found) == 3 and len(api.sent) >= 3

    await eventually(settled, "three conversations and their acks")
    found = await conversations(router)
    assert sorted(found) == ["-1001", "101", "102"], "/start and group chatter open none"
    [welcome] = api.sent_to(104)
    assert welcome["reply_to_message"]["message_id"] == start["message_id"] and "Welcome" in welcome["text"]
    [group_ack] = api.sent_to(-1001)
    assert found["-1001"][0].ref in group_ack["text"]

    async def bob_failed() -> bool:
        [ack] = [m for m in (await conversations(router))["102"][1] if m.kind is Kind.ACK]
        return ack.delivery is not None and ack.delivery.status is DeliveryStatus.FAILED

    await eventually(bob_failed, "the ack to a blocked user failed")
    [ack] = [m for m in (await conversations(router))["102"][1] if m.kind is Kind.ACK]
    assert ack.delivery is not None and ack.delivery.error == (
        "Telegram refused: Forbidden: bot was blocked by the user"
    )

    api.edit(first, STOLEN)

    async def edited() -> bool:
        conversation, _ = (await conversations(router))["101"]
        return conversation.urgency.value == "critical"

    await eventually(edited, "the edit applied")
    conversation, messages = (await conversations(router))["101"]
    [original] = [m for m in messages if m.direction is Direction.IN]
    assert original.text == STOLEN and original.history == ["hello, a question about my account"]
    assert conversation.message_count == 2 and conversation.team == "security"
    assert conversation.category.value == "security"


async def test_a_group_upgraded_to_a_supergroup_keeps_its_conversation(start_router, api: BotAPI) -> None:
    """Telegram gives an upgraded group a new id: its members' next messages
    join the conversation they had (no second ticket, no second ack) and the
    agent's reply goes straight to the supergroup, answering them there."""
    router = await start_router("polling")
    dana = BotAPI.user(105, "Dana")
    group, supergroup = {"id": -4001, "type": "group", "title": "Traders"}, BotAPI.group(-1004001, "Traders")
    api.say(dana, "@acme_support_bot my deposit is missing", chat=group)
    await eventually(lambda: len(api.sent) == 1, "the ack in the group")
    api.migrate(group, supergroup, dana)
    later = api.say(dana, "@acme_support_bot still missing", chat=supergroup)

    async def joined() -> bool:
        found = await conversations(router)
        return sum(len(messages) for _, messages in found.values()) >= 3 and not api.pending

    await eventually(joined, "the message in the supergroup handled")
    found = await conversations(router)
    assert list(found) == ["-4001"], "one conversation for the group, under either id"
    conversation, messages = found["-4001"]
    assert [m.text for m in messages if m.direction is Direction.IN][-1] == "@acme_support_bot still missing"
    status, _ = await router.api(
        "POST", f"/api/v1/conversations/{conversation.ref}/messages", {"text": "Found it."}
    )
    assert status == 202
    await eventually(lambda: api.sent_to(supergroup["id"]), "the reply in the supergroup")
    [reply] = api.sent_to(supergroup["id"])
    assert reply["text"] == "Found it." and reply["reply_to_message"]["message_id"] == later["message_id"]
    assert len(api.sent) == 2, "one ack in all"


# -- the daemon as a real process -----------------------------------------------------


async def cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        *args,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_channels_test_calls_getme_and_prints_the_username(api: BotAPI, tmp_path: Path) -> None:
    config = str(write_config(tmp_path, None, telegram_config(api, "polling", "https://support.example.com")))
    code, out, _ = await cli(tmp_path, "channels", "test", "tg", "-c", config)
    assert (code, out) == (0, "tg: OK bot @acme_support_bot (polling mode)\n")
    assert api.calls["getme"] == 1
    wrong = TOKEN[:-4] + "zzzz"
    config = str(write_config(tmp_path, None, telegram_config(api, "polling", "https://x.example", wrong)))
    code, out, err = await cli(tmp_path, "channels", "test", "tg", "-c", config, "--debug")
    assert (code, out) == (1, "tg: FAIL Telegram rejected the bot token\n")
    assert wrong not in out + err and wrong.split(":")[1] not in out + err


async def test_kill_9_mid_stream_in_polling_mode_loses_nothing_and_logs_no_token(
    api: BotAPI, tmp_path: Path
) -> None:
    """The first message of 30 users (acked), then 270 more while the daemon
    is killed once about a third of those are queued; after a restart every
    message is in the inbox once and no customer got a second ack."""
    port = free_port()
    config = str(write_config(tmp_path, None, telegram_config(api, "polling", f"http://127.0.0.1:{port}")))
    proc = spawn(tmp_path, port, "-c", config, "--debug")
    await wait_ready(port, proc)
    users = thirty_users()
    said = [api.say(user, FEES.format(n=user["id"])) for user in users]
    await eventually(lambda: len(api.sent) == 30, "30 acks")

    async def stream() -> None:
        for n in range(1, 10):
            said.extend(api.say(user, FEES.format(n=f"{user['id']}-{n}")) for user in users)
            await asyncio.sleep(0.05)

    began_at = api.confirmed
    feeding = asyncio.create_task(stream())
    while api.confirmed < began_at + 90:
        await asyncio.sleep(0.005)
    proc.kill()
    proc.wait()
    assert api.pending or not feeding.done(), "killed mid-stream"
    await feeding
    first_run_log = (tmp_path / "daemon.err").read_text()
    proc = spawn(tmp_path, port, "-c", config, "--debug")
    expected = sorted(f"{m['chat']['id']}:{m['message_id']}" for m in said)
    found: dict[str, tuple[list[str], int]] = {}

    async def all_handled() -> bool:
        found.update(await inbox_through_the_api(port, tmp_path))
        return len([i for inbound, _ in found.values() for i in inbound]) >= len(expected)

    try:
        await wait_ready(port, proc)
        await eventually(lambda: not api.pending, "every update queued after the restart")
        # The queue may still hold what the killed daemon had claimed: wait for the pipeline too.
        await eventually(all_handled, "every queued message handled")
    finally:
        code, _, _, second_run_log = stop(proc, tmp_path)
    assert code == 0
    assert sorted(i for inbound, _ in found.values() for i in inbound) == expected, "each message once"
    assert sorted(found) == sorted(str(u["id"]) for u in users)
    assert all(acks == 1 for _, acks in found.values()) and len(api.sent) == 30
    for log_text in (first_run_log, second_run_log):
        assert "DEBUG" in log_text and "channel tg (telegram) started" in log_text
        assert TOKEN not in log_text and TOKEN.split(":")[1] not in log_text


async def inbox_through_the_api(port: int, cwd: Path) -> dict[str, tuple[list[str], int]]:
    """Per chat: the external ids of its inbound messages, and its acks."""
    headers = {"Authorization": f"Bearer {await admin_token(cwd)}"}
    base = f"http://127.0.0.1:{port}/api/v1/conversations"
    found: dict[str, tuple[list[str], int]] = {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}?status=all&limit=500") as resp:
            listed = (await resp.json())["conversations"]
        for conversation in listed:
            async with http.get(f"{base}/{conversation['ref']}") as resp:
                messages = (await resp.json())["messages"]
            inbound = [m["external_id"] for m in messages if m["direction"] == "in"]
            acks = sum(1 for m in messages if m["kind"] == "ack")
            found[conversation["thread_key"]] = (inbound, acks)
    return found


async def test_kill_9_between_two_pieces_of_a_long_reply_sends_no_piece_twice(
    api: BotAPI, tmp_path: Path
) -> None:
    """An agent's reply of three pieces; the daemon is killed while the
    second is in flight. After a restart the customer has read every piece
    once, in order, and the reply is marked sent."""
    port = free_port()
    config = str(write_config(tmp_path, None, telegram_config(api, "polling", f"http://127.0.0.1:{port}")))
    proc = spawn(tmp_path, port, "-c", config)
    await wait_ready(port, proc)
    api.say(ANN, "tell me everything about fees")
    await eventually(lambda: len(api.sent) == 1, "the ack")
    headers = {"Authorization": f"Bearer {await admin_token(tmp_path)}"}
    base = f"http://127.0.0.1:{port}/api/v1/conversations"
    text = ("word " * 1000).strip() + "\n\n" + ("more " * 1000).strip()
    api.hold("sendMessage", skip=1)
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{base}?status=all") as resp:
            [conversation] = (await resp.json())["conversations"]
        async with http.post(f"{base}/{conversation['ref']}/messages", json={"text": text}) as resp:
            assert resp.status == 202
            reply_id = (await resp.json())["id"]
    await eventually(lambda: api.held == 1, "the second piece in flight")
    proc.kill()
    proc.wait()
    api.release()
    assert len(api.sent_to(101)) == 2, "the ack and the first piece"
    proc = spawn(tmp_path, port, "-c", config)

    async def reply_sent() -> bool:
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.get(f"{base}/{conversation['ref']}") as resp,
        ):
            messages = (await resp.json())["messages"]
        [reply] = [m for m in messages if m["id"] == reply_id]
        return reply["delivery"]["status"] == "sent"

    try:
        await wait_ready(port, proc)
        await eventually(lambda: len(api.sent_to(101)) >= 4, "the rest of the reply")
        await eventually(reply_sent, "the reply marked sent")
    finally:
        code, _, _, _ = stop(proc, tmp_path)
    assert code == 0
    assert [m["text"] for m in api.sent_to(101)[1:]] == split_text(text, 4096), "each piece once, in order"
