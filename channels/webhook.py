"""The generic signed JSON webhook (SPEC 5).

Inbound: verify `X-Router-Timestamp` / `X-Router-Signature` (HMAC-SHA256 over
`"<timestamp>." + body`), validate the body, hand the Message to the sink.
Outbound: push mode POSTs each ack or reply to `reply_url`, signed the same
way; without a `reply_url` the client pulls them (the web layer serves the
queue; this adapter only verifies the request and shapes the objects).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from pydantic import Field, HttpUrl, SecretStr

from channels.base import Channel, ChannelSettings
from router.errors import BadInbound, PermanentFailure, TemporaryFailure
from router.model import Accepted, Conversation, Direction, Kind, Message, Party, new_id

MAX_SKEW_S = 300
RETRYABLE_STATUS = {408, 429}


class WebhookSettings(ChannelSettings):
    secret: SecretStr | None = None
    reply_url: HttpUrl | None = None
    timeout_s: float = Field(default=10, gt=0)


def sign(secret: str, timestamp: str, payload: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + payload, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class WebhookChannel(Channel):
    type: ClassVar[str] = "webhook"
    Settings: ClassVar[type[ChannelSettings]] = WebhookSettings
    settings: WebhookSettings

    def __init__(self, name: str, settings: ChannelSettings, state_dir: Path) -> None:
        super().__init__(name, settings, state_dir)
        self.pulls_outbound = self.settings.reply_url is None
        self.generated_secret: str | None = None
        self._secret = self._load_secret()
        self._http: aiohttp.ClientSession | None = None

    def _load_secret(self) -> str:
        """A configured secret, else one generated on first start and kept
        under the state dir so restarts and the CLI agree on it."""
        if self.settings.secret is not None:
            return self.settings.secret.get_secret_value()
        path = self.state_dir / "secrets" / f"{self.name}.secret"
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        path.touch(mode=0o600)
        path.write_text(secret + "\n")
        self.generated_secret = secret
        return secret

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- inbound ---------------------------------------------------------

    async def receive(self, body: bytes, headers: Mapping[str, str]) -> Accepted:
        """One inbound request; checks run in SPEC order after size and channel."""
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise BadInbound(415, "unsupported_media_type", "Content-Type must be application/json")
        self.verify(body, headers)
        return await self.sink(self.parse(body))

    def verify(self, signed: bytes, headers: Mapping[str, str]) -> None:
        timestamp = headers.get("X-Router-Timestamp", "")
        signature = headers.get("X-Router-Signature", "")
        # ASCII digits only, and no more than a clock can show: "²" passes
        # isdigit() and 5,000 nines pass it too, yet int() refuses both.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12) or not signature:
            raise BadInbound(401, "bad_signature", "X-Router-Timestamp and X-Router-Signature are required")
        if abs(time.time() - int(timestamp)) > MAX_SKEW_S:
            raise BadInbound(401, "stale_timestamp", "X-Router-Timestamp is more than 5 minutes off")
        expected = sign(self._secret, timestamp, signed).encode()
        if not hmac.compare_digest(expected, signature.encode("utf-8", "surrogateescape")):
            raise BadInbound(401, "bad_signature", "the signature does not match")

    def parse(self, body: bytes) -> Message:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInbound(400, "invalid_json", f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadInbound(400, "invalid_body", "body must be a JSON object")
        external_id = _string(data, "id", required=True, max_len=200)
        sender = data.get("from")
        if not isinstance(sender, dict):
            raise BadInbound(400, "invalid_body", "from: must be an object with an id")
        sender_id = _string(sender, "id", required=True, max_len=200, field="from.id")
        text = _string(data, "text", required=True)
        thread = _string(data, "conversation", max_len=200)
        return Message(
            id=new_id("m"),
            channel=self.name,
            channel_type=self.type,
            direction=Direction.IN,
            kind=Kind.CUSTOMER,
            external_id=external_id,
            sender=Party(id=sender_id, name=_string(sender, "name", max_len=200, field="from.name")),
            text=text,
            subject=_string(data, "subject", max_len=998),
            received_at=_timestamp(data.get("timestamp")),
            thread_key=thread or sender_id,
        )

    # -- outbound --------------------------------------------------------

    def payload(self, message: Message, conversation: Conversation) -> dict[str, Any]:
        """The object pushed to reply_url or served in pull mode."""
        return {
            "id": message.id,
            "conversation": conversation.thread_key,
            "conversation_ref": conversation.ref,
            "to": {"id": message.recipient.id if message.recipient else conversation.customer.id},
            "text": message.text,
            "kind": message.kind.value,
            "in_reply_to": message.in_reply_to,
        }

    def signed_headers(self, signed: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        return {"X-Router-Timestamp": timestamp, "X-Router-Signature": sign(self._secret, timestamp, signed)}

    async def send(self, message: Message, conversation: Conversation) -> str:
        if self.settings.reply_url is None:
            raise PermanentFailure("pull-mode channel: the client fetches its replies")
        body = json.dumps(self.payload(message, conversation)).encode()
        headers = {"Content-Type": "application/json", **self.signed_headers(body)}
        try:
            # Not followed: aiohttp re-sends a POST answered 301/302/303 as a
            # bodiless GET, whose 2xx would count as delivered.
            async with self._session().post(
                str(self.settings.reply_url), data=body, headers=headers, allow_redirects=False
            ) as resp:
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TemporaryFailure(f"reply_url unreachable: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return message.id
        if status >= 500 or status in RETRYABLE_STATUS:
            raise TemporaryFailure(f"reply_url answered HTTP {status}", _retry_after(retry_after))
        if 300 <= status < 400:
            raise PermanentFailure(f"reply_url answered HTTP {status} (redirects are not followed)")
        raise PermanentFailure(f"reply_url answered HTTP {status}")

    async def check(self) -> str:
        if self.settings.reply_url is None:
            return f"pull mode: clients fetch GET /channels/{self.name}/outbound"
        try:
            async with self._session().get(str(self.settings.reply_url), allow_redirects=False) as resp:
                if 300 <= resp.status < 400:
                    # Deliveries do not follow redirects (a POST would come back a GET).
                    raise PermanentFailure(
                        f"reply_url redirects (HTTP {resp.status}); deliveries do not follow redirects:"
                        " set the final address"
                    )
                return f"reply_url reachable (HTTP {resp.status})"
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TemporaryFailure(f"reply_url unreachable: {type(exc).__name__}: {exc}") from None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http


def _string(
    data: dict[str, Any], key: str, *, required: bool = False, max_len: int | None = None, field: str = ""
) -> str | None:
    field = field or key
    value = data.get(key)
    if value is None:
        if required:
            raise BadInbound(400, "invalid_body", f"{field}: is required")
        return None
    if not isinstance(value, str):
        raise BadInbound(400, "invalid_body", f"{field}: must be a string")
    if required and not value.strip():
        raise BadInbound(400, "invalid_body", f"{field}: must not be empty")
    if max_len is not None and len(value) > max_len:
        raise BadInbound(400, "invalid_body", f"{field}: longer than {max_len} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInbound(400, "invalid_body", f"{field}: is not valid Unicode") from None
    return value


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or, as RFC
    9110 also allows (a receiver down for maintenance until a set time), an
    HTTP date; None when it says neither."""
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        until = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if until.tzinfo is None:  # "-0000": RFC 5322's unknown zone; HTTP dates are GMT
        until = until.replace(tzinfo=UTC)
    return max(0.0, until.timestamp() - time.time())


def _timestamp(value: Any) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if not isinstance(value, str):
        raise BadInbound(400, "invalid_body", "timestamp: must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInbound(400, "invalid_body", "timestamp: is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise BadInbound(400, "invalid_body", "timestamp: needs a UTC offset")
    return parsed.astimezone(UTC)
