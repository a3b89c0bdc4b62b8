"""One customer's bad input fails alone on the Redis store (SPEC 6 promise 7).

Enqueues are written in batches, one pipeline for everyone who asked at
the same time: a message Redis cannot be sent (text that is no UTF-8, such
as half an emoji escaped in a webhook's JSON, `"\\ud83d"`) must not fail the
others' enqueues with it.
"""

from __future__ import annotations

import asyncio
import uuid

from router.model import Accepted
from router.store.redis import RedisStore
from tests.services import RedisServer
from tests.test_store_contract import inbound


async def test_a_message_redis_cannot_encode_fails_alone_not_its_whole_batch(
    shared_redis: RedisServer,
) -> None:
    store = RedisStore(shared_redis.url(f"bad-input-{uuid.uuid4().hex[:12]}"))
    await store.open()
    try:
        good, other = inbound("a", thread="u-a"), inbound("c", thread="u-c")
        bad = inbound("b", thread="u-b")
        bad.text = "half an emoji \ud83d"
        results = await asyncio.gather(
            *(store.enqueue_inbound(m) for m in (good, bad, other)), return_exceptions=True
        )
        assert results[0] == Accepted(good.id, None, duplicate=False)
        assert isinstance(results[1], UnicodeEncodeError)
        assert results[2] == Accepted(other.id, None, duplicate=False)
        assert await store.inbound_backlog() == 2
        assert await store.find_message("web", "b") is None
    finally:
        await store.close()
