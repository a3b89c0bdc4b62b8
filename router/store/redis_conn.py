"""The Redis connection: a bounded pool, the scripts, and one pub/sub listener.

redis-py's errors stop here and become StoreError (`translate`), so the web
layer answers 503 and the daemon's loops back off and retry: no caller
needs to know which store it talks to. Commands retry twice on a broken
connection (a pooled socket that died with a Redis restart), then fail fast,
so /readyz answers within a second or two while Redis is away.

The listener holds the only subscription of this process: events go to the
local EventHub (and from there to every SSE stream), wake-ups fire the
local Signals that blocked claims wait on, and `agents` notices bump
`roster_version`, which invalidates the store's cached agent roster. When
Redis goes away, or stops answering its pings, it reconnects with backoff
and, once back, wakes every claim to look again.

Events leave as one PUBLISH per batch (a JSON array): a worker publishes
two or three events per message, and one command per event cost the
publisher, Redis and every listener more than the events themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.errors import StoreError
from router.model import Event
from router.store.fanout import EventHub, Signal
from router.store.redis_codec import dumps
from router.store.redis_keys import Keys

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 32
POOL_WAIT_S = 20.0
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 2.0
LISTEN_BACKOFF_MAX_S = 5.0
LISTEN_PING_S = 5.0
"""A subscription quiet this long is pinged; without an answer within
PING_TIMEOUT_S it is dead (a network stall raises no error: the socket stays
open and reads just time out) and the listener subscribes again. redis-py's
own health check PINGs too, but never notices when no answer comes."""
PUBLISH_BATCH = 500
"""Events per PUBLISH at most."""
PUBLISH_BYTES = 256 * 1024
"""...and bytes per PUBLISH at most (bar one event larger than that): a
subscriber's output buffer in Redis need not hold more than a few."""
OUTGOING_MAX = 10_000
FLUSH_ON_STOP_S = 1.0
"""How long a stopping daemon keeps sending its last events: live updates
are best-effort, the 10 s a SIGTERM allows are not (one failed send while
Redis is away costs most of a second)."""
ROSTER_NOTICE = "agents"
"""Published on the wake channel by every script that changes an agent."""


