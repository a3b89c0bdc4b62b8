"""Fixtures for tests that read a real mailbox: a fresh Dovecot user (`box`)
and an empty SQLite store (`store`) for the channel to queue into. A pytest
plugin (tests/conftest.py), so every email test module shares them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from channels.email import EmailChannel, EmailSettings
from router.model import Conversation, Delivery, Direction, Kind, Message, Party, utcnow
from router.store.sqlite import SQLiteStore
from tests.services import Dovecot


@dataclass
class Box:
    """A mailbox of this test's own (a fresh user) on the shared Dovecot."""

    dovecot: Dovecot
    user: str
    password: str

    async def append(self, *mails: bytes, folder: str = "INBOX") -> None:
        await asyncio.to_thread(self.dovecot.append, self.user, *mails, folder=folder)

    def flags(self, folder: str = "INBOX") -> list[bytes]:
        imap = self.dovecot.client(self.user)
        try:
            _, count = imap.select(folder)
            if count[0] == b"0":
                return []
            _, data = imap.fetch("1:*", "(FLAGS)")
            return [line for line in data if isinstance(line, bytes)]
        finally:
            imap.logout()

    def imap(self, **extra: Any) -> dict[str, Any]:
        options = {"host": "127.0.0.1", "port": self.dovecot.port, "security": "none", "poll_seconds": 30}
        return {**options, "username": self.user, "password": self.password, **extra}

    def channel(self, smtp_port: int, state_dir: Path, name: str = "mail", **imap: Any) -> EmailChannel:
        settings = EmailSettings.model_validate(
            {
                "from_address": "Example Support <support@example.com>",
                "imap": self.imap(**imap),
                "smtp": {"host": "127.0.0.1", "port": smtp_port, "security": "none"},
            }
        )
        return EmailChannel(name, settings, state_dir)

    def channel_table(self, smtp_port: int) -> str:
        """A config's `[[channels]]` table for a channel `mail` on this mailbox."""
        imap = ", ".join(f"{key} = {json.dumps(value)}" for key, value in self.imap().items())
        return f"""
[[channels]]
name = "mail"
type = "email"
from_address = "Example Support <support@example.com>"
imap = {{ {imap} }}
smtp = {{ host = "127.0.0.1", port = {smtp_port}, security = "none" }}
"""

    @property
    def key(self) -> str:
        return f"imap/mail/{self.user}@127.0.0.1/INBOX"


@pytest.fixture
def box(shared_dovecot: Dovecot) -> Box:
    return Box(shared_dovecot, *shared_dovecot.new_user())


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(f"sqlite:///{tmp_path}/router.db")
    await opened.open()
    yield opened
    await opened.close()


def agent_reply(
    to: str, *, name: str = "Ann", subject: str = "Question 1", text: str = "Hello Ann"
) -> tuple[Message, Conversation]:
    """An agent's reply to a customer at `to`, and its conversation, as the
    outbox hands them to the email channel's `send`."""
    now = utcnow()
    customer = Party(id=to, name=name, address=to)
    conversation = Conversation(
        id="c_1", channel="mail", customer=customer, thread_key="<q1@example.org>", created_at=now,
        last_message_at=now, ref="T-000001", subject=subject,
    )  # fmt: skip
    message = Message(
        id="m_reply_1", channel="mail", channel_type="email", direction=Direction.OUT, kind=Kind.AGENT,
        external_id="m_reply_1", sender=Party(id="admin"), text=text, received_at=now,
        conversation_id="c_1", recipient=customer, in_reply_to="<q1@example.org>", delivery=Delivery(),
    )  # fmt: skip
    return message, conversation
