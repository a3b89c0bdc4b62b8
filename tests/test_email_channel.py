"""The email channel against a real Dovecot (mail delivered by IMAP APPEND)
and an aiosmtpd peer: connecting, reading, checkpoints, failures, sending."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from channels.email import EmailChannel, EmailSettings
from channels.email.mailbox import Mailbox
from channels.email.parse import Identity, parse_email
from router import config as configuration
from router import pollers
from router.daemon import Daemon
from router.errors import PermanentFailure, TemporaryFailure
from router.model import Accepted, Conversation, InboxQuery, Kind, Message
from router.store.sqlite import SQLiteStore
from tests.conftest import free_socket, write_config
from tests.mailboxes import Box, agent_reply
from tests.services import Dovecot, SMTPPeer, free_port


def customer_mail(
    i: int, *, subject: str = "", text: str = "", message_id: str = "", **headers: str
) -> bytes:
    """Mail from customer `i`, `<q{i}@example.org>` unless told otherwise."""
    mail = EmailMessage()
    mail["From"] = f"Customer {i} <c{i}@example.org>"
    mail["To"] = "support@example.com"
    mail["Subject"] = subject or f"Question {i} about fees"
    mail["Message-ID"] = message_id or f"<q{i}@example.org>"
    mail["Date"] = formatdate()
    for name, value in headers.items():
        mail[name.replace("_", "-")] = value
    mail.set_content(text or f"What is the fee for withdrawal number {i}?")
    return mail.as_bytes()


class Recorder:
    """A sink in front of the real store that remembers every call."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.calls: list[Message] = []
        self.fresh: list[Message] = []

    async def __call__(self, message: Message) -> Accepted:
        self.calls.append(message)
        accepted = await self.store.enqueue_inbound(message)
        if not accepted.duplicate:
            self.fresh.append(message)
        return accepted


