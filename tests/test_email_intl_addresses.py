"""Customers whose address is not ASCII (RFC 6530-6532): an internationalized
local part (`josé@example.es`, `张伟@例子.中国`) or an IDN domain
(`user@bücher.de`). Sent to a real aiosmtpd with and without SMTPUTF8,
read from a real Dovecot, end to end through the daemon."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import pytest

from router import config as configuration
from router.daemon import Daemon
from router.errors import PermanentFailure
from router.model import Conversation, InboxQuery, Kind, Message
from tests.conftest import free_socket, write_config
from tests.mailboxes import Box, agent_reply
from tests.services import Received, SMTPPeer, free_port

OURS = "Example Support <support@example.com>"


def _reply_in_spanish(to: str) -> tuple[Message, Conversation]:
    return agent_reply(to, name="Ann Núñez", subject="Pregunta", text="Hola Ann")


def _read(received: Received) -> EmailMessage:
    """The mail as an EAI client reads it: its headers may be UTF-8 (RFC 6532),
    which the stdlib's bytes parser would leave as surrogates."""
    mail = email.message_from_string(received.data.decode("utf-8"), policy=email.policy.default)
    assert isinstance(mail, EmailMessage)
    return mail


def _assert_our_headers_are_valid(peer: SMTPPeer, envelope: str) -> None:
    """The one mail the peer took: to `envelope`, from us, threaded, with our
    From and Message-ID parsing without defects."""
    [received] = peer.received
    assert received.mail_from == "support@example.com"
    assert received.rcpt_tos == [envelope]
    mail = _read(received)
    [to] = mail["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Ann Núñez", envelope)
    assert mail["From"] == OURS and not mail["From"].defects
    assert mail["Message-ID"] == "<m_reply_1@example.com>" and not mail["Message-ID"].defects
    assert mail["In-Reply-To"] == "<q1@example.org>"
    assert mail.get_body(("plain",)).get_content().strip() == "Hola Ann"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("written", "envelope"),
    [
        ("josé@example.es", "josé@example.es"),
        ("张伟@例子.中国", "张伟@例子.中国"),
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@faß.de", "user@faß.de"),  # IDNA 2003 would make it fass.de: someone else
    ],
)
async def test_a_server_offering_smtputf8_delivers_to_non_ascii_addresses(
    box: Box, smtputf8_peer: SMTPPeer, tmp_path: Path, written: str, envelope: str
) -> None:
    mail = box.channel(smtputf8_peer.port, tmp_path)
    assert await mail.send(*_reply_in_spanish(written)) == "<m_reply_1@example.com>"
    _assert_our_headers_are_valid(smtputf8_peer, envelope)


async def test_an_idn_domain_goes_as_its_a_label_to_a_server_without_smtputf8(
    box: Box, smtp_peer: SMTPPeer, tmp_path: Path
) -> None:
    mail = box.channel(smtp_peer.port, tmp_path)
    await mail.send(*_reply_in_spanish("user@bücher.de"))
    _assert_our_headers_are_valid(smtp_peer, "user@xn--bcher-kva.de")
    head = smtp_peer.received[0].data.partition(b"\r\n\r\n")[0]
    assert head.isascii()


@pytest.mark.parametrize("written", ["josé@example.es", "张伟@例子.中国", "user@faß.de"])
async def test_an_address_needing_smtputf8_fails_for_good_when_the_server_lacks_it(
    box: Box, smtp_peer: SMTPPeer, tmp_path: Path, written: str
) -> None:
    mail = box.channel(smtp_peer.port, tmp_path)
    with pytest.raises(PermanentFailure, match=rf"{smtp_peer.port} does not offer SMTPUTF8.*{written}"):
        await mail.send(*_reply_in_spanish(written))
    assert smtp_peer.received == []


@pytest.mark.parametrize(
    "written",
    [
        "jo sé@example.es",
        "josé@exa mple.es",
        "josé@",
        "user@bü..de",
        "user@example..com",
        "user@" + "ü" * 70 + ".de",
    ],
)
async def test_a_malformed_address_is_refused_for_good_without_connecting(
    box: Box, tmp_path: Path, written: str
) -> None:
    mail = box.channel(free_port(), tmp_path)  # nobody listens: connecting would be a TemporaryFailure
    with pytest.raises(PermanentFailure, match="invalid recipient address"):
        await mail.send(*_reply_in_spanish(written))


def _rfc6532_mail(sender: str, message_id: str, subject: str, text: str, in_reply_to: str = "") -> bytes:
    """Mail as an EAI client writes it: UTF-8 straight in the headers."""
    headers = [
        f"From: {sender}",
        "To: support@example.com",
        f"Subject: {subject}",
        f"Message-ID: {message_id}",
        f"Date: {formatdate()}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    if in_reply_to:
        headers.append(f"In-Reply-To: {in_reply_to}")
    return ("\r\n".join(headers) + "\r\n\r\n" + text + "\r\n").encode()


async def test_mail_from_non_ascii_addresses_is_read_acked_and_threaded_end_to_end(
    box: Box, smtputf8_peer: SMTPPeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = configuration.load(str(write_config(tmp_path, None, box.channel_table(smtputf8_peer.port))))
    customers = {
        "<e1@example.es>": (
            "José Núñez <josé@example.es>",
            "José Núñez",
            "josé@example.es",
            "josé@example.es",
        ),
        "<e2@example.cn>": ("张伟 <张伟@例子.中国>", "张伟", "张伟@例子.中国", "张伟@例子.中国"),
        "<e3@example.de>": ("Jürgen <user@bücher.de>", "Jürgen", "user@bücher.de", "user@xn--bcher-kva.de"),
    }
    daemon = Daemon(config)
    await daemon.start(free_socket())
    try:
        await box.append(
            *(
                _rfc6532_mail(sender, message_id, "¿Dónde está mi retiro?", "Mi retiro no llegó.")
                for message_id, (sender, *_) in customers.items()
            )
        )
        acks = await smtputf8_peer.wait_for(3, within_s=30, Auto_Submitted="auto-replied")
        assert len(acks) == 3
        conversations = {
            c.thread_key: c
            for c in (await daemon.store.list_conversations(InboxQuery(status=None))).conversations
        }
        for message_id, (_, name, written, envelope) in customers.items():
            customer = conversations[message_id].customer
            assert (customer.name, customer.address) == (name, written)
            [ack] = [mail for mail in acks if mail.message["In-Reply-To"] == message_id]
            assert ack.rcpt_tos == [envelope]
            [to] = _read(ack)["To"].addresses
            assert (to.display_name, to.addr_spec) == (name, envelope)

        # José answers the ack: the answer joins his conversation, from him.
        jose = conversations["<e1@example.es>"]
        [ack] = [mail for mail in acks if mail.message["In-Reply-To"] == "<e1@example.es>"]
        answer = _rfc6532_mail(
            "José Núñez <josé@example.es>", "<e4@example.es>", f"Re: {ack.message['Subject']}",
            "Era el número 42.", in_reply_to=ack.message["Message-ID"],
        )  # fmt: skip
        await box.append(answer)
        deadline = time.monotonic() + 30
        while len(thread := await daemon.store.conversation_messages(jose.id)) < 3:
            assert time.monotonic() < deadline, "the answer did not join the conversation"
            await asyncio.sleep(0.1)
        assert [(m.kind, m.sender.address) for m in thread if m.kind is Kind.CUSTOMER] == [
            (Kind.CUSTOMER, "josé@example.es"),
            (Kind.CUSTOMER, "josé@example.es"),
        ]
    finally:
        await daemon.stop()
