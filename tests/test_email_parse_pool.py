"""Mail parsed in a worker process: the same Messages as parsing in the
daemon, dead letters as before, nothing lost when a worker dies, and no
worker left behind when the daemon stops."""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.email.mailbox import Mailbox
from channels.email.parse import Identity, parse_email
from channels.email.parse_pool import ParsePool, parse_batch
from router.model import Message
from router.store.sqlite import SQLiteStore
from tests.conftest import write_config
from tests.mailboxes import Box
from tests.services import free_port
from tests.test_daemon_process import spawn, stop, wait_ready
from tests.test_email_channel import Recorder, customer_mail, eventually, reading

CORPUS = Path(__file__).parent / "data" / "email"
IDENTITY = Identity("mail", "example.com", "x")


# Parse functions for the worker, which imports them by name.


def parse_or_refuse(raw: bytes, identity: Identity, truncated_at: int | None) -> Message:
    if b"poison" in raw:
        raise ValueError("cannot read this one")
    return parse_email(raw, identity, truncated_at)


def parse_after_a_hang_in_a_worker(
    marker: Path, raw: bytes, identity: Identity, truncated_at: int | None
) -> Message:
    """The first worker to get a mail writes its pid to `marker` and hangs
    (until killed); in the daemon, or once `marker` exists, this parses."""
    if multiprocessing.parent_process() is not None and not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(60)
    return parse_email(raw, identity, truncated_at)


@pytest.fixture
async def pool() -> AsyncIterator[ParsePool]:
    opened = ParsePool()
    yield opened
    await opened.close()


async def hung_worker(marker: Path) -> int:
    """The pid of the worker hanging on a batch, once one is."""
    await eventually(lambda: _written(marker) is not None)
    pid = _written(marker)
    assert pid is not None
    return pid


def _written(marker: Path) -> int | None:
    try:
        return int(marker.read_text())
    except (FileNotFoundError, ValueError):  # not (all) written yet
        return None


async def test_a_batch_parsed_in_a_worker_gives_the_messages_parsed_here(pool: ParsePool) -> None:
    raws = [path.read_bytes() for path in sorted(CORPUS.glob("*.eml"))]
    mails: list[tuple[bytes, int | None]] = [(raw, None) for raw in raws]
    mails.append((raws[0][:1024], 1024))  # a fetch cut short, which the text says
    there = await pool.parse(parse_email, IDENTITY, mails)
    here = parse_batch(parse_email, IDENTITY, mails)
    assert pool.pids
    assert len(there) == len(here) == len(raws) + 1
    for theirs, ours in zip(there, here, strict=True):
        assert isinstance(theirs, Message) and isinstance(ours, Message)
        # Random ids; a mail without a usable Date is received "now", in each process.
        assert abs((theirs.received_at - ours.received_at).total_seconds()) < 60
        left, right = theirs.to_dict(), ours.to_dict()
        for key in ("id", "received_at"):
            del left[key], right[key]
        assert left == right
    cut = there[-1]
    assert isinstance(cut, Message) and cut.text.endswith("only its start was fetched.]")


async def test_a_mail_that_does_not_parse_in_a_worker_is_dead_lettered_whole(
    box: Box, store: SQLiteStore, pool: ParsePool, tmp_path: Path
) -> None:
    poison = customer_mail(1, subject="poison").replace(b"fee", b"f\xe9e")
    settings = box.channel(25, tmp_path).settings
    sink = Recorder(store)
    reader = Mailbox(settings.imap, IDENTITY, sink, store, parse_or_refuse, pool)
    await box.append(customer_mail(0), poison, customer_mail(2))
    async with reading(reader.run):
        await eventually(lambda: len(sink.calls) == 2)
        await eventually(lambda: bool(box.flags()))
    assert pool.pids
    [dead] = await store.list_dead_letters()
    assert dead.channel == "mail" and "ValueError: cannot read this one" in dead.error
    assert "UID 2" in dead.error and "latin-1" in dead.error
    assert dead.payload.encode("latin-1").replace(b"\r\n", b"\n") == poison.replace(b"\r\n", b"\n")
    assert [m.external_id for m in sink.calls] == ["<q0@example.org>", "<q2@example.org>"]
    assert (await store.get_checkpoint(reader.key) or "").endswith(":3")


async def test_a_killed_worker_loses_no_mail_and_the_next_batch_gets_a_new_one(
    box: Box, store: SQLiteStore, pool: ParsePool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "hung-worker"
    parse = functools.partial(parse_after_a_hang_in_a_worker, marker)
    sink = Recorder(store)
    reader = Mailbox(box.channel(25, tmp_path).settings.imap, IDENTITY, sink, store, parse, pool)
    caplog.set_level(logging.WARNING, logger="channels.email.parse_pool")
    await box.append(*(customer_mail(i) for i in range(3)))
    async with reading(reader.run):
        killed = await hung_worker(marker)
        assert killed in pool.pids and sink.calls == []
        os.kill(killed, signal.SIGKILL)
        await eventually(lambda: len(sink.calls) == 3)
        await box.append(customer_mail(3))
        await eventually(lambda: len(sink.calls) == 4)
        assert pool.pids and killed not in pool.pids
    assert [m.external_id for m in sink.calls] == [f"<q{i}@example.org>" for i in range(4)]
    assert (await store.get_checkpoint(reader.key) or "").endswith(":4")
    [warning] = [r.getMessage() for r in caplog.records if r.name == "channels.email.parse_pool"]
    assert "worker process died; the 3 mails it had are parsed on the event loop" in warning


async def test_closing_does_not_wait_for_a_long_parse_and_leaves_no_worker(
    pool: ParsePool, tmp_path: Path
) -> None:
    marker = tmp_path / "hung-worker"
    parse = functools.partial(parse_after_a_hang_in_a_worker, marker)
    parsing = asyncio.create_task(pool.parse(parse, IDENTITY, [(customer_mail(0), None)]))
    worker = await hung_worker(marker)
    began = time.monotonic()
    await pool.close()
    assert time.monotonic() - began < 3
    assert not _running(worker)
    # What the worker had is parsed here: closing loses no mail either.
    [message] = await asyncio.wait_for(parsing, 10)
    assert isinstance(message, Message) and message.external_id == "<q0@example.org>"
    [after] = await pool.parse(parse_email, IDENTITY, [(customer_mail(1), None)])
    assert isinstance(after, Message) and pool.pids == []


async def test_the_daemon_parses_in_a_worker_and_stops_it_on_sigterm(box: Box, tmp_path: Path) -> None:
    table = (
        box.channel_table(25)
        + """
[acks]
enabled = false
"""
    )
    config = write_config(tmp_path, None, table)
    port = free_port()
    proc = spawn(tmp_path, port, "-c", str(config))
    try:
        await wait_ready(port, proc)
        await box.append(*(customer_mail(i) for i in range(20)))
        await eventually(lambda: _queued(tmp_path / "router.db") == 20)
        workers = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
        assert workers, "no parse worker process"
    finally:
        code, took, _, err = stop(proc, tmp_path)
    assert code == 0 and took < 10
    await eventually(lambda: not any(_running(pid) for pid in workers), within_s=5)
    assert "Traceback" not in err and "worker process died" not in err


def _queued(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM messages WHERE direction = 'in'").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(stat.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
