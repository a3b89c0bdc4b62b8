"""Telegram (Bot API, python-telegram-bot v22): long polling or a webhook.

Inbound: polling asks getUpdates and moves the offset past a batch only once
every message in it is durably queued, so a crash re-reads the batch and the
store drops what it already holds. Webhook mode registers
`<server.public_url>/channels/<name>/telegram` with a secret on start; the
ingress route checks the secret and answers 200 only after the enqueue.
Either way an update id seen lately is dropped at once (Telegram re-sends a
webhook update it got no timely answer for), and `chat_id:message_id`
dedupes in the store. A group upgraded to a supergroup keeps its first id as
the thread key (its conversation goes on), and replies go to its new id: the
two ids are noted in the store when the upgrade is seen.

Outbound: sendMessage into the customer's chat, replying to their message,
in pieces of at most `max_text_length`. The pieces of a long reply that went
out are recorded in the store as each goes, so a retry after a crash, a
restart or in another process sends only the rest. Which updates count and
how they read is channels/telegram_updates.py; the library's errors are
translated in channels/telegram_api.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import SecretStr, field_validator
from telegram import ReplyParameters, Update
from telegram.error import BadRequest, ChatMigrated, NetworkError, RetryAfter, TelegramError

from channels.base import Channel, ChannelSettings, Sink
from channels.telegram_api import build_bot, call, quiet_library_logs, translate
from channels.telegram_updates import (
    ALLOWED_UPDATES,
    BotIdentity,
    Greeting,
    read_update,
    split_text,
    upgrade_in,
)
from router import logs
from router.acks import Templates
from router.config import Config
from router.errors import BadInbound, ConfigError, DeliveryFailure, PermanentFailure, TemporaryFailure
from router.model import Conversation, Message

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
POLL_TIMEOUT_S = 25
RETRY_MAX_S = 30.0
SEEN_UPDATES = 10_000
_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]{20,}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
T = TypeVar("T")


class TelegramSettings(ChannelSettings):
    token: SecretStr
    mode: Literal["polling", "webhook"] = "polling"
    api_url: str = "https://api.telegram.org"
    webhook_secret: SecretStr | None = None

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not _TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("is not a bot token (<digits>:<letters> from @BotFather)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _SECRET.fullmatch(value.get_secret_value()):
            raise ValueError("1-256 characters of A-Z, a-z, 0-9, _ and - (Telegram's rule)")
        return value

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL such as https://api.telegram.org")
        return value.rstrip("/")


class TelegramChannel(Channel):
    type: ClassVar[str] = "telegram"
    Settings: ClassVar[type[ChannelSettings]] = TelegramSettings
    max_text_length: ClassVar[int | None] = 4096
    settings: TelegramSettings

    def __init__(self, name: str, settings: ChannelSettings, state_dir: Path) -> None:
        super().__init__(name, settings, state_dir)
        token = self.settings.token.get_secret_value()
        self.polls = self.settings.mode == "polling"
        self.webhook_secret = _webhook_secret(self.settings, name)
        logs.add_secret(token)
        logs.add_secret(self.webhook_secret)
        quiet_library_logs()
        self._bot, self._requests = build_bot(token, self.settings.api_url)
        self._me: BotIdentity | None = None
        self._starting = asyncio.Lock()
        self._seen: dict[int, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._templates = Templates(None)
        self._webhook_url = ""
        self._closed = False

    def configure(self, config: Config) -> None:
        acks = config.settings.acks
        self._templates = Templates(config.path(acks.templates) if acks.templates else None)
        if not self.takes_webhooks:
            return
        public_url = config.settings.server.public_url
        if not public_url:
            problem = f"needed by channel {self.name!r} (telegram, webhook mode)"
            raise ConfigError([f"{config.source}: server.public_url: {problem}"])
        self._webhook_url = f"{public_url.rstrip('/')}/channels/{self.name}/telegram"

    @property
    def takes_webhooks(self) -> bool:
        return self.settings.mode == "webhook"

    async def open(self, sink: Sink) -> None:
        await super().open(sink)
        if self.takes_webhooks:
            self._spawn(self._register_webhook())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(request.shutdown() for request in self._requests), return_exceptions=True)

    async def check(self) -> str:
        me = await self._ready()
        return f"bot @{me.username} ({self.settings.mode} mode)"

    # -- inbound ---------------------------------------------------------

    async def poll(self, stop: asyncio.Event) -> None:
        await self._ready()
        await call(self._bot.delete_webhook())  # getUpdates answers 409 while a webhook is set
        offset: int | None = None
        failures = 0
        try:
            while not stop.is_set():
                try:
                    batch = await _unless_stopped(stop, self._bot.raw_updates(offset, POLL_TIMEOUT_S))
                except BadRequest as exc:
                    raise translate(exc) from None
                except (RetryAfter, NetworkError) as exc:
                    failure = translate(exc)
                    failures += 1
                    delay = failure.retry_after_s if isinstance(failure, TemporaryFailure) else None
                    delay = delay or min(RETRY_MAX_S, 0.25 * 2**failures)
                    log.warning("channel %s: getUpdates: %s; again in %.1f s", self.name, failure, delay)
                    await _unless_stopped(stop, asyncio.sleep(delay))
                    continue
                except TelegramError as exc:
                    raise translate(exc) from None
                failures = 0
                if batch is not None:
                    offset = await self._take(batch) or offset
        finally:
            if offset is not None:
                await self._confirm(offset)

    async def receive(self, body: bytes) -> None:
        """One webhook request, already past the secret check: returns once
        its message is durably queued, or it held none for us."""
        if self._closed:
            raise BadInbound(503, "stopping", "the channel is stopping; Telegram will retry")
        try:
            update = json.loads(body)
        except ValueError:
            log.warning("channel %s: skipped a webhook body that is not JSON", self.name)
            return
        try:
            await self._take([update])
        except DeliveryFailure as exc:
            raise BadInbound(503, "not_ready", f"cannot reach the Bot API yet: {exc}") from None

    def verify(self, headers: Mapping[str, str]) -> None:
        # aiohttp keeps header bytes that are not UTF-8 as surrogates: back to bytes.
        given = headers.get(SECRET_HEADER, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self.webhook_secret.encode()):
            raise BadInbound(401, "bad_secret", f"{SECRET_HEADER} is missing or wrong")

    async def _take(self, updates: list[Any]) -> int | None:
        """Hand a batch to the sink; returns the offset that confirms it,
        which the poller uses only after every message in it is durable."""
        top: int | None = None
        work = []
        for raw in updates:
            update_id = raw.get("update_id") if isinstance(raw, dict) else None
            if type(update_id) is not int:
                log.warning("channel %s: skipped an update without an update_id", self.name)
                continue
            top = update_id if top is None else max(top, update_id)
            if update_id in self._seen:
                continue
            if (upgrade := upgrade_in(raw)) is not None:  # before the new chat's messages are read
                await self._upgraded(*upgrade)
            work.append(self._take_one(update_id, raw))
        for outcome in await asyncio.gather(*work, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
        return None if top is None else top + 1

    async def _take_one(self, update_id: int, raw: dict[str, Any]) -> None:
        me = await self._ready()
        try:
            found = read_update(Update.de_json(raw, self._bot), me, self.name)
        except Exception as exc:
            detail = logs.REDACT.scrub(f"{type(exc).__name__}: {exc}")[:200]
            log.warning("channel %s: skipped malformed update %s (%s)", self.name, update_id, detail)
            if self.store is not None:  # kept whole, before the offset passes it
                await self.store.add_dead_letter(self.name, json.dumps(raw), f"malformed update: {detail}")
            found = None
        if isinstance(found, Message):
            chat = found.thread_key or ""
            if chat.startswith("-") and self.store is not None:  # a group: maybe upgraded from another
                found.thread_key = await self.store.get_checkpoint(self._upgrade_key("from", chat)) or chat
            await self.sink(found)
        elif isinstance(found, Greeting):
            self._spawn(self._welcome(found))
        self._seen[update_id] = None
        if len(self._seen) > SEEN_UPDATES:
            del self._seen[next(iter(self._seen))]

    async def _confirm(self, offset: int) -> None:
        """Tell Telegram what this poller has queued, so a restart need not
        re-read it. getUpdates confirms every update below its offset; what
        it returns now stays unconfirmed."""
        try:
            await asyncio.wait_for(self._bot.raw_updates(offset, 0), 2.0)
        except (TelegramError, TimeoutError) as exc:
            reason = translate(exc) if isinstance(exc, TelegramError) else "no answer in 2 s"
            log.info("channel %s: offset not confirmed (%s); a restart re-reads", self.name, reason)

    async def _register_webhook(self) -> None:
        """Until it works: a Bot API outage at start must not stop the daemon."""
        failures = 0
        while True:
            try:
                await self._ready()
                await call(
                    self._bot.set_webhook(
                        self._webhook_url, secret_token=self.webhook_secret, allowed_updates=ALLOWED_UPDATES
                    )
                )
                log.info("channel %s: webhook registered at %s", self.name, self._webhook_url)
                return
            except DeliveryFailure as exc:
                failures += 1
                delay = exc.retry_after_s if isinstance(exc, TemporaryFailure) else None
                delay = delay or min(60.0, 2.0**failures)
                log.error("channel %s: setWebhook failed: %s; again in %.0f s", self.name, exc, delay)
                await asyncio.sleep(delay)

    async def _welcome(self, greeting: Greeting) -> None:
        """Best effort: a lost greeting costs nothing; the customer writes again."""
        text = self._templates.render("welcome", greeting.language, None, {"name": greeting.name})
        try:
            await self._send_text(greeting.chat_id, text, greeting.message_id)
        except DeliveryFailure as exc:
            log.warning("channel %s: no welcome for chat %s: %s", self.name, greeting.chat_id, exc)

    # -- outbound --------------------------------------------------------

    async def send(self, message: Message, conversation: Conversation) -> str:
        """Returns the `chat_id:message_id` of the first piece. A retry,
        here or in another process, resumes after the last piece that went
        out: the ids of those sent are in the store under the message id,
        put after each piece and kept once all are out (a redelivery of a
        reply sent in full sends nothing). A one-piece reply keeps no record:
        its retry is the outbox's usual at-least-once; so does a channel
        with no store bound (only the daemon's outbox sends for real)."""
        try:
            chat_id = int(conversation.thread_key)
        except ValueError:
            raise PermanentFailure(f"{conversation.thread_key!r} is not a Telegram chat id") from None
        if chat_id < 0 and self.store is not None:  # a group: maybe upgraded since the conversation began
            chat_id = int(await self.store.get_checkpoint(self._upgrade_key("to", str(chat_id))) or chat_id)
        pieces = split_text(message.text, self.max_text_length or 4096)
        if not pieces:
            raise PermanentFailure("the message text is empty")
        key = f"telegram/{self.name}/pieces/{message.id}"
        store = self.store if len(pieces) > 1 else None
        sent = (await store.get_checkpoint(key) or "").split() if store is not None else []
        for piece in pieces[len(sent) :]:
            reply_to = None if sent else _message_id_in(message.in_reply_to, chat_id)
            sent.append(await self._send_text(chat_id, piece, reply_to))
            if store is not None:
                await store.put_checkpoint(key, " ".join(sent))
        return sent[0]

    async def _send_text(self, chat_id: int, text: str, reply_to: int | None) -> str:
        if self._closed:
            raise TemporaryFailure("the channel is stopping")
        await self._ready()
        reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
        try:
            sent = await self._bot.send_message(chat_id, text, reply_parameters=reply)
        except ChatMigrated as exc:  # the group became a supergroup, with a new id
            await self._upgraded(chat_id, exc.new_chat_id)
            sent = await call(self._bot.send_message(exc.new_chat_id, text))
        except TelegramError as exc:
            raise translate(exc) from None
        return f"{sent.chat.id}:{sent.message_id}"

    # -- plumbing --------------------------------------------------------

    async def _upgraded(self, old: int, new: int) -> None:
        """Note a group's upgrade both ways: its new id's messages thread on
        the old one, and replies to the old one go to the new."""
        if self.store is not None:
            await self.store.put_checkpoint(self._upgrade_key("from", str(new)), str(old))
            await self.store.put_checkpoint(self._upgrade_key("to", str(old)), str(new))

    def _upgrade_key(self, direction: Literal["from", "to"], chat_id: str) -> str:
        return f"telegram/{self.name}/upgraded-{direction}/{chat_id}"

    async def _ready(self) -> BotIdentity:
        """getMe, once: groups address the bot by its id and @username."""
        if self._me is not None:
            return self._me
        async with self._starting:
            if self._me is None:
                await call(self._bot.initialize())
                self._me = BotIdentity(self._bot.id, self._bot.username)
            return self._me

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _webhook_secret(settings: TelegramSettings, name: str) -> str:
    """The configured secret, else one derived from the token: every
    process of a scaled-out desk computes the same one, and nobody without
    the token can."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    token = settings.token.get_secret_value().encode()
    return hmac.new(token, f"support-router webhook {name}".encode(), hashlib.sha256).hexdigest()


def _message_id_in(external_id: str | None, chat_id: int) -> int | None:
    """The message id of a `chat_id:message_id[...]` in this chat, if any."""
    chat, _, rest = (external_id or "").partition(":")
    message_id = rest.partition(":")[0]
    return int(message_id) if chat == str(chat_id) and message_id.isdigit() else None


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) once `stop` is set:
    a long poll must not hold up shutdown for its whole timeout."""
    job = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not job.done():
            job.cancel()
            await asyncio.wait({job})
    return None if job.cancelled() else job.result()
