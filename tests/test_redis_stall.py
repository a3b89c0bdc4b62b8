"""A network stall between a daemon and Redis: the connection stays open but
nothing comes through it any more (a NAT or firewall that forgot it, Redis
moved behind the same address). No error ever says so; the daemon must
notice by itself and connect again, or its web inbox stops showing what
other daemons do, for good.

The stall is a TCP relay in front of a real redis-server that, from
`stall()` on, swallows whatever the connections open at that moment carry;
new connections go through.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from router.model import Event
from router.store.redis import RedisStore
from tests.services import RedisServer

NOTICED_WITHIN_S = 20.0


@dataclass
class Relay:
    target_port: int
    port: int = 0
    stalled: set[int] = field(default_factory=set)
    links: list[int] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        """Every connection open now carries nothing more, either way."""
        self.stalled.update(self.links)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = len(self.links)
        self.links.append(link)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(link, source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, link: int, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if link in self.stalled:
                    continue
                sink.write(data)
                await sink.drain()
        if link not in self.stalled:
            sink.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def relay(shared_redis: RedisServer) -> AsyncIterator[Relay]:
    relay = Relay(shared_redis.port)
    await relay.start()
    yield relay
    await relay.close()


async def test_live_events_come_back_after_a_network_stall(shared_redis: RedisServer, relay: Relay) -> None:
    prefix = f"stall-{uuid.uuid4().hex[:12]}"
    behind = RedisStore(f"redis://:{shared_redis.password}@127.0.0.1:{relay.port}/0?prefix={prefix}")
    other = RedisStore(shared_redis.url(prefix))
    await behind.open()
    await other.open()
    events = behind.subscribe()
    try:
        await other.publish(Event("conversation.updated", {"n": 0}))
        assert (await asyncio.wait_for(anext(events), 5)).data == {"n": 0}
        relay.stall()

        async def publish_on() -> None:
            for n in range(1, 1000):
                await other.publish(Event("conversation.updated", {"n": n}))
                await asyncio.sleep(0.5)

        publisher = asyncio.create_task(publish_on())
        try:
            event = await asyncio.wait_for(anext(events), NOTICED_WITHIN_S)
        except TimeoutError:
            pytest.fail(f"no event reached the stalled daemon within {NOTICED_WITHIN_S:g} s")
        finally:
            publisher.cancel()
        assert event.data["n"] > 0
    finally:
        await events.aclose()
        await behind.close()
        await other.close()
