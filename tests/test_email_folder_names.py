"""Folder names in modified UTF-7: the codec on RFC 3501's vectors, and the
email channel reading from and moving to non-ASCII folders on a real Dovecot."""

from __future__ import annotations

from pathlib import Path

import pytest

from channels.email.folder_names import decode, encode
from channels.email.mailbox import check
from router.errors import PermanentFailure
from router.store.sqlite import SQLiteStore
from tests.mailboxes import Box
from tests.test_email_channel import customer_mail, eventually, opened, reading

VECTORS = [
    ("INBOX", "INBOX"),
    ("&", "&-"),
    ("Support & Billing", "Support &- Billing"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 5.1.3
    ("Обработано", "&BB4EMQRABDAEMQQ+BEIEMAQ9BD4-"),
    ("已处理", "&XfJZBHQG-"),
    ("Entwürfe", "Entw&APw-rfe"),
    ("😀", "&2D3eAA-"),  # outside the BMP: a surrogate pair
]


@pytest.mark.parametrize(("human", "wire"), VECTORS)
def test_known_vectors_both_ways(human: str, wire: str) -> None:
    assert encode(human) == wire
    assert decode(wire) == human


@pytest.mark.parametrize(
    "name", ["", "a&b&&c", "&Ж&", "Ж/Ж,Ж-Ж", "日本語 & English & Русский", "tab\there", "ŋ" * 50]
)
def test_round_trip_and_only_printable_ascii_on_the_wire(name: str) -> None:
    wire = encode(name)
    assert decode(wire) == name
    assert all(" " <= char <= "~" for char in wire)


@pytest.mark.parametrize("bad", ["&A-", "&AG-", "&2D0-"])  # not base64; odd bytes; half a pair
def test_a_broken_shifted_run_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        decode(bad)


# -- against Dovecot --------------------------------------------------------------------

INBOX = "Поддержка"
DONE = "已处理 & Обработано"


def create(box: Box, *humans: str) -> list[bytes]:
    """CREATE each folder by its encoded name, as any mail client would;
    returns the folder list as Dovecot then reports it."""
    imap = box.dovecot.client(box.user)
    try:
        for human in humans:
            status, answer = imap.create(f'"{encode(human)}"')
            assert status == "OK", answer
        status, listed = imap.list()
        assert status == "OK", listed
        return [line for line in listed if isinstance(line, bytes)]
    finally:
        imap.logout()


async def test_mail_is_read_from_and_moved_to_non_ascii_folders(
    box: Box, store: SQLiteStore, tmp_path: Path
) -> None:
    listed = create(box, INBOX, DONE)
    assert any(line.endswith(f'"{encode(DONE)}"'.encode()) for line in listed), listed
    await box.append(*(customer_mail(i) for i in range(3)), folder=f'"{encode(INBOX)}"')
    mail = box.channel(25, tmp_path, folder=INBOX, move_to=DONE)
    assert f"IMAP 127.0.0.1:{box.dovecot.port} {INBOX}: 3 messages" in await check(mail.settings.imap)
    sink = await opened(mail, store)
    async with reading(mail.poll):
        await eventually(lambda: len(sink.fresh) == 3 and not box.flags(f'"{encode(INBOX)}"'))
    for i in range(3):
        assert await store.find_message("mail", f"<q{i}@example.org>") is not None
    assert len(box.flags(f'"{encode(DONE)}"')) == 3
    checkpoint = await store.get_checkpoint(f"imap/mail/{box.user}@127.0.0.1/{INBOX}")
    assert checkpoint is not None and checkpoint.endswith(":3")


async def test_missing_non_ascii_folders_are_named_as_configured(box: Box, tmp_path: Path) -> None:
    create(box, INBOX)
    with pytest.raises(PermanentFailure, match="cannot open folder 'Нет такой'"):
        await check(box.channel(25, tmp_path, folder="Нет такой").settings.imap)
    with pytest.raises(PermanentFailure, match="move_to folder '没有 & 这个' is not there"):
        await check(box.channel(25, tmp_path, folder=INBOX, move_to="没有 & 这个").settings.imap)
