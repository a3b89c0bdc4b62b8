"""Delivery of acks and agent replies through the customer's channel.

Durable: every outbound message is in the store before anyone tries to send
it. Temporary failures retry with exponential backoff and jitter, capped
at `outbox.backoff_max`, until `outbox.max_attempts` makes the message
`dead`; permanent failures mark it `failed` at once. The delivery id (the
message id) is the same on every try, so receivers can drop duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from channels.base import Channel
from router import metrics
from router.config import Config
from router.errors import PermanentFailure, TemporaryFailure
from router.model import Delivery, DeliveryStatus, Event, Message, utcnow
from router.settings import parse_duration
from router.store import Store

log = logging.getLogger(__name__)
BASE_DELAY_S = 1.0
CLAIM_BATCH = 32
VISIBILITY_S = 120.0
RETRY_AFTER_MAX = timedelta(days=1)
"""The longest Retry-After honoured: a receiver's (or its proxy's) figure is
not trusted past the calendar, and a customer's reply is worth another try
within a day whatever it said."""


class Outbox:
    def __init__(
        self,
        store: Store,
        config: Config,
        channels: dict[str, Channel],
        clock: Callable[[], datetime] = utcnow,
        consumer: str = "outbox",
        visibility_s: float | None = None,
    ) -> None:
        self.store = store
        self.consumer = consumer
        # Read when built, not when defined: tests/scale_daemon.py shortens VISIBILITY_S.
        self.visibility_s = VISIBILITY_S if visibility_s is None else visibility_s
        self.channels = channels
        self.max_attempts = config.settings.outbox.max_attempts
        self.backoff_max = parse_duration(config.settings.outbox.backoff_max)
        self.clock = clock
        self.push = [name for name, channel in channels.items() if not channel.pulls_outbound]

    def backoff(self, attempts: int) -> timedelta:
        """Equal jitter: uniform in [ceiling / 2, ceiling], the ceiling being
        min(cap, base * 2^(attempts-1)). Spread out like full jitter, but a
        failing receiver always gets at least half the backoff to recover.
        The exponent stops growing long after the cap has won: 2 ** 1024
        does not fit a float, and a desk may allow thousands of attempts."""
        exponent = min(attempts - 1, 64)
        ceiling = min(self.backoff_max.total_seconds(), BASE_DELAY_S * 2**exponent)
        return timedelta(seconds=random.uniform(ceiling / 2, ceiling))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.deliver_due(block_s=0.5)

    async def deliver_due(self, block_s: float = 0) -> int:
        """Send whatever is due now; returns how many were tried."""
        if not self.push:
            await asyncio.sleep(block_s)
            return 0
        batch = await self.store.claim_outbound(
            self.consumer, self.push, self.clock(), CLAIM_BATCH, self.visibility_s, block_s
        )
        # Past half the claim's visibility nothing more is started: another
        # process could take over a claim that runs out while its message is
        # still waiting its turn, and send it too. What is left stays claimed
        # by this sender, which gets it back on its very next claim.
        deadline = asyncio.get_running_loop().time() + self.visibility_s / 2
        by_conversation: dict[str, list[Message]] = {}
        for message in batch:  # oldest first, as claimed
            by_conversation.setdefault(message.conversation_id or message.id, []).append(message)
        turns = (self._deliver_in_turn(messages, deadline) for messages in by_conversation.values())
        # Every conversation's turn ends before a failure (the store down while
        # recording an outcome) is raised: the restarted loop takes its own
        # claims back at once, and would send again what was still in flight.
        tried = await asyncio.gather(*turns, return_exceptions=True)
        for outcome in tried:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(n for n in tried if isinstance(n, int))

    async def _deliver_in_turn(self, messages: list[Message], deadline: float) -> int:
        """One conversation's messages one after another, oldest first: the
        customer reads them in the order they arrive, and a long reply's
        pieces must not mix with the next reply's. Conversations go in
        parallel. Returns how many were tried before `deadline`."""
        loop = asyncio.get_running_loop()
        for tried, message in enumerate(messages):
            if loop.time() > deadline:
                return tried
            await self.deliver(message)
        return len(messages)

    async def deliver(self, message: Message) -> Message:
        conversation = await self.store.get_conversation(message.conversation_id or "")
        channel = self.channels.get(message.channel)
        attempts = (message.delivery.attempts if message.delivery else 0) + 1
        try:
            if conversation is None or channel is None:
                raise PermanentFailure(f"no channel {message.channel!r} or conversation for this message")
            await channel.send(message, conversation)
            delivery = Delivery(DeliveryStatus.SENT, attempts)
        except TemporaryFailure as exc:
            delivery = self._retry_or_die(attempts, exc)
        except PermanentFailure as exc:
            delivery = Delivery(DeliveryStatus.FAILED, attempts, exc.reason)
        except Exception as exc:
            log.exception("channel %s raised while sending %s", message.channel, message.id)
            delivery = self._retry_or_die(attempts, TemporaryFailure(f"{type(exc).__name__}: {exc}"))
        stored = await self.store.record_delivery(message.id, delivery)
        metrics.OUTBOUND.labels(message.channel, delivery.status.value).inc()
        if delivery.status is not DeliveryStatus.SENT:
            log.warning("delivery of %s: %s (%s)", message.id, delivery.status.value, delivery.error)
        await self.store.publish(Event("message.delivery", stored.to_dict()))
        return stored

    def _retry_or_die(self, attempts: int, exc: TemporaryFailure) -> Delivery:
        if attempts >= self.max_attempts:
            return Delivery(DeliveryStatus.DEAD, attempts, exc.reason)
        delay = self.backoff(attempts)
        if exc.retry_after_s is not None:
            delay = max(delay, timedelta(seconds=min(exc.retry_after_s, RETRY_AFTER_MAX.total_seconds())))
        return Delivery(DeliveryStatus.QUEUED, attempts, exc.reason, self.clock() + delay)
