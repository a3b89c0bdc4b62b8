"""The IMAP FETCH reading that bypasses aioimaplib's quadratic paths: the
same mails come out however the server's bytes are cut, and the
inactivity timeout still fires (only) when the server goes quiet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aioimaplib.aioimaplib import CommandTimeout, IMAP4ClientProtocol

from channels.email.imap import READ_SLICE, Fetched, _Fetch, _fetched, _slice_reads

CORPUS = Path(__file__).parent / "data" / "email"


def mails() -> list[bytes]:
    """Every corpus mail, plus one full of parentheses and one empty."""
    found = [path.read_bytes() for path in sorted(CORPUS.glob("*.eml"))]
    return [*found, b"Subject: (((\r\n\r\n)) ( text ) (\r\n", b""]


def response(items: list[bytes]) -> bytes:
    """A FETCH answer as Dovecot writes it; every other item carries its UID
    after the literal, which servers may do too."""
    out = []
    for i, mail in enumerate(items, start=1):
        if i % 2:
            out.append(
                b"* %d FETCH (UID %d RFC822.SIZE %d BODY[]<0> {%d}\r\n" % (i, i * 10, len(mail), len(mail))
            )
            out.append(mail + b")\r\n")
        else:
            out.append(b"* %d FETCH (RFC822.SIZE %d BODY[]<0> {%d}\r\n" % (i, len(mail), len(mail)))
            out.append(mail + b" UID %d)\r\n" % (i * 10))
    return b"".join(out) + b"A1 OK Fetch completed (0.001 + 0.000 secs).\r\n"


def reader(timeout: float = 30) -> tuple[IMAP4ClientProtocol, _Fetch]:
    loop = asyncio.get_running_loop()
    protocol = IMAP4ClientProtocol(loop, None)
    protocol.state = "SELECTED"
    _slice_reads(protocol)
    fetch = _Fetch("A1", "1:*", "(UID RFC822.SIZE BODY.PEEK[])", loop=loop, timeout=timeout)
    protocol.pending_async_commands["FETCH"] = fetch
    return protocol, fetch


@pytest.mark.parametrize("chunk", [7, 997, READ_SLICE - 1, 256 * 1024, 10**9])
async def test_the_same_mails_come_out_however_the_bytes_are_cut(chunk: int) -> None:
    items = mails()
    data = response(items)
    protocol, fetch = reader()
    for start in range(0, len(data), chunk):
        protocol.data_received(data[start : start + chunk])
    await asyncio.wait_for(fetch.wait(), 1)
    assert fetch.response.result == "OK"
    expected = [Fetched(i * 10, mail, len(mail)) for i, mail in enumerate(items, start=1)]
    assert _fetched(fetch.response.lines) == expected


async def test_a_fetch_times_out_only_once_the_server_goes_quiet() -> None:
    data = response(mails()[:3])
    protocol, fetch = reader(timeout=0.3)
    for start in range(0, len(data) - 100, len(data) // 8):  # trickles in for 0.8 s
        protocol.data_received(data[start : start + len(data) // 8])
        await asyncio.sleep(0.1)
    assert not fetch._event.is_set()
    with pytest.raises(CommandTimeout):
        await asyncio.wait_for(fetch.wait(), 1)
