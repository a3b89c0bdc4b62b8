"""The Redis store's queues: inbound streams (with pipelined enqueues),
dead letters, and the outbox. The Lua they run, and the layout it keeps,
is in redis_lua_queue and redis_lua_outbox.

`enqueue_inbound` is the webhook hot path: callers hand their messages to
one flusher task, which sends whatever has gathered as one pipeline of
script calls and answers each caller from its own reply, so a burst costs a
few round trips, not one per message. A reply means Redis has run the
script and written it to its append-only file (appendonly must be on; see
docker-compose.yml), so it survives a Redis restart.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import DataError, NoScriptError, ResponseError

from router.errors import NotFound, StoreError
from router.model import (
    Accepted,
    DeadLetter,
    Delivery,
    DeliveryStatus,
    Message,
    format_time,
    new_id,
    utcnow,
)
from router.store import SUSPECT_AFTER, UNFINISHED_ERROR
from router.store.batching import GroupCommit
from router.store.fanout import wait_for_work
from router.store.redis_codec import (
    delivery_json,
    due_seconds,
    dumps,
    load_dead_letter,
    load_message,
    micros,
    pairs,
    rank,
)
from router.store.redis_conn import Connection, translate
from router.store.redis_keys import GROUP, SEP
from router.store.redis_lua_outbox import (
    CAPPED,
    CLAIM_OUTBOUND,
    ENQUEUE_OUTBOUND,
    MARK_PULLED,
    RECORD_DELIVERY,
)
from router.store.redis_lua_queue import (
    ADD_DEAD,
    CLAIM_INBOUND,
    COMPLETE_INBOUND,
    ENQUEUE_INBOUND,
    FAIL_INBOUND,
    RETRY_DEAD,
)

MAX_BATCH = 500
"""Enqueues per pipeline."""
RECLAIM_MS = 3_600_000
"""XAUTOCLAIM's minimum idle time; a claim's visibility is at most this long."""


class RedisQueues:
    """The queue half of RedisStore."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._keys = conn.keys
        self._p = conn.keys.prefix
        self._sleeper = uuid.uuid4().hex
        self._enqueues: GroupCommit[Message, Accepted] = GroupCommit(
            self._write_enqueues, "redis-enqueue", MAX_BATCH
        )
        self._enqueue_in = conn.script(ENQUEUE_INBOUND)
        self._claim_in = conn.script(CLAIM_INBOUND)
        self._complete_in = conn.script(COMPLETE_INBOUND)
        self._fail_in = conn.script(FAIL_INBOUND)
        self._add_dead = conn.script(ADD_DEAD)
        self._retry_dead = conn.script(RETRY_DEAD)
        self._enqueue_out = conn.script(ENQUEUE_OUTBOUND)
        self._claim_out = conn.script(CLAIM_OUTBOUND)
        self._record = conn.script(RECORD_DELIVERY)
        self._mark_pulled = conn.script(MARK_PULLED)

    async def _run(self, script: Any, *args: Any) -> Any:
        with translate(self._conn.display_url):
            return await script(args=[self._p, *args])

    async def _run_batch(self, script: AsyncScript, calls: list[list[Any]]) -> list[Any]:
        """One pipeline of EVALSHA, one per call (each call's ARGV after the
        prefix): one round trip, run by Redis in order. A call that fails
        (a script error) gets a StoreError in its place in the replies, as
        `_run` would raise; losing the connection fails them all at once.

        Redis forgets its scripts when it restarts: then the calls answered
        NOSCRIPT, which did not run, are sent once more, in order, after the
        script is loaded. Only those: a call that ran keeps its reply, and
        running it again would answer differently (a repeat).

        A call whose arguments cannot be encoded for Redis (text that is no
        UTF-8: a lone surrogate) is never sent and gets that error in its
        place: redis-py encodes the whole pipeline before sending any of it,
        so one such call would fail every other call with it."""
        replies: list[Any] = [self._encoding_error(call) for call in calls]
        todo = [index for index, reply in enumerate(replies) if reply is None]
        with translate(self._conn.display_url):
            for attempt in range(2):
                pipe = self._conn.pipeline()
                for index in todo:
                    pipe.evalsha(script.sha, 0, self._p, *calls[index])
                for index, reply in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
                    replies[index] = reply
                todo = [index for index in todo if isinstance(replies[index], NoScriptError)]
                if attempt or not todo:
                    break
                script.sha = await self._conn.redis.script_load(script.script)
        return [
            StoreError(f"{self._conn.display_url}: {type(reply).__name__}: {reply}")
            if isinstance(reply, ResponseError)
            else reply
            for reply in replies
        ]

    def _encoding_error(self, call: list[Any]) -> Exception | None:
        """What redis-py raises when it encodes `call`'s arguments, or None."""
        encode = self._conn.redis.get_encoder().encode
        try:
            for arg in call:
                encode(arg)
        except (UnicodeError, DataError) as exc:
            return exc
        return None

    async def _create_groups(self) -> None:
        """Idempotent; also run when Redis lost its data (a restart without
        appendonly), which the claim notices as NOGROUP."""
        with translate(self._conn.display_url):
            for stream in self._keys.streams:
                try:
                    await self._conn.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    # -- inbound queue ---------------------------------------------------

    async def enqueue_inbound(self, message: Message) -> Accepted:
        return await self._enqueues.submit(message)

    async def _write_enqueues(self, batch: list[Message]) -> list[Accepted | Exception]:
        """One pipeline for the batch; each script reply answers one caller."""
        calls = [
            [
                f"{m.channel}{SEP}{m.external_id}",
                m.id,
                dumps(m.to_dict()),
                rank(m.urgency),
                m.channel,
            ]
            for m in batch
        ]
        outcomes: list[Accepted | Exception] = []
        for reply in await self._run_batch(self._enqueue_in, calls):
            if isinstance(reply, Exception):
                outcomes.append(reply)
            else:
                message_id, ref, fresh = reply
                ref = ref.strip('"') if ref else None
                outcomes.append(Accepted(message_id, ref, duplicate=not fresh))
        return outcomes

    async def claim_inbound(
        self, consumer: str, limit: int, visibility_s: float, block_s: float = 0, max_attempts: int = 5
    ) -> list[Message]:
        visibility_ms = min(RECLAIM_MS, max(1, int(visibility_s * 1000)))

        async def attempt(elapsed_s: float) -> list[Message]:
            sleep_ms = int(max(0.0, block_s - elapsed_s) * 1000)
            args = [
                *(consumer, limit, visibility_ms, RECLAIM_MS, f"{self._sleeper}:{consumer}", sleep_ms),
                *(max_attempts, new_id("dl"), format_time(utcnow()), UNFINISHED_ERROR, SUSPECT_AFTER),
            ]
            try:
                found = await self._run(self._claim_in, *args)
            except StoreError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._create_groups()
                found = await self._run(self._claim_in, *args)
            return [load_message(pairs(fields)) for fields in found]

        return await wait_for_work(self._conn.inbound, block_s, attempt)

    async def complete_inbound(self, message_ids: list[str]) -> None:
        if message_ids:
            await self._run(self._complete_in, *message_ids)

    async def fail_inbound(self, message_id: str, error: str, max_attempts: int) -> bool:
        dead_id, now = new_id("dl"), format_time(utcnow())
        return await self._run(self._fail_in, message_id, error, max_attempts, dead_id, now) == 1

    async def inbound_backlog(self) -> int:
        with translate(self._conn.display_url):
            pipe = self._conn.pipeline()
            for stream in self._keys.streams:
                pipe.xlen(stream)
            return sum(await pipe.execute())

    # -- dead letters ----------------------------------------------------

    async def add_dead_letter(self, channel: str, payload: str, error: str) -> DeadLetter:
        dead = DeadLetter(new_id("dl"), channel, payload, error, 0, utcnow())
        await self._run(self._add_dead, dead.id, channel, payload, error, format_time(dead.created_at))
        return dead

    async def list_dead_letters(self) -> list[DeadLetter]:
        with translate(self._conn.display_url):
            stored = await self._conn.redis.hvals(self._keys.dead_letters)
        return [dead for _, dead in sorted(map(load_dead_letter, stored), key=lambda pair: pair[0])]

    async def retry_dead_letter(self, dead_id: str) -> bool:
        return await self._run(self._retry_dead, dead_id) == 1

    # -- outbox ------------------------------------------------------------

    async def enqueue_outbound(self, message: Message) -> Message:
        stored = await self._enqueue_outbound(message, "", "")
        assert stored is not None, "no cap, so never capped"
        return stored

    async def enqueue_ack(self, ack: Message, since: datetime, cap: int) -> Message | None:
        """The count and the enqueue run in one script, so no other daemon
        queues an ack to this customer in between."""
        return await self._enqueue_outbound(ack, micros(since), cap)

    async def _enqueue_outbound(self, message: Message, since: int | str, cap: int | str) -> Message | None:
        """ENQUEUE_OUTBOUND; with a `cap` (not ''), None when the recipient
        has that many acks since `since` (microseconds) and nothing was stored."""
        delivery = message.delivery or Delivery()
        queued = delivery.status is DeliveryStatus.QUEUED
        reply = await self._run(
            self._enqueue_out,
            message.id,
            dumps(message.to_dict()),
            message.channel,
            message.conversation_id or "",
            micros(message.received_at),
            dumps(format_time(message.received_at)),
            message.kind.value,
            f"{message.channel}{SEP}{message.external_id}",
            delivery_json(delivery),
            "1" if queued else "0",
            due_seconds(delivery),
            message.recipient.id if message.recipient else "",
            cap,
            since,
        )
        if reply is None:
            raise NotFound(f"no conversation {message.conversation_id!r}")
        if reply[0] == CAPPED:
            return None
        return load_message(pairs(reply[1]))

    async def claim_outbound(
        self,
        consumer: str,
        channels: list[str],
        now: datetime,
        limit: int,
        visibility_s: float,
        block_s: float = 0,
    ) -> list[Message]:
        if not channels:
            return []

        async def attempt(elapsed_s: float) -> list[Message]:
            at = now.timestamp() + elapsed_s
            sleep_ms = int(max(0.0, block_s - elapsed_s) * 1000)
            member = f"{self._sleeper}:{consumer}"
            args = [consumer, repr(at), limit, repr(visibility_s), member, sleep_ms, *channels]
            return [load_message(pairs(fields)) for fields in await self._run(self._claim_out, *args)]

        return await wait_for_work(self._conn.outbound, block_s, attempt)

    async def record_delivery(self, message_id: str, delivery: Delivery) -> Message:
        queued = delivery.status is DeliveryStatus.QUEUED
        reply = await self._run(
            self._record, message_id, delivery_json(delivery), "1" if queued else "0", due_seconds(delivery)
        )
        if reply is None:
            raise NotFound(f"no message {message_id!r}")
        return load_message(pairs(reply))

    async def outbound_after(self, channel: str, after: int, limit: int) -> list[Message]:
        with translate(self._conn.display_url):
            ids = await self._conn.redis.zrangebyscore(
                self._keys.outlog(channel), f"({after}", "+inf", start=0, num=limit
            )
        return await self._messages(ids)

    async def mark_pulled(self, channel: str, upto: int) -> None:
        await self._run(self._mark_pulled, channel, upto)

    async def _messages(self, ids: list[str]) -> list[Message]:
        """Several messages in one round trip, in the order asked; gone ones left out."""
        with translate(self._conn.display_url):
            pipe = self._conn.pipeline()
            for message_id in ids:
                pipe.hgetall(self._keys.message(message_id))
            found = await pipe.execute()
        return [load_message(fields) for fields in found if fields]
