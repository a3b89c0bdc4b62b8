"""The SQLite store's connection threads: batched writes stay atomic one by one."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from router.store.sqlite_threads import ConnectionThread, in_one_transaction


def _create(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[ConnectionThread]:
    thread = ConnectionThread(tmp_path / "t.db", "test-writer", (), in_one_transaction, 16, _create)
    await thread.start()
    yield thread
    await thread.stop()


def insert(key: str, then_fail: bool = False) -> Callable[[sqlite3.Connection], str]:
    def work(db: sqlite3.Connection) -> str:
        db.execute("INSERT INTO t VALUES (?)", (key,))
        if then_fail:
            raise ValueError(key)
        return key

    return work


def keys(db: sqlite3.Connection) -> list[str]:
    return [key for (key,) in db.execute("SELECT k FROM t ORDER BY k")]


def hold_up(_db: sqlite3.Connection) -> None:
    """Keeps the thread busy, so that the calls made next wait together: one batch."""
    time.sleep(0.05)


async def test_a_failing_call_rolls_back_alone_and_the_others_commit(writer: ConnectionThread) -> None:
    calls = [hold_up, insert("a"), insert("b", then_fail=True), insert("c"), insert("a")]
    _, *results = await asyncio.gather(*(writer.call(work) for work in calls), return_exceptions=True)
    assert results[0] == "a" and results[2] == "c"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert await writer.call(keys) == ["a", "c"]


async def test_a_lone_failing_call_is_rolled_back(writer: ConnectionThread) -> None:
    with pytest.raises(ValueError):
        await writer.call(insert("a", then_fail=True))
    assert await writer.call(keys) == []


async def test_a_failure_that_ends_the_transaction_fails_the_calls_before_it(
    writer: ConnectionThread,
) -> None:
    def lose_transaction(db: sqlite3.Connection) -> None:
        db.execute("ROLLBACK")
        raise OSError("disk gone")

    calls = [hold_up, insert("a"), lose_transaction, insert("b")]
    _, *results = await asyncio.gather(*(writer.call(work) for work in calls), return_exceptions=True)
    assert [type(result) for result in results] == [OSError, OSError, str]
    assert await writer.call(keys) == ["b"]


async def test_a_cursor_is_refused(writer: ConnectionThread) -> None:
    with pytest.raises(TypeError):
        await writer.call(lambda db: db.execute("SELECT 1"))


async def test_stop_runs_what_was_called_before_it(writer: ConnectionThread) -> None:
    pending = [writer.call(insert(f"k{n:03}")) for n in range(100)]
    await writer.stop()
    assert [future.result() for future in pending] == [f"k{n:03}" for n in range(100)]
    with pytest.raises(RuntimeError):
        writer.call(keys)
