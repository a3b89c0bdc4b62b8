"""A Redis restart leaves every pooled connection dead. The daemon must not
answer the agents' next requests with 503s: a command on a dead connection
reconnects and runs again, once Redis is back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from router.model import InboxQuery
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
