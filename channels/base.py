"""The one seam every channel plugs into.

An adapter turns outside traffic into `Message`s and hands each to a `Sink`,
which returns only once the message is durably queued; only then may the
adapter acknowledge it upstream (IMAP flag, Telegram offset, HTTP 202). It
sends outbound messages, raising `TemporaryFailure` (retry, maybe after a
delay) or `PermanentFailure` (give up). It knows nothing of queues, teams or
routing.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from router.model import Accepted, Conversation, DeadLetter, Message

if TYPE_CHECKING:
    from router.config import Config


class Sink(Protocol):
    async def __call__(self, message: Message) -> Accepted: ...


class ChannelStore(Protocol):
    """The part of the store a channel may use directly (the daemon hands
    its Store to `bind_store`): its own durable checkpoint (an IMAP
    folder's UIDVALIDITY and last UID) and the dead letters, for raw input
    it cannot turn into a Message (an email that does not parse)."""

    async def get_checkpoint(self, key: str) -> str | None: ...

    async def put_checkpoint(self, key: str, value: str) -> None: ...

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> DeadLetter: ...


class ChannelSettings(BaseModel):
    """Each adapter's own keys of its `[[channels]]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Channel(ABC):
    type: ClassVar[str]
    Settings: ClassVar[type[ChannelSettings]]
    max_text_length: ClassVar[int | None] = None
    pulls_outbound: bool = False
    """True when the customer's client fetches replies (webhook pull mode),
    so the outbox leaves its messages for the client to collect."""
    polls: bool = False
    """True when receiving is a loop that asks upstream for new messages
    (an IMAP mailbox, a Telegram bot in polling mode). Such a loop must run
    in one process at a time, so the daemon runs `poll` only while it holds
    the channel's lease."""
    store: ChannelStore | None = None

    def __init__(self, name: str, settings: ChannelSettings, state_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.state_dir = state_dir

    def configure(self, config: Config) -> None:  # noqa: B027 - most channels need only their own table
        """Take what a channel needs from outside its `[[channels]]` table
        (Telegram: `server.public_url` to register its webhook, the ack
        templates for its welcome text); raise ConfigError when it is missing."""

    def bind_store(self, store: ChannelStore) -> None:
        """Called by the daemon before `open`; channels that keep no
        checkpoint and parse everything they get can ignore it."""
        self.store = store

    async def open(self, sink: Sink) -> None:
        """Start receiving. Push channels only keep the sink for their routes."""
        self.sink = sink

    async def poll(self, stop: asyncio.Event) -> None:
        """Receive until `stop` is set (only for channels that `polls`).
        Raise to have the daemon retry with backoff; it logs the error."""
        raise NotImplementedError(f"{self.type} channels do not poll")

    async def close(self) -> None:  # noqa: B027 - channels without resources need nothing here
        """Stop taking input; idempotent."""

    @abstractmethod
    async def send(self, message: Message, conversation: Conversation) -> str:
        """Deliver one outbound message; return the channel's id for it."""

    @abstractmethod
    async def check(self) -> str:
        """Connect for `channels test`: a short OK detail, or raise
        TemporaryFailure/PermanentFailure with the reason."""
