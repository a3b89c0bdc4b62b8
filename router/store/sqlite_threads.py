"""Threads that each own one SQLite connection and run calls on it in order.

A call is a synchronous function of the connection. The writer's thread
takes every call that is waiting (up to `max_batch`), runs them in one
transaction (`in_one_transaction`) and answers them with one wake-up of the
event loop, which costs a self-pipe write and a GIL hand-over each. The
reader's thread answers each read at once (`max_batch=1`): a quick read
must not wait for a slow one that came after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]
Job = tuple[Work[Any], asyncio.Future[Any]]
Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]
Runner = Callable[[sqlite3.Connection, list[Job]], list[Outcome]]


class ConnectionThread:
    """One thread, one connection, calls in the order they were made.

    Cheaper per call than `loop.run_in_executor` (half the time or less,
    measured): a queue put out, a `call_soon_threadsafe` back, shared by a
    batch. A call whose caller was cancelled before it started is skipped;
    one already running finishes, which is harmless because a call is one
    whole transaction or a read."""

    def __init__(
        self,
        path: Path,
        name: str,
        pragmas: tuple[str, ...],
        run: Runner,
        max_batch: int,
        setup: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self._path = path
        self._pragmas = pragmas
        self._run = run
        self._max_batch = max_batch
        self._setup = setup
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._open = False

    async def start(self) -> None:
        """Connect (and run `setup`) on the thread; raises its sqlite3.Error."""
        self._loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = self._loop.create_future()
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        self._thread.start()
        await self._started
        self._open = True

    def call(self, work: Work[T]) -> asyncio.Future[T]:
        """The future of `work(connection)`, run after every call made before."""
        if not self._open:
            raise RuntimeError("the connection thread is not running")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((work, future))
        return future

    async def stop(self) -> None:
        """Close the connection after every call made before; idempotent."""
        if not self._thread.is_alive():
            return
        self._open = False
        self._jobs.put(None)
        await asyncio.shield(self._stopped)

    def _serve(self) -> None:
        try:
            connection = self._connect()
        except BaseException as exc:
            self._answer([(self._started, None, exc), (self._stopped, None, None)])
            return
        self._answer([(self._started, None, None)])
        try:
            while batch := self._next_batch():
                self._answer(self._run(connection, batch))
        finally:
            connection.close()
            self._answer([(self._stopped, None, None)])

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, isolation_level=None)
        try:
            for pragma in self._pragmas:
                connection.execute(f"PRAGMA {pragma}")
            if self._setup is not None:
                self._setup(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _next_batch(self) -> list[Job]:
        """The calls waiting, at least one; none once `stop` was called."""
        batch: list[Job] = []
        item = self._jobs.get()
        while item is not None:
            batch.append(item)
            if len(batch) == self._max_batch:
                break
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
        else:
            self._jobs.put(None)  # seen after this batch: stop then
        return batch

    def _answer(self, outcomes: list[Outcome]) -> None:
        # The loop is closed when its owner exited without closing the store.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, outcomes)


def _settle(outcomes: list[Outcome]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def one_by_one(db: sqlite3.Connection, batch: list[Job]) -> list[Outcome]:
    """For reads: each call on its own."""
    outcomes: list[Outcome] = []
    for work, future in batch:
        if future.cancelled():
            continue
        try:
            outcomes.append((future, _checked(work(db)), None))
        except BaseException as exc:
            outcomes.append((future, None, exc))
    return outcomes


def in_one_transaction(db: sqlite3.Connection, batch: list[Job]) -> list[Outcome]:
    """For writes: the batch in one BEGIN IMMEDIATE ... COMMIT, each call in
    its own savepoint, so a call that raises is rolled back alone and the
    others commit. Nobody is answered before the COMMIT: a result is durable.
    One commit for several calls is cheaper (a COMMIT writes every page the
    transaction touched to the WAL, and calls touch the same pages)."""
    outcomes: list[Outcome] = []
    waiting = deque(batch)
    while waiting:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            outcomes += [(future, None, exc) for _, future in waiting]
            break
        done, lost = _run_savepoints(db, waiting, outcomes)
        if lost is not None:
            # The failure ended the transaction: the calls before it are gone too.
            outcomes += [(future, None, lost) for future, _ in done]
            continue
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db)
            outcomes += [(future, None, exc) for future, _ in done]
        else:
            outcomes += [(future, result, None) for future, result in done]
    return outcomes


def _run_savepoints(
    db: sqlite3.Connection, waiting: deque[Job], outcomes: list[Outcome]
) -> tuple[list[tuple[asyncio.Future[Any], Any]], BaseException | None]:
    """Run waiting calls inside the open transaction until they are done or
    one's failure ends it. Returns the calls that await the COMMIT, and that
    failure; failed calls go to `outcomes`. A lone call needs no savepoint:
    the transaction is its own (and every statement saved is a GIL hand-over
    saved, which costs most while the event loop is busy)."""
    savepoints = len(waiting) > 1
    done: list[tuple[asyncio.Future[Any], Any]] = []
    while waiting:
        work, future = waiting.popleft()
        if future.cancelled():
            continue
        try:
            if savepoints:
                db.execute("SAVEPOINT call")
            result = _checked(work(db))
            if savepoints:
                db.execute("RELEASE call")
        except BaseException as exc:
            outcomes.append((future, None, exc))
            if not (savepoints and _undo_call(db)):
                _rollback(db)
                return done, exc
        else:
            done.append((future, result))
    return done, None


def _undo_call(db: sqlite3.Connection) -> bool:
    """Roll back to the failed call's savepoint; False when the failure (an
    I/O error, say) already took the whole transaction with it."""
    if not db.in_transaction:
        return False
    try:
        db.execute("ROLLBACK TO call")
        db.execute("RELEASE call")
    except sqlite3.Error:
        _rollback(db)
        return False
    return True


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _checked(result: T) -> T:
    if isinstance(result, sqlite3.Cursor):
        # Freed on the loop's thread, it would reset its statement under
        # this thread's feet (SQLITE_MISUSE, seen).
        raise TypeError("a store call must not return a cursor")
    return result
