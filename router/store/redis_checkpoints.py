"""Checkpoints in Redis: where each channel has read up to (Store protocol).

One hash, key -> value. Redis answers a write only once it is in the
append-only file, so a checkpoint put is as durable as the enqueues it
follows.
"""

from __future__ import annotations

from router.store.redis_conn import Connection, translate
from router.store.redis_keys import Keys


class RedisCheckpoints:
    _conn: Connection
    _keys: Keys

    async def get_checkpoint(self, key: str) -> str | None:
        with translate(self._conn.display_url):
            value = await self._conn.redis.hget(self._keys.checkpoints, key)
        return str(value) if value is not None else None

    async def put_checkpoint(self, key: str, value: str) -> None:
        with translate(self._conn.display_url):
            await self._conn.redis.hset(self._keys.checkpoints, key, value)
