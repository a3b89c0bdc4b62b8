"""The email channel: IMAP in (IDLE or polling), SMTP out (SPEC 3).

`mailbox` reads the folder into the sink, `parse` turns each mail into a
Message (with `quoting`, `text` and `loops`) in the worker processes of
`parse_pool`, `smtp` sends acks and agent replies. This module holds the
settings and the adapter that ties them to the channel seam. Each mailbox
is its own channel with its own poll loop, so several are read
concurrently and one failing leaves the others alone; they share one
parse pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from email.utils import parseaddr
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from channels.base import Channel, ChannelSettings, Sink
from channels.email import mailbox, parse_pool, smtp
from channels.email.mailbox import Mailbox
from channels.email.parse import Identity
from router import logs
from router.errors import DeliveryFailure, PermanentFailure, TemporaryFailure
from router.model import Conversation, Message

Security = Literal["tls", "starttls", "none"]
_DEFAULT_PORTS = {
    "imap": {"tls": 993, "starttls": 143, "none": 143},
    "smtp": {"tls": 465, "starttls": 587, "none": 25},
}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _kind: ClassVar[str]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    """Left out: the usual port for the protocol and `security`."""
    security: Security = "tls"
    allow_insecure: bool = False
    ca_file: str | None = None
    """A CA bundle to trust instead of the system's (self-hosted servers)."""
    timeout_s: float = Field(default=30, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and "port" not in data:
            security = data.get("security", cls.model_fields["security"].default)
            data = {**data, "port": _DEFAULT_PORTS[cls._kind].get(security, 0)}
        return data

    @model_validator(mode="after")
    def _plain_only_on_loopback(self) -> Self:
        if self.security == "none" and not self.allow_insecure and not is_loopback(self.host):
            raise ValueError(
                f'security = "none" would send the password in clear text to {self.host};'
                ' use "tls" or "starttls", or set allow_insecure = true'
            )
        return self


class ImapSettings(_Server):
    _kind: ClassVar[str] = "imap"
    username: str = Field(min_length=1)
    password: SecretStr
    folder: str = "INBOX"
    idle: bool = True
    poll_seconds: float = Field(default=60, gt=0)
    """Without IDLE, how often to look; with IDLE, how often to renew it."""
    batch_size: int = Field(default=100, ge=1, le=1000)
    mark_seen: bool = False
    move_to: str | None = None
    max_message_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    """Larger mail is fetched only up to here (the attachment list is then partial)."""


class SmtpSettings(_Server):
    _kind: ClassVar[str] = "smtp"
    security: Security = "starttls"
    username: str | None = None
    password: SecretStr | None = None


class EmailSettings(ChannelSettings):
    from_address: str
    imap: ImapSettings
    smtp: SmtpSettings

    @field_validator("from_address")
    @classmethod
    def _an_address(cls, value: str) -> str:
        if "@" not in parseaddr(value)[1]:
            raise ValueError("must be an address, like Example Support <support@example.com>")
        return value


class EmailChannel(Channel):
    type: ClassVar[str] = "email"
    Settings: ClassVar[type[ChannelSettings]] = EmailSettings
    settings: EmailSettings
    polls = True

    def __init__(self, name: str, settings: ChannelSettings, state_dir: Path) -> None:
        super().__init__(name, settings, state_dir)
        logs.add_secret(self.settings.imap.password.get_secret_value())
        if self.settings.smtp.password is not None:
            logs.add_secret(self.settings.smtp.password.get_secret_value())
        address = parseaddr(self.settings.from_address)[1].lower()
        # The loop id is derived, not stored: every process of one installation
        # (several share a Redis store) stamps and recognises the same value.
        loop_id = hashlib.sha256(f"support-router:{address}".encode()).hexdigest()[:24]
        self.identity = Identity(name, address.rpartition("@")[2], loop_id)
        self._pool: parse_pool.ParsePool | None = None

    async def open(self, sink: Sink) -> None:
        await super().open(sink)
        if self._pool is None:
            self._pool = parse_pool.shared()

    async def poll(self, stop: asyncio.Event) -> None:
        if self.store is None:
            raise RuntimeError(f"channel {self.name}: no store bound for its UID checkpoint")
        await Mailbox(self.settings.imap, self.identity, self.sink, self.store, pool=self._pool).run(stop)

    async def close(self) -> None:
        """Lets go of the parse pool; the last email channel stops its workers."""
        if self._pool is not None:
            self._pool = None
            await parse_pool.release()

    async def send(self, message: Message, conversation: Conversation) -> str:
        mail = smtp.build(message, conversation, self.settings.from_address, self.identity)
        await smtp.deliver(mail, self.settings.smtp)
        return str(mail["Message-ID"])

    async def check(self) -> str:
        """Both halves, so one run names every problem."""
        results: list[str] = []
        problems: list[DeliveryFailure] = []
        for probe in (mailbox.check(self.settings.imap), smtp.check(self.settings.smtp)):
            try:
                results.append(await probe)
            except DeliveryFailure as exc:
                problems.append(exc)
        if not problems:
            return "; ".join(results)
        reason = "; ".join(str(problem) for problem in problems)
        if any(isinstance(problem, PermanentFailure) for problem in problems):
            raise PermanentFailure(reason)
        raise TemporaryFailure(reason)
