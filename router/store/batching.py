"""Group commit: concurrent callers' writes gathered into one batch.

Ingest is the hot path: many webhook requests enqueue at once, and one
transaction (SQLite) or one pipeline (Redis) for all of them costs about what
one write alone does. Each caller still gets its own answer, and only after
its batch is durable. Both stores use this; each supplies the batch write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from router.errors import StoreError

T = TypeVar("T")
R = TypeVar("R")
WriteBatch = Callable[[list[T]], Awaitable[list[R | Exception]]]


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class GroupCommit(Generic[T, R]):
    """`write` gets up to `max_batch` items and returns one result or
    exception per item, in order; raising fails the whole batch."""

    def __init__(self, write: WriteBatch[T, R], name: str, max_batch: int = 500) -> None:
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._pending: list[_Pending[T, R]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Writes and answers everything already handed in."""
        if self._task is not None:
            task, self._task = self._task, None
            self._ready.set()
            await task

    async def submit(self, item: T) -> R:
        if self._task is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future))
        self._ready.set()
        return await future

    async def _run(self) -> None:
        """While one batch is written, the next one gathers."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                self._pending = self._pending[self._max_batch :]
                await self._flush(batch)
            if self._task is None:
                return

    async def _flush(self, batch: list[_Pending[T, R]]) -> None:
        outcomes: list[R | Exception]
        try:
            outcomes = await self._write([p.item for p in batch])
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
