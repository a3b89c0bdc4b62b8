"""python-telegram-bot at the boundary: the Bot we build, and its errors translated.

The adapter (channels/telegram.py) never lets a `telegram.error` through;
each becomes one of ours, with a reason safe to store and show:

    RetryAfter (429)               -> TemporaryFailure(retry_after_s)
    NetworkError, TimedOut, other  -> TemporaryFailure
    Forbidden (403: bot blocked)   -> PermanentFailure(reason)
    BadRequest (400), InvalidToken -> PermanentFailure(reason)

The token is part of every Bot API URL, and python-telegram-bot writes it
into some messages (`The token ... was rejected`) and debug lines: reasons
are scrubbed by the log redaction (the adapter registers the token), and the
libraries' request logging is turned down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from telegram import Bot
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.request import HTTPXRequest

from channels.telegram_updates import ALLOWED_UPDATES
from router import logs
from router.errors import DeliveryFailure, PermanentFailure, TemporaryFailure

# Opt in to python-telegram-bot's timedelta periods (v22.2+): the int form
# warns on every read, and RetryAfter reads its own period when it is made.
os.environ.setdefault("PTB_TIMEDELTA", "true")

SEND_TIMEOUT_S = 10.0
SEND_CONNECTIONS = 16
T = TypeVar("T")


class UpdatesBot(Bot):
    """A Bot that also fetches updates unparsed.

    `Bot.get_updates` parses a batch as a whole: one update it cannot parse
    fails every call, the offset never passes it and the bot stalls for
    good (and it logs the raw batch, customer text included). The same
    request machinery, asked for the raw list, lets each update be parsed,
    or skipped, on its own.
    """

    async def raw_updates(self, offset: int | None, timeout_s: int) -> list[Any]:
        data = {"offset": offset, "timeout": timeout_s, "allowed_updates": list(ALLOWED_UPDATES)}
        result = await self._post("getUpdates", data, read_timeout=timeout_s + SEND_TIMEOUT_S)
        return result if isinstance(result, list) else []


def build_bot(token: str, api_url: str) -> tuple[UpdatesBot, list[HTTPXRequest]]:
    """The bot on `api_url` (Telegram's or a self-hosted Bot API server), and
    its two connection pools: one for the long poll, one for sending."""
    requests = [
        HTTPXRequest(connection_pool_size=1, connect_timeout=5.0, pool_timeout=5.0),
        HTTPXRequest(
            connection_pool_size=SEND_CONNECTIONS, read_timeout=SEND_TIMEOUT_S, pool_timeout=SEND_TIMEOUT_S
        ),
    ]
    bot = UpdatesBot(
        token,
        base_url=f"{api_url}/bot",
        base_file_url=f"{api_url}/file/bot",
        get_updates_request=requests[0],
        request=requests[1],
    )
    return bot, requests


async def call(work: Coroutine[Any, Any, T]) -> T:
    """Await one Bot API call, its errors translated."""
    try:
        return await work
    except TelegramError as exc:
        raise translate(exc) from None


def translate(exc: TelegramError) -> DeliveryFailure:
    # A proxy's error page is quoted whole after this phrase; the status says enough.
    detail = logs.REDACT.scrub(exc.message).split(". Parsing the server response")[0][:200]
    if isinstance(exc, RetryAfter):
        wait = exc.retry_after
        seconds = wait.total_seconds() if isinstance(wait, timedelta) else float(wait)
        return TemporaryFailure(f"Telegram flood control: retry after {seconds:g} s", seconds)
    if isinstance(exc, InvalidToken):
        return PermanentFailure("Telegram rejected the bot token")
    if isinstance(exc, Forbidden):
        return PermanentFailure(f"Telegram refused: {detail}")
    if isinstance(exc, BadRequest):
        return PermanentFailure(f"Telegram rejected the request: {detail}")
    if isinstance(exc, NetworkError):
        return TemporaryFailure(f"Telegram unreachable: {detail}")
    return TemporaryFailure(f"Telegram: {detail}")


def quiet_library_logs() -> None:
    """httpx logs each request's URL at INFO (once per long poll, with the
    token in its path) and python-telegram-bot whole updates (customer text)
    at DEBUG: neither is worth a log line, even with --debug. Its request
    layer also logs a traceback for every answer it cannot parse (a proxy's
    502 page) before raising; the adapter logs the raised error once."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.INFO)
    logging.getLogger("telegram").setLevel(logging.INFO)
    logging.getLogger("telegram.request").setLevel(logging.CRITICAL)