@contextlib.contextmanager
def translate(display_url: str) -> Iterator[None]:
    """Redis errors as StoreError; the URL shown is the masked one."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"{display_url}: {type(exc).__name__}: {exc}") from exc


class Connection:
    def __init__(self, url: str, keys: Keys, display_url: str) -> None:
        self.keys = keys
        self.display_url = display_url
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            # redis.asyncio's Retry: the synchronous one returns the coroutine
            # unawaited, so its errors escape and nothing is ever retried.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=15,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.events = EventHub()
        self.inbound = Signal()
        self.outbound = Signal()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.listening = False
        """True while the subscription is up: only then do `agents` notices arrive."""
        self.roster_version = 0
        """Bumped by each `agents` notice and whenever the subscription comes
        or goes: a roster read under an older version may be stale."""
        self._outgoing: list[str] = []
        self._outgoing_ready = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None

    def script(self, source: str) -> AsyncScript:
        """redis-py sends EVALSHA and loads the script again after a restart."""
        return self.redis.register_script(source)

    def pipeline(self) -> Pipeline:
        return self.redis.pipeline(transaction=False)

    async def start(self) -> None:
        """Raise StoreError when Redis cannot be reached now."""
        with translate(self.display_url):
            async with asyncio.timeout(PING_TIMEOUT_S * 2):
                await self.redis.ping()
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="redis-listener")
            self._publisher = asyncio.create_task(self._publish_forever(), name="redis-publisher")
        try:
            async with asyncio.timeout(PING_TIMEOUT_S * 2):
                await self._subscribed.wait()
        except TimeoutError:
            raise StoreError(f"{self.display_url}: cannot subscribe") from None

    async def stop(self) -> None:
        """Sends the events already published, for FLUSH_ON_STOP_S at most,
        then disconnects."""
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            self._outgoing_ready.set()
            try:
                await asyncio.wait_for(publisher, FLUSH_ON_STOP_S)
            except TimeoutError:
                log.warning("stopping: %d events not sent in time", len(self._outgoing))
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def ping(self) -> None:
        try:
            with translate(self.display_url):
                async with asyncio.timeout(PING_TIMEOUT_S):
                    await self.redis.ping()
        except TimeoutError:
            raise StoreError(f"{self.display_url}: no answer within {PING_TIMEOUT_S:g} s") from None

    def publish(self, event: Event) -> None:
        """Queued for the publisher task, which sends what has gathered as one
        pipeline: a worker publishes several events per message and waits for
        none of them. While Redis is away the oldest beyond OUTGOING_MAX go."""
        self._outgoing.append(dumps({"type": event.type, "data": event.data}))
        if len(self._outgoing) > OUTGOING_MAX:
            del self._outgoing[: len(self._outgoing) - OUTGOING_MAX]
        self._outgoing_ready.set()

    async def _publish_forever(self) -> None:
        """One sender, so events reach every process in the order published."""
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            while self._outgoing:
                batch = self._take_batch()
                try:
                    with translate(self.display_url):
                        await self.redis.publish(self.keys.events, f"[{','.join(batch)}]")
                except StoreError as exc:
                    log.warning("%d events not sent: %s", len(batch), exc)
                    await asyncio.sleep(0.5)
            if self._publisher is None:
                return

    def _take_batch(self) -> list[str]:
        """The oldest events, up to PUBLISH_BATCH of them and PUBLISH_BYTES."""
        size = count = 0
        for payload in self._outgoing[:PUBLISH_BATCH]:
            size += len(payload) + 1
            if count and size > PUBLISH_BYTES:
                break
            count += 1
        batch, self._outgoing = self._outgoing[:count], self._outgoing[count:]
        return batch

    async def _listen(self) -> None:
        """Forever: subscribe, dispatch, and after any failure start again."""
        delay = 0.1
        while True:
            # Every reply counts as a sign of life, the pong too: redis-py
            # mangles a RESP3 pong into a message of some other type, or
            # drops it with ignore_subscribe_messages.
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.events, self.keys.wake)
                self.listening = True
                self.roster_version += 1
                self._subscribed.set()
                delay = 0.1
                # Whatever was queued while we were away raised no wake-up.
                self.inbound.fire()
                self.outbound.fire()
                loop = asyncio.get_running_loop()
                heard = pinged = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    now = loop.time()
                    if message is not None:
                        heard = now
                        if message["type"] == "message":
                            self._dispatch(message["channel"], message["data"])
                    elif now - heard > LISTEN_PING_S + PING_TIMEOUT_S:
                        raise RedisTimeoutError(f"no answer to a ping within {PING_TIMEOUT_S:g} s")
                    elif now - max(heard, pinged) >= LISTEN_PING_S:
                        await pubsub.ping()
                        pinged = now
            except (RedisError, OSError) as exc:
                log.warning("redis subscription lost (%s); retrying in %.1f s", exc, delay)
            finally:
                self._lost()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(LISTEN_BACKOFF_MAX_S, delay * 2)

    def _lost(self) -> None:
        """Notices may be missed from now on: no cached roster is trusted."""
        self.listening = False
        self.roster_version += 1

    def _dispatch(self, channel: str, data: str) -> None:
        if channel == self.keys.wake:
            if data == ROSTER_NOTICE:
                self.roster_version += 1
            else:
                (self.inbound if data == "in" else self.outbound).fire()
            return
        if not self.events.has_subscribers:
            return  # nobody here to decode them for (a worker-only daemon, the CLI)
        try:
            decoded = json.loads(data)
            # A single object is what daemons before batched publishing send.
            for fields in decoded if isinstance(decoded, list) else [decoded]:
                self.events.publish(Event(fields["type"], fields["data"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed event on %s", channel)
