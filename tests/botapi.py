"""A Telegram Bot API server on loopback, for tests and bench/telegram.py.

It follows https://core.telegram.org/bots/api for every method the channel
calls (getMe, getUpdates, setWebhook, deleteWebhook, getWebhookInfo,
sendMessage), with the documented envelopes

    {"ok": true, "result": ...}
    {"ok": false, "error_code": 429, "description": "...", "parameters": {"retry_after": 3}}

and the documented rules: method names are case-insensitive; parameters
come as a query string, form fields (what python-telegram-bot sends), JSON
or multipart; getUpdates confirms every update below `offset`, a negative
offset keeps only the last updates, `timeout` long-polls, a newer
getUpdates ends an older one with 409, and getUpdates answers 409 while a
webhook is set; setWebhook's `secret_token` is sent back in
`X-Telegram-Bot-Api-Secret-Token` with every update POSTed, and an update
not answered 2xx is sent again; entities (mentions, bot commands) are
computed by the server with UTF-16 offsets. The channel reaches it only
through python-telegram-bot's `base_url`, so the library's own requests are
what the tests exercise.

Deliberate differences: webhook URLs may be plain HTTP on any port (as a
self-hosted `telegram-bot-api --local` server allows), and a failed webhook
delivery is retried after `retry_delay_s` rather than Telegram's minutes.

Hooks: `fail()` injects errors (429 with retry_after, a 502 page from the
proxy in front, 403, ...), `hold()` leaves a call unanswered (a request in
flight when the client is killed), `migrate()` upgrades a group to a
supergroup with a new id (the two service messages, and sendMessage to the
old id refused with `migrate_to_chat_id`), `block()` makes sendMessage answer "bot was
blocked by the user", `push_raw()` queues malformed updates, and
`deliver_twice` sends every webhook update again after its 2xx, as Telegram
does when it did not see the answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import aiohttp
from aiohttp import web

TOKEN = "5550001234:AAE-emulator_token_for_tests_0123456"
BOT_USERNAME = "acme_support_bot"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_TEXT = 4096
_TOKEN = re.compile(r"\d+:[A-Za-z0-9_-]+")
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{5,32}")
_COMMAND = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{5,32})?")
_BAD_GATEWAY = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx/1.18.0</center></body></html>"  # noqa: E501
_DESCRIPTIONS = {
    400: "Bad Request: chat not found",
    403: "Forbidden: bot was blocked by the user",
    409: "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
    500: "Internal Server Error",
}


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


@dataclass
class Fault:
    status: int
    description: str
    parameters: dict[str, Any] | None
    held: bool = False


class BotAPI:
    """One bot's view of Telegram. `url` is what the channel's `api_url` takes."""

    def __init__(self, token: str = TOKEN, username: str = BOT_USERNAME) -> None:
        self.token = token
        self.me = {"id": int(token.split(":")[0]), "is_bot": True, "first_name": "Acme Support"}
        self.me |= {"username": username, "can_join_groups": True, "can_read_all_group_messages": False}
        self.url = ""
        self.pending: dict[int, dict[str, Any]] = {}
        """Updates not yet confirmed (polling) or delivered (webhook), by id."""
        self.sent: list[dict[str, Any]] = []
        """Every Message that sendMessage created, in order."""
        self.calls: Counter[str] = Counter()
        self.deliveries: list[tuple[int, int]] = []
        """(update_id, HTTP status) of every webhook POST; 0 when unreachable."""
        self.confirmed = 0
        self.allowed_updates: list[str] = []
        self.webhook: dict[str, Any] | None = None
        self.deliver_twice = False
        self.retry_delay_s = 0.2
        self.last_error: str | None = None
        self.held = 0
        """Calls `hold()` has left unanswered so far."""
        self._released = asyncio.Event()
        self._update_ids = count(700_000)
        self._faults: dict[str, list[Fault | None]] = defaultdict(list)
        self._blocked: set[int] = set()
        self._migrated: dict[int, int] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._last_message_id: Counter[int] = Counter()
        self._arrived = asyncio.Event()
        self._poll_generation = 0
        self._redelivered: set[int] = set()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._senders: list[asyncio.Task[None]] = []
        self._methods = {
            "getme": self._get_me,
            "getupdates": self._get_updates,
            "setwebhook": self._set_webhook,
            "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info,
            "sendmessage": self._send_message,
        }
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- life cycle --------------------------------------------------------

    async def start(self) -> BotAPI:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        self._released.set()
        self._poll_generation += 1  # ends long polls left by clients that died
        self._wake()
        await self._stop_senders()
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what customers do -------------------------------------------------

    @staticmethod
    def user(user_id: int, first_name: str, last_name: str | None = None, **extra: Any) -> dict[str, Any]:
        """A Telegram User; `extra` takes username, language_code, is_bot."""
        found = {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "en", **extra}
        return found | ({"last_name": last_name} if last_name else {})

    @staticmethod
    def group(chat_id: int, title: str) -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    def say(
        self,
        user: dict[str, Any],
        text: str | None = None,
        *,
        chat: dict[str, Any] | None = None,
        caption: str | None = None,
        photo: bool = False,
        document: dict[str, Any] | None = None,
        reply_to: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A message from `user` (in their private chat unless `chat`), queued as an update."""
        if chat is None:
            chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
            chat |= {"username": user["username"]} if "username" in user else {}
        message: dict[str, Any] = {"message_id": self._new_message_id(chat), "from": user, "chat": chat}
        message["date"] = int(time.time())
        if text is not None:
            message |= {"text": text} | _entities(text, "entities")
        if caption is not None:
            message |= {"caption": caption} | _entities(caption, "caption_entities")
        if photo:
            message["photo"] = [
                _file("p", 90, 1_200, width=90, height=67),
                _file("p", 800, 64_000, width=800, height=600),
            ]
        if document is not None:
            message["document"] = _file("d", len(self._messages), 1000) | document
        if reply_to is not None:
            message["reply_to_message"] = {k: v for k, v in reply_to.items() if k != "reply_to_message"}
        self._messages[(chat["id"], message["message_id"])] = message
        self._queue_update("message", message)
        return message

    def edit(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        edited = {k: v for k, v in message.items() if k != "entities"} | {"text": text}
        edited |= _entities(text, "entities") | {"edit_date": int(time.time())}
        self._messages[(message["chat"]["id"], message["message_id"])] = edited
        self._queue_update("edited_message", edited)
        return edited

    def push_raw(self, payload: dict[str, Any]) -> int:
        """Queue an update exactly as given (plus an update_id): for malformed ones."""
        update_id = next(self._update_ids)
        self._add({"update_id": update_id, **payload})
        return update_id

    # -- hooks for tests ---------------------------------------------------

    def fail(
        self,
        method: str,
        status: int,
        *,
        times: int = 1,
        skip: int = 0,
        description: str = "",
        retry_after: int | None = None,
        migrate_to_chat_id: int | None = None,
    ) -> None:
        """After `skip` calls that work, the next `times` calls of `method`
        answer `status` (502: the HTML page of the proxy in front)."""
        if status == 429 and not description:
            description = f"Too Many Requests: retry after {retry_after}"
        parameters = {"retry_after": retry_after} if retry_after is not None else {}
        parameters |= {"migrate_to_chat_id": migrate_to_chat_id} if migrate_to_chat_id else {}
        fault = Fault(status, description or _DESCRIPTIONS.get(status, "Error"), parameters or None)
        self._faults[method.lower()] += [None] * skip + [fault] * times

    def hold(self, method: str, *, skip: int = 0) -> None:
        """After `skip` calls that work, the next call of `method` gets no
        answer until `release()` (then a 502, having done nothing): the
        moment to kill the client with a request in flight."""
        self._faults[method.lower()] += [None] * skip + [Fault(502, "held", None, held=True)]

    def release(self) -> None:
        self._released.set()

    def migrate(self, group: dict[str, Any], supergroup: dict[str, Any], by: dict[str, Any]) -> None:
        """`by` upgrades `group` to `supergroup`: the bot reads a service
        message in each, and the old id takes no more messages."""
        self._migrated[group["id"]] = supergroup["id"]
        for chat, field, value in (
            (group, "migrate_to_chat_id", supergroup),
            (supergroup, "migrate_from_chat_id", group),
        ):
            message = {
                "message_id": self._new_message_id(chat),
                "from": by,
                "chat": chat,
                "date": int(time.time()),
            }
            self._queue_update("message", message | {field: value["id"]})

    def block(self, user_id: int) -> None:
        self._blocked.add(user_id)

    def sent_to(self, chat_id: int) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["chat"]["id"] == chat_id]

    # -- the HTTP side -------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        token, method = request.match_info["token"], request.match_info["method"].lower()
        if token != self.token:
            return _error(401, "Unauthorized") if _TOKEN.fullmatch(token) else _error(404, "Not Found")
        handler = self._methods.get(method)
        if handler is None:
            return _error(404, "Not Found")
        self.calls[method] += 1
        fault = self._faults[method].pop(0) if self._faults[method] else None
        if fault is not None and fault.held:
            self.held += 1
            await self._released.wait()
        if fault is not None and fault.status == 502:
            return web.Response(status=502, text=_BAD_GATEWAY, content_type="text/html")
        if fault is not None:
            return _error(fault.status, fault.description, fault.parameters)
        try:
            result = await handler(await _params(request))
        except ApiError as exc:
            return _error(exc.code, exc.description, exc.parameters)
        return web.json_response({"ok": True, "result": result})

    async def _get_me(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.me

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active;"
                " use deleteWebhook to delete the webhook first",
            )
        offset = _int(params, "offset") or 0
        limit = min(100, max(1, _int(params, "limit") or 100))
        timeout = max(0, _int(params, "timeout") or 0)
        if (allowed := _json(params, "allowed_updates")) is not None:
            self.allowed_updates = list(allowed)
        self._confirm(offset)
        self._poll_generation += 1
        mine = self._poll_generation
        self._wake()
        deadline = time.monotonic() + timeout
        while True:
            arrived = self._arrived
            if mine != self._poll_generation:
                raise ApiError(409, _DESCRIPTIONS[409])
            if self.pending or time.monotonic() >= deadline:
                return list(islice(self.pending.values(), limit))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())

    async def _set_webhook(self, params: dict[str, Any]) -> bool:
        url = params.get("url")
        if url is None:
            raise ApiError(400, 'Bad Request: parameter "url" is required')
        if url == "":
            return await self._delete_webhook(params)
        if not str(url).startswith(("https://", "http://")):
            raise ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        secret = params.get("secret_token")
        if secret is not None and not _SECRET.fullmatch(str(secret)):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        if (allowed := _json(params, "allowed_updates")) is not None:
            self.allowed_updates = list(allowed)
        if _bool(params, "drop_pending_updates"):
            self.pending.clear()
        connections = min(100, max(1, _int(params, "max_connections") or 40))
        await self._stop_senders()
        self.webhook = {"url": url, "secret_token": secret, "max_connections": connections}
        self._queue = asyncio.Queue()
        for update in self.pending.values():
            self._queue.put_nowait(update)
        self._senders = [asyncio.create_task(self._deliver_forever(self._queue)) for _ in range(connections)]
        return True

    async def _delete_webhook(self, params: dict[str, Any]) -> bool:
        if _bool(params, "drop_pending_updates"):
            self.pending.clear()
        await self._stop_senders()
        self.webhook = None
        return True

    async def _get_webhook_info(self, params: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {"url": "", "has_custom_certificate": False}
        info["pending_update_count"] = len(self.pending)
        if self.webhook is not None:
            info |= {"url": self.webhook["url"], "max_connections": self.webhook["max_connections"]}
        if self.last_error:
            info |= {"last_error_date": int(time.time()), "last_error_message": self.last_error}
        return info | ({"allowed_updates": self.allowed_updates} if self.allowed_updates else {})

    async def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = self._chats.get(_int(params, "chat_id") or 0)
        if chat is None:
            raise ApiError(400, "Bad Request: chat not found")
        if chat["id"] in self._migrated:
            upgraded = {"migrate_to_chat_id": self._migrated[chat["id"]]}
            raise ApiError(400, "Bad Request: group chat was upgraded to a supergroup chat", upgraded)
        if chat["type"] == "private" and chat["id"] in self._blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > MAX_TEXT:
            raise ApiError(400, "Bad Request: message is too long")
        reply = _json(params, "reply_parameters")
        if reply is None and "reply_to_message_id" in params:
            reply = {"message_id": _int(params, "reply_to_message_id")}
            reply["allow_sending_without_reply"] = _bool(params, "allow_sending_without_reply")
        message: dict[str, Any] = {"message_id": self._new_message_id(chat), "chat": chat, "text": text}
        message |= {"from": {k: self.me[k] for k in ("id", "is_bot", "first_name", "username")}}
        message["date"] = int(time.time())
        if reply:
            replied = self._messages.get((chat["id"], int(reply.get("message_id") or 0)))
            if replied is None and not reply.get("allow_sending_without_reply"):
                raise ApiError(400, "Bad Request: message to be replied not found")
            if replied is not None:
                message["reply_to_message"] = {k: v for k, v in replied.items() if k != "reply_to_message"}
        self._messages[(chat["id"], message["message_id"])] = message
        self.sent.append(message)
        return message

    # -- updates and webhook delivery --------------------------------------

    def _queue_update(self, kind: str, payload: dict[str, Any]) -> None:
        self._chats[payload["chat"]["id"]] = payload["chat"]
        if not self.allowed_updates or kind in self.allowed_updates:
            self._add({"update_id": next(self._update_ids), kind: payload})

    def _add(self, update: dict[str, Any]) -> None:
        self.pending[update["update_id"]] = update
        if self.webhook is not None:
            self._queue.put_nowait(update)
        self._wake()

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    def _confirm(self, offset: int) -> None:
        if offset > 0:
            while self.pending and next(iter(self.pending)) < offset:
                del self.pending[next(iter(self.pending))]
            self.confirmed = max(self.confirmed, offset)
        elif offset < 0:
            for update_id in list(self.pending)[:offset]:
                del self.pending[update_id]

    async def _deliver_forever(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """One of `max_connections` senders: POST, and on anything but 2xx try again later."""
        loop = asyncio.get_running_loop()
        while True:
            update = await queue.get()
            update_id = update["update_id"]
            if update_id not in self.pending:
                continue
            status = await self._post(update)
            if 200 <= status < 300 and not (self.deliver_twice and update_id not in self._redelivered):
                self.pending.pop(update_id, None)
            elif 200 <= status < 300:
                self._redelivered.add(update_id)
                queue.put_nowait(update)
            else:
                loop.call_later(self.retry_delay_s, queue.put_nowait, update)

    async def _post(self, update: dict[str, Any]) -> int:
        assert self._http is not None and self.webhook is not None
        headers = {"Content-Type": "application/json"}
        if self.webhook["secret_token"]:
            headers[SECRET_HEADER] = self.webhook["secret_token"]
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with self._http.post(
                self.webhook["url"], data=json.dumps(update), headers=headers, timeout=timeout
            ) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = 0
            self.last_error = f"Connection failed: {type(exc).__name__}"
        if status and not 200 <= status < 300:
            self.last_error = f"Wrong response from the webhook: {status}"
        self.deliveries.append((update["update_id"], status))
        return status

    async def _stop_senders(self) -> None:
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        self._senders = []

    def _new_message_id(self, chat: dict[str, Any]) -> int:
        self._chats[chat["id"]] = chat
        self._last_message_id[chat["id"]] += 1
        return self._last_message_id[chat["id"]]


def _error(code: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=code)


async def _params(request: web.Request) -> dict[str, Any]:
    params: dict[str, Any] = dict(request.query)
    if request.method != "POST" or not request.can_read_body:
        return params
    if request.content_type == "application/json":
        body = await request.json()
        if not isinstance(body, dict):
            raise ApiError(400, "Bad Request: the request body must be a JSON object")
        return params | body
    form = await request.post()
    return params | {key: value for key, value in form.items() if isinstance(value, str)}


def _int(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f'Bad Request: field "{key}" must be of type Integer') from None


def _json(params: dict[str, Any], key: str) -> Any:
    """An object or array parameter: JSON-serialized in a form, or as-is in a JSON body."""
    value = params.get(key)
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ApiError(400, f"Bad Request: can't parse {key} JSON object") from None


def _bool(params: dict[str, Any], key: str) -> bool:
    return params.get(key) in (True, "true", "True", "1")


def _entities(text: str, field: str) -> dict[str, list[dict[str, Any]]]:
    """What Telegram's server marks up: @mentions and /commands, in UTF-16 units."""
    found = []
    for kind, pattern in (("bot_command", _COMMAND), ("mention", _MENTION)):
        for match in pattern.finditer(text):
            offset = len(text[: match.start()].encode("utf-16-le")) // 2
            length = len(match.group().encode("utf-16-le")) // 2
            found.append({"type": kind, "offset": offset, "length": length})
    return {field: sorted(found, key=lambda e: e["offset"])} if found else {}


def _file(prefix: str, number: int, size: int, **extra: Any) -> dict[str, Any]:
    unique = f"{prefix}u{number}"
    return {"file_id": f"{prefix}AgACAgIAAx{number:06d}", "file_unique_id": unique, "file_size": size} | extra
