"""Odd mail through a real Dovecot: what the parser and the mailbox loop must
survive without losing the customer's words to the dead letters."""

from __future__ import annotations

from pathlib import Path

from router.store.sqlite import SQLiteStore
from tests.mailboxes import Box
from tests.test_email_channel import opened, reading, until


async def test_a_mail_whose_charset_label_is_no_charset_still_reaches_the_inbox(
    box: Box, store: SQLiteStore, tmp_path: Path
) -> None:
    """Python knows "undefined" and "idna" as codecs that refuse to decode
    (UnicodeError, not UnicodeDecodeError): a label like that is a lie to
    read past, as any other wrong label is."""
    lies = [
        b"From: Ann <ann@example.org>\r\nSubject: =?undefined?q?Withdrawal_stuck?=\r\n"
        b"Message-ID: <lie1@example.org>\r\nContent-Type: text/plain; charset=undefined\r\n\r\n"
        b"My withdrawal is stuck since Monday.\r\n",
        b"From: Bob <bob@example.org>\r\nSubject: Deposit missing\r\nMessage-ID: <lie2@example.org>\r\n"
        b"Content-Type: text/plain; charset=idna\r\n\r\nMy deposit of 5 BTC caf\xe9 has not arrived.\r\n",
    ]
    mail = box.channel(25, tmp_path)
    sink = await opened(mail, store)
    await box.append(*lies)
    async with reading(mail.poll):
        await until(lambda: _checkpoint_at(store, box, 2), within_s=10)
    assert [d.error for d in await store.list_dead_letters()] == []
    first, second = sink.calls
    assert first.subject == "Withdrawal stuck" and first.text == "My withdrawal is stuck since Monday."
    assert second.text.startswith("My deposit of 5 BTC caf")


async def _checkpoint_at(store: SQLiteStore, box: Box, uid: int) -> bool:
    """Every mail up to `uid` taken: queued or dead-lettered."""
    return (await store.get_checkpoint(box.key) or "").endswith(f":{uid}")
