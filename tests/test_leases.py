"""The lease holder loop (router/leases.py) on both stores, in one process.

Each "process" here is a holder loop with its own store object on the same
data, its work a poller that records which holder polled when and with
which fencing token. A real kill -9 of a holder is in test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router import leases
from router.errors import StoreError
from router.store import Store
from router.store.redis import RedisStore
from router.store.sqlite import SQLiteStore
from tests.services import RedisServer

TTL_S = 1.0
POLL_S = 0.02
NAME = "poller:mail"


@dataclass
class Polls:
    """Every poll of every holder: (holder, fencing token, monotonic time)."""

    seen: list[tuple[str, int, float]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def work(self, holder: str) -> leases.Work:
        async def poll(stop: asyncio.Event) -> None:
            lease = leases.HELD.get()
            assert lease is not None and lease.holder == holder
            while not stop.is_set():
                self.seen.append((holder, lease.token, time.monotonic()))
                self.changed.set()
                await asyncio.sleep(POLL_S)

        return poll

    def holders(self) -> list[str]:
        """Who polled, in order, each run of polls once."""
        order: list[str] = []
        for holder, _, _ in self.seen:
            if not order or order[-1] != holder:
                order.append(holder)
        return order

    async def wait_for(self, holder: str, within_s: float) -> float:
        """When `holder` polled first."""
        deadline = time.monotonic() + within_s
        while (first := next((at for who, _, at in self.seen if who == holder), None)) is None:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{holder} never polled; polls by {self.holders()}"
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue
        return first

    def assert_one_holder_at_a_time(self) -> None:
        """Runs of polls never interleave, and each new holder's token is higher."""
        runs: list[tuple[str, int]] = []
        for holder, token, _ in self.seen:
            if not runs or runs[-1] != (holder, token):
                runs.append((holder, token))
        assert len(runs) == len(set(runs)), f"two holders polled in turns: {runs}"
        tokens = [token for _, token in runs]
        assert tokens == sorted(set(tokens)), f"fencing tokens did not grow: {runs}"


class Partitionable:
    """A store whose calls fail from `cut()` on: a holder cut off from the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.cut_off = False

    def cut(self) -> None:
        self.cut_off = True

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut_off:
                raise StoreError("partitioned")
            return await attribute(*args, **kwargs)

        return call


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    """A factory of opened stores on one fresh data set."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/router.db"
        make: Callable[[], Store] = lambda: SQLiteStore(url)  # noqa: E731
    else:
        server: RedisServer = request.getfixturevalue("shared_redis")
        url = server.url(f"leases-{uuid.uuid4().hex[:12]}")
        make = lambda: RedisStore(url)  # noqa: E731
    opened: list[Store] = []

    async def open_one() -> Store:
        store = make()
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def test_a_cut_off_holder_stops_before_another_takes_over(stores: Callable[[], Any]) -> None:
    polls = Polls()
    first = Partitionable(await stores())
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    holding = asyncio.create_task(leases.hold(first, NAME, "a", polls.work("a"), stop_first, TTL_S))
    await polls.wait_for("a", TTL_S)
    waiting = asyncio.create_task(leases.hold(await stores(), NAME, "b", polls.work("b"), stop_second, TTL_S))
    await asyncio.sleep(TTL_S / 2)
    assert polls.holders() == ["a"]
    first.cut()
    cut_at = time.monotonic()
    taken_at = await polls.wait_for("b", TTL_S * 3)
    assert taken_at - cut_at < TTL_S * 1.1 + 0.5, "took longer than the TTL and one retry"
    last_of_a = max(at for who, _, at in polls.seen if who == "a")
    assert last_of_a < taken_at
    stop_first.set()
    stop_second.set()
    await asyncio.gather(holding, waiting)
    assert polls.holders() == ["a", "b"]
    polls.assert_one_holder_at_a_time()


async def test_stopping_releases_the_lease_at_once(stores: Callable[[], Any]) -> None:
    polls = Polls()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    holding = asyncio.create_task(leases.hold(await stores(), NAME, "a", polls.work("a"), stop_first, TTL_S))
    await polls.wait_for("a", TTL_S)
    waiting = asyncio.create_task(leases.hold(await stores(), NAME, "b", polls.work("b"), stop_second, TTL_S))
    stop_first.set()
    await holding
    stopped_at = time.monotonic()
    taken_at = await polls.wait_for("b", TTL_S)
    assert taken_at - stopped_at < TTL_S / 2
    stop_second.set()
    await waiting
    polls.assert_one_holder_at_a_time()


async def test_a_holder_whose_renewal_is_refused_stops_polling(stores: Callable[[], Any]) -> None:
    """Its lease ran out (say the process was paused) and someone else took it."""
    polls = Polls()
    stop = asyncio.Event()
    store = await stores()
    holding = asyncio.create_task(leases.hold(store, NAME, "a", polls.work("a"), stop, TTL_S))
    await polls.wait_for("a", TTL_S)
    await store.release_lease(NAME, "a")
    token = await store.acquire_lease(NAME, "b", 30)
    taken_at = time.monotonic()
    await asyncio.sleep(TTL_S)
    last_of_a = max(at for who, _, at in polls.seen if who == "a")
    assert last_of_a - taken_at < TTL_S / 3 + leases.STOP_GRACE_S, "polled on after its renewal was refused"
    assert token is not None and token > polls.seen[0][1]
    stop.set()
    await holding
