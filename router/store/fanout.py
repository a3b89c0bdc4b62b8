"""In-process wake-ups and event fan-out, for stores that have no server to
push them (SQLite) and for local fan-out behind one server subscription."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from router.model import Event

T = TypeVar("T")
POLL_S = 0.5
"""How often a blocked claim looks again by itself: rows another process wrote
(the CLI, a second daemon) raise no signal here, and visibility timeouts expire silently."""


class Signal:
    """A broadcast wake-up that cannot be missed: a waiter takes its ticket
    before looking for work, so a `fire()` between the look and the wait
    still wakes it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


async def wait_for_work(
    signal: Signal, block_s: float, attempt: Callable[[float], Awaitable[list[T]]]
) -> list[T]:
    """Call `attempt(elapsed_s)` until it returns something or `block_s` has
    passed, sleeping until `signal` fires (or POLL_S) in between."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        ticket = signal.ticket()
        found = await attempt(loop.time() - started)
        remaining = block_s - (loop.time() - started)
        if found or remaining <= 0:
            return found
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ticket.wait(), min(remaining, POLL_S))


def put_dropping_oldest(queue: asyncio.Queue[T], item: T) -> None:
    """For a reader that may fall behind: a full queue loses its oldest item,
    and the writer never waits."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)


class EventHub:
    """Fans events out to subscribers' bounded queues. A subscriber that falls
    behind loses its oldest events; a publisher never waits for anyone."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._maxsize = maxsize
        # Weak, so a subscription dropped before its first read does not linger.
        self._queues: weakref.WeakSet[asyncio.Queue[Event]] = weakref.WeakSet()

    @property
    def has_subscribers(self) -> bool:
        """Lets a publisher skip the work of building events nobody reads."""
        return bool(self._queues)

    def publish(self, event: Event) -> None:
        for queue in list(self._queues):
            put_dropping_oldest(queue, event)

    def subscribe(self) -> AsyncGenerator[Event, None]:
        """Registers now, not at the first `__anext__`, so no event published
        after this call is missed."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self._maxsize)
        self._queues.add(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[Event]) -> AsyncGenerator[Event, None]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)
