"""A Redis restart leaves every pooled connection dead. The daemon must not
answer the agents' next requests with 503s: a command on a dead connection
reconnects and runs again, once Redis is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from router.model import Event, InboxQuery
from router.store.redis import RedisStore
from tests.services import RedisServer
from tests.test_store_contract import inbound

CALLS = 48
"""More at once than a warm pool holds idle, so every one of those is used."""


async def mixed_calls(store: RedisStore, first: int) -> list[Any]:
    """Plain commands, pipelines and scripts, as the API and ingress make them."""
    calls = []
    for i in range(CALLS):
        if i % 3 == 0:
            calls.append(store.list_conversations(InboxQuery(limit=10)))
        elif i % 3 == 1:
            calls.append(store.inbound_backlog())
        else:
            calls.append(store.enqueue_inbound(inbound(f"x-{first + i}", thread=f"cust-{i}")))
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_every_call_right_after_a_redis_restart_succeeds(
    redis_server: Callable[[], RedisServer],
) -> None:
    server = redis_server()
    store = RedisStore(server.url("reconnect"))
    await store.open()
    try:
        assert not [r for r in await mixed_calls(store, 0) if isinstance(r, Exception)]
        server.stop()
        server.start()
        failed = [r for r in await mixed_calls(store, CALLS) if isinstance(r, Exception)]
        assert not failed, f"{len(failed)} of {CALLS} calls failed after the restart: {failed[0]}"
        assert await store.inbound_backlog() == 2 * (CALLS // 3)
    finally:
        await store.close()


async def test_closing_while_redis_is_away_keeps_the_shutdown_deadline(
    redis_server: Callable[[], RedisServer],
) -> None:
    """Live events waiting to be sent are best-effort; SIGTERM's 10 s are not."""
    server = redis_server()
    store = RedisStore(server.url("away"))
    await store.open()
    server.kill()
    for i in range(10_000):
        await store.publish(Event("conversation.updated", {"n": i, "text": "x" * 100}))
    began = time.monotonic()
    await store.close()
    assert time.monotonic() - began < 3.0