@contextlib.asynccontextmanager
async def reading(work: Callable[[asyncio.Event], Any]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(work(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def eventually(check: Callable[[], bool], within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- settings and connecting -----------------------------------------------------


def test_plain_text_is_only_for_loopback_unless_allowed() -> None:
    base = {"from_address": "Support <support@example.com>", "smtp": {"host": "smtp.example.com"}}
    imap = {"host": "imap.example.com", "username": "support", "password": "secret-1", "security": "none"}
    with pytest.raises(ValidationError, match=r"clear text to imap\.example\.com"):
        EmailSettings.model_validate({**base, "imap": imap})
    allowed = EmailSettings.model_validate({**base, "imap": {**imap, "allow_insecure": True}})
    assert allowed.imap.port == 143
    defaults = EmailSettings.model_validate({**base, "imap": {**imap, "security": "tls"}})
    assert (defaults.imap.port, defaults.smtp.port, defaults.smtp.security) == (993, 587, "starttls")
    with pytest.raises(ValidationError, match="must be an address"):
        EmailSettings.model_validate({**base, "from_address": "Support", "imap": allowed.imap.model_dump()})


@pytest.mark.parametrize("security", ["tls", "starttls", "none"])
async def test_channels_test_logs_in_over_tls_starttls_and_plain_loopback(
    box: Box, smtp_peer: SMTPPeer, tmp_path: Path, security: str
) -> None:
    port = box.dovecot.tls_port if security == "tls" else box.dovecot.port
    mail = box.channel(smtp_peer.port, tmp_path, security=security, port=port, ca_file=box.dovecot.ca_file)
    await box.append(customer_mail(1))
    detail = await mail.check()
    assert f"IMAP 127.0.0.1:{port} INBOX: 1 messages, IDLE" in detail
    assert f"SMTP 127.0.0.1:{smtp_peer.port} ready" in detail


async def test_a_wrong_password_is_one_clear_error_not_a_tight_loop(
    box: Box, smtp_peer: SMTPPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mail = box.channel(smtp_peer.port, tmp_path, password="not-the-password")
    with pytest.raises(PermanentFailure, match=rf"IMAP login to 127\.0\.0\.1:\d+ as {box.user} failed"):
        await mail.check()
    mail.bind_store(_NoStore())
    await mail.open(_refuse)
    caplog.set_level(logging.ERROR, logger="router.pollers")
    async with reading(lambda stop: pollers.supervise(mail, stop)):
        await asyncio.sleep(2.5)
    attempts = [r for r in caplog.records if "AUTHENTICATIONFAILED" in r.getMessage()]
    assert 1 <= len(attempts) <= 2
    assert "not-the-password" not in caplog.text


class _NoStore:
    async def get_checkpoint(self, key: str) -> str | None:
        return None

    async def put_checkpoint(self, key: str, value: str) -> None:
        raise AssertionError("nothing to checkpoint")

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> Any:
        raise AssertionError("nothing to dead-letter")


async def _refuse(message: Message) -> Accepted:
    raise AssertionError("nothing to accept")


# -- reading ---------------------------------------------------------------------------


async def opened(mail: EmailChannel, store: SQLiteStore) -> Recorder:
    sink = Recorder(store)
    mail.bind_store(store)
    await mail.open(sink)
    return sink


async def test_backfill_after_downtime_takes_everything_once_and_leaves_the_mailbox_as_is(
    box: Box, store: SQLiteStore, tmp_path: Path
) -> None:
    mail = box.channel(25, tmp_path, batch_size=10)
    sink = await opened(mail, store)
    await box.append(*(customer_mail(i) for i in range(25)))
    async with reading(mail.poll):
        await eventually(lambda: len(sink.calls) == 25)
    await box.append(*(customer_mail(i) for i in range(25, 40)))  # while nobody reads
    async with reading(mail.poll):
        await eventually(lambda: len(sink.calls) == 40)
        await asyncio.sleep(0.3)
    assert [m.external_id for m in sink.calls] == [f"<q{i}@example.org>" for i in range(40)]
    checkpoint = await store.get_checkpoint(box.key)
    assert checkpoint is not None and checkpoint.endswith(":40")
    assert len(box.flags()) == 40 and all(b"\\Seen" not in line for line in box.flags())


async def test_idle_brings_new_mail_at_once_and_polling_works_without_it(
    box: Box, store: SQLiteStore, tmp_path: Path
) -> None:
    for idle, poll_seconds in ((True, 30), (False, 0.3)):
        mail = box.channel(25, tmp_path, name=f"idle-{idle}", idle=idle, poll_seconds=poll_seconds)
        sink = await opened(mail, store)
        async with reading(mail.poll):
            await asyncio.sleep(0.5)
            began = time.monotonic()
            await box.append(customer_mail(100 + idle))
            await eventually(lambda sink=sink, idle=idle: len(sink.calls) == 1 + (not idle), within_s=10)
            assert time.monotonic() - began < 5  # the IDLE renewal, the slow way, is 30 s away


async def test_mark_seen_and_move_to_apply_once_queued(box: Box, store: SQLiteStore, tmp_path: Path) -> None:
    imap = box.dovecot.client(box.user)
    imap.create("Processed")
    imap.logout()
    await box.append(*(customer_mail(i) for i in range(3)))
    seen = box.channel(25, tmp_path, name="seen", mark_seen=True)
    await opened(seen, store)
    async with reading(seen.poll):
        await eventually(lambda: len(box.flags()) == 3 and all(b"\\Seen" in f for f in box.flags()))
    moved = box.channel(25, tmp_path, name="moved", move_to="Processed")
    sink = await opened(moved, store)
    async with reading(moved.poll):
        await eventually(lambda: not box.flags())
    assert len(sink.fresh) == 3 and len(box.flags("Processed")) == 3
    with pytest.raises(PermanentFailure, match="move_to folder 'Nowhere' is not there"):
        await box.channel(25, tmp_path, move_to="Nowhere").check()


async def test_mail_over_max_message_bytes_is_fetched_only_that_far(
    box: Box, store: SQLiteStore, tmp_path: Path
) -> None:
    big = EmailMessage()
    big["From"], big["Subject"], big["Message-ID"] = "Ann <ann@example.org>", "logs", "<big@example.org>"
    big.set_content("My withdrawal failed, logs attached.")
    big.add_attachment(b"x" * 200_000, maintype="application", subtype="octet-stream", filename="log.bin")
    mail = box.channel(25, tmp_path, max_message_bytes=4096)
    sink = await opened(mail, store)
    await box.append(big.as_bytes())
    async with reading(mail.poll):
        await eventually(lambda: len(sink.calls) == 1)
    [message] = sink.calls
    assert message.text.startswith("My withdrawal failed, logs attached.")
    assert "larger than 4096 bytes" in message.text


async def test_a_changed_uidvalidity_rereads_the_folder_and_dedupes_by_message_id(
    box: Box, store: SQLiteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mail = box.channel(25, tmp_path)
    sink = await opened(mail, store)
    await box.append(*(customer_mail(i) for i in range(5)))
    async with reading(mail.poll):
        await eventually(lambda: len(sink.calls) == 5)
    await store.put_checkpoint(box.key, "1:5")  # as if the server had renumbered its UIDs
    async with reading(mail.poll):
        await eventually(lambda: len(sink.calls) == 10)
    assert len(sink.fresh) == 5 and await store.inbound_backlog() == 5
    assert "UIDVALIDITY of INBOX changed" in caplog.text


async def test_a_mail_that_does_not_parse_is_dead_lettered_whole_and_the_rest_flows(
    box: Box, store: SQLiteStore, tmp_path: Path
) -> None:
    poison = customer_mail(1, subject="poison").replace(b"fee", b"f\xe9e")

    def parse(raw: bytes, identity: Identity, truncated_at: int | None) -> Message:
        if b"poison" in raw:
            raise ValueError("cannot read this one")
        return parse_email(raw, identity, truncated_at)

    settings = box.channel(25, tmp_path).settings
    sink = Recorder(store)
    reader = Mailbox(settings.imap, Identity("mail", "example.com", "x"), sink, store, parse)
    await box.append(customer_mail(0), poison, customer_mail(2))
    async with reading(reader.run):
        await eventually(lambda: len(sink.calls) == 2)
        await eventually(lambda: bool(box.flags()))
    [dead] = await store.list_dead_letters()
    assert dead.channel == "mail" and "cannot read this one" in dead.error and "latin-1" in dead.error
    assert dead.payload.encode("latin-1").replace(b"\r\n", b"\n") == poison.replace(b"\r\n", b"\n")
    assert (await store.get_checkpoint(reader.key) or "").endswith(":3")


async def test_two_mailboxes_are_read_at_once_and_a_broken_one_stops_neither(
    box: Box, shared_dovecot: Dovecot, store: SQLiteStore, tmp_path: Path
) -> None:
    sales = Box(shared_dovecot, *shared_dovecot.new_user())
    good = box.channel(25, tmp_path, name="good")
    other = sales.channel(25, tmp_path, name="sales")
    broken = box.channel(25, tmp_path, name="broken", password="wrong-password-99")
    sinks = {each.name: await opened(each, store) for each in (good, other, broken)}
    await box.append(*(customer_mail(i) for i in range(3)))
    await sales.append(customer_mail(7, subject="Partnership"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(pollers.supervise(each, stop)) for each in (good, other, broken)]
    await eventually(lambda: len(sinks["good"].calls) == 3 and len(sinks["sales"].calls) == 1)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sinks["broken"].calls == []


async def test_a_dovecot_restart_is_survived(dovecot: Dovecot, store: SQLiteStore, tmp_path: Path) -> None:
    own = Box(dovecot, *dovecot.new_user())
    mail = own.channel(25, tmp_path)
    sink = await opened(mail, store)
    async with reading(mail.poll):
        await own.append(customer_mail(1))
        await eventually(lambda: len(sink.calls) == 1)
        await asyncio.to_thread(dovecot.restart)
        await own.append(customer_mail(2))
        await eventually(lambda: len(sink.calls) == 2)


# -- sending ---------------------------------------------------------------------------


async def test_sending_translates_smtp_answers(box: Box, smtp_peer: SMTPPeer, tmp_path: Path) -> None:
    mail = box.channel(smtp_peer.port, tmp_path)
    assert await mail.send(*agent_reply("ann@example.org")) == "<m_reply_1@example.com>"
    [received] = smtp_peer.to("ann@example.org")
    assert received.mail_from == "support@example.com"
    assert received.message["In-Reply-To"] == "<q1@example.org>"
    smtp_peer.reject["gone@example.org"] = "550 5.1.1 <gone@example.org>: no such user"
    smtp_peer.reject["busy@example.org"] = "451 4.3.0 mailbox busy, try later"
    with pytest.raises(PermanentFailure, match=r"550 5\.1\.1 <gone@example\.org>: no such user"):
        await mail.send(*agent_reply("gone@example.org"))
    with pytest.raises(TemporaryFailure, match=r"451 4\.3\.0 mailbox busy"):
        await mail.send(*agent_reply("busy@example.org"))
    unreachable = box.channel(free_port(), tmp_path)
    with pytest.raises(TemporaryFailure, match=r"SMTP 127\.0\.0\.1"):
        await unreachable.send(*agent_reply("ann@example.org"))


# -- end to end, with the daemon ----------------------------------------------------------------

DSN = """\
From: Mail Delivery System <MAILER-DAEMON@mx.example.org>
To: support@example.com
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-1@mx.example.org>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b1"

--b1
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; c0@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <c0@example.org>: mailbox unavailable

--b1
Content-Type: text/rfc822-headers

From: Example Support <support@example.com>
To: c0@example.org
Message-ID: {original}

--b1--
"""


async def until(check: Callable[[], Any], within_s: float = 30.0) -> None:
    """Wait for an async condition a user would watch (the inbox, the peer)."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_end_to_end_through_daemon_and_dovecot_restarts(
    dovecot: Dovecot, smtp_peer: SMTPPeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    own = Box(dovecot, *dovecot.new_user())
    table = own.channel_table(smtp_peer.port)
    config = configuration.load(str(write_config(tmp_path, None, table)))

    async def start() -> Daemon:
        daemon = Daemon(config)
        await daemon.start(free_socket())
        return daemon

    daemon = await start()
    try:
        # 200 mails while the daemon runs, with a daemon and a Dovecot restart in between.
        await own.append(*(customer_mail(i) for i in range(70)))
        await daemon.stop()
        await own.append(*(customer_mail(i) for i in range(70, 100)))
        daemon = await start()
        await own.append(*(customer_mail(i) for i in range(100, 140)))
        await asyncio.to_thread(dovecot.restart)
        await own.append(*(customer_mail(i) for i in range(140, 200)))
        store = daemon.store

        async def conversations() -> list[Conversation]:
            return (await store.list_conversations(InboxQuery(status=None, limit=500))).conversations

        async def acked_all() -> bool:
            return (
                len(smtp_peer.matching(Auto_Submitted="auto-replied")) >= 200
                and len(await conversations()) == 200
            )

        await until(acked_all, within_s=60)
        by_thread = {c.thread_key: c for c in await conversations()}
        assert set(by_thread) == {f"<q{i}@example.org>" for i in range(200)}
        acks = {
            mail.message["In-Reply-To"]: mail for mail in smtp_peer.matching(Auto_Submitted="auto-replied")
        }
        assert len(acks) == 200 == len(smtp_peer.received)
        for i in (0, 69, 70, 99, 139, 140, 199):
            ack, conversation = acks[f"<q{i}@example.org>"].message, by_thread[f"<q{i}@example.org>"]
            assert ack["To"] == f"Customer {i} <c{i}@example.org>"
            assert ack["Subject"] == f"Re: Question {i} about fees [{conversation.ref}]"
            assert ack["References"] == f"<q{i}@example.org>" and ack["X-Support-Router-Loop"]
            assert conversation.ref in ack.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            assert [m.kind for m in await store.conversation_messages(conversation.id)] == [
                Kind.CUSTOMER,
                Kind.ACK,
            ]

        # An agent reply goes out threaded under the customer's mail ...
        first = by_thread["<q0@example.org>"]
        admin = await store.get_agent("admin")
        assert admin is not None
        reply = await daemon.services.desk.reply(first.ref, admin, "We are checking your withdrawal.")
        [sent] = await smtp_peer.wait_for(1, In_Reply_To="<q0@example.org>", Message_ID=reply.id)
        assert sent.message["Auto-Submitted"] is None
        assert sent.message["Subject"] == f"Re: Question 0 about fees [{first.ref}]"
        # ... and the customer's answer to it joins the same conversation, without a new ack.
        answer = customer_mail(
            0,
            subject=str(sent.message["Subject"]),
            text="Thanks, any news?",
            message_id="<a0@example.org>",
            In_Reply_To=str(sent.message["Message-ID"]),
            References=f"<q0@example.org> {sent.message['Message-ID']}",
        )
        await own.append(answer)
        await until(lambda: _count(store, first.id, 4))

        # An out-of-office answer to an ack, our own ack coming back, and an
        # unthreaded auto-reply get no ack.
        ack_1 = acks["<q1@example.org>"].message
        await own.append(
            customer_mail(1, subject=f"Automatic reply: {ack_1['Subject']}", message_id="<ooo1@example.org>",
                          Auto_Submitted="auto-replied", In_Reply_To=ack_1["Message-ID"]),
            acks["<q2@example.org>"].data,
            customer_mail(300, subject="Out of office", Auto_Submitted="auto-replied"),
        )  # fmt: skip
        await until(lambda: _count(store, by_thread["<q1@example.org>"].id, 3))
        await until(lambda: _count(store, by_thread["<q2@example.org>"].id, 3))

        # A bounce of the agent reply marks it failed; its recipient then gets no ack for a while.
        await own.append(DSN.format(original=sent.message["Message-ID"]).encode())

        async def bounced() -> bool:
            stored = await store.get_message(reply.id)
            return (
                stored is not None
                and stored.delivery is not None
                and stored.delivery.status.value == "failed"
            )

        await until(bounced)
        failed = await store.get_message(reply.id)
        assert failed is not None and failed.delivery is not None
        assert "550 5.1.1 <c0@example.org>: mailbox unavailable" in (failed.delivery.error or "")
        await own.append(customer_mail(0, subject="Another question", message_id="<new0@example.org>"))
        await until(lambda: _has_conversations(store, 202))
        await asyncio.sleep(1.0)
        assert len(smtp_peer.received) == 201  # 200 acks and the one agent reply
        assert await store.inbound_backlog() == 0
    finally:
        await daemon.stop()


async def _count(store: Any, conversation_id: str, count: int) -> bool:
    return len(await store.conversation_messages(conversation_id)) == count


async def _has_conversations(store: Any, count: int) -> bool:
    return len((await store.list_conversations(InboxQuery(status=None, limit=500))).conversations) >= count


def test_channels_test_names_the_refused_login(box: Box, smtp_peer: SMTPPeer, tmp_path: Path) -> None:
    imap = ", ".join(f"{key} = {json.dumps(value)}" for key, value in box.imap(password="not-it-123").items())
    (tmp_path / "router.toml").write_text(
        f"""
[[channels]]
name = "mail"
type = "email"
from_address = "Example Support <support@example.com>"
imap = {{ {imap} }}
smtp = {{ host = "127.0.0.1", port = {smtp_peer.port}, security = "none" }}

[[teams]]
name = "support"
"""
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "router", "channels", "test", "mail", "-c", "router.toml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"mail: FAIL IMAP login to 127.0.0.1:{box.dovecot.port} as {box.user} failed:" in done.stdout
    assert "AUTHENTICATIONFAILED" in done.stdout and "not-it-123" not in done.stdout + done.stderr
