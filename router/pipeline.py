"""Inbound: tag at the door, then dedupe -> thread -> route -> assign -> ack.

`Pipeline.accept` is every channel's sink: it triages first (pure CPU, a few
microseconds) so the durable queue already knows each message's urgency and
hands out critical ones first (SPEC 6 promise 4). Workers then take messages
off the queue; each step is idempotent, so a crash anywhere means the message
is simply handled again. A message that keeps failing goes to the dead
letters and never blocks the queue behind it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from router import conversations, metrics, routing, triage
from router.acks import Templates, ack_block_reason, humanize_duration
from router.config import Config
from router.model import (
    Accepted,
    Conversation,
    Delivery,
    Direction,
    Event,
    Kind,
    Message,
    Party,
    Status,
    Threaded,
    utcnow,
)
from router.store import Store

log = logging.getLogger(__name__)
CLAIM_BATCH = 16
VISIBILITY_S = 60.0


class Pipeline:
    def __init__(
        self,
        store: Store,
        config: Config,
        rules: triage.RuleSet,
        templates: Templates,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.config = config
        self.settings = config.settings
        self.rules = rules
        self.templates = templates
        self.clock = clock

    async def accept(self, message: Message) -> Accepted:
        """The channels' sink: returns once the message is durably queued."""
        verdict = triage.classify(
            message.text, message.subject, self.rules, auto_generated=message.auto_generated
        )
        message.urgency, message.category, message.reason = verdict.urgency, verdict.category, verdict.reason
        message.language = verdict.language
        accepted = await self.store.enqueue_inbound(message)
        if not accepted.duplicate:
            metrics.INBOUND.labels(message.channel, verdict.urgency.value).inc()
        return accepted

    async def run(self, consumer: str, stop: asyncio.Event) -> None:
        """One worker: claim, handle, repeat until `stop` is set."""
        while not stop.is_set():
            batch = await self.store.claim_inbound(consumer, CLAIM_BATCH, VISIBILITY_S, block_s=0.5)
            for message in batch:
                await self._process(message)

    async def drain(self) -> None:
        """Handle everything queued, then return: deterministic tests."""
        while batch := await self.store.claim_inbound("drain", CLAIM_BATCH, VISIBILITY_S):
            for message in batch:
                await self._process(message)

    async def _process(self, message: Message) -> None:
        try:
            await self.handle(message)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            dead = await self.store.fail_inbound(message.id, error, self.settings.pipeline.max_attempts)
            log.exception("message %s failed%s", message.id, " (dead-lettered)" if dead else "")
            metrics.PIPELINE_FAILURES.inc()
        else:
            await self.store.complete_inbound(message.id)

    async def handle(self, message: Message) -> Conversation:
        now = self.clock()
        key = await conversations.thread_key(self.store, message)
        team = routing.route(self.settings, message)
        threaded = await self.store.thread_message(
            message, conversations.start(message, key, team, now, self.settings.sla)
        )
        conversation = threaded.conversation
        if threaded.created:
            if threaded.previous_ref:
                reason = f"{conversation.reason} (follows {threaded.previous_ref})"
                conversation = await self.store.update_conversation(conversation.id, reason=reason)
            await self._publish("conversation.created", conversation)
        else:
            conversation = await self._escalate(conversation, message, team, now)
        await self.store.publish(Event("message.created", message.to_dict()))
        if conversation.assignee is None and conversation.status is not Status.CLOSED:
            assigned = await routing.assign(self.store, self.settings, conversation)
            if assigned.assignee is not None:
                conversation = assigned
                await self._publish("conversation.updated", conversation)
        await self._acknowledge(message, conversation, threaded, now)
        return conversation

    async def _escalate(
        self, conversation: Conversation, message: Message, team: str, now: datetime
    ) -> Conversation:
        """A more urgent message in a waiting conversation tightens its
        deadline and, before anyone answered, moves it to the right team."""
        changes: dict[str, object] = {}
        if message.urgency is conversation.urgency and conversation.first_response_at is None:
            due = now + self.settings.sla.target(conversation.urgency)
            if conversation.first_response_due is None or due < conversation.first_response_due:
                changes["first_response_due"] = due
            if team != conversation.team:
                changes["team"] = team
        if changes:
            conversation = await self.store.update_conversation(conversation.id, **changes)
            if "team" in changes and conversation.assignee is not None:
                conversation = (
                    await self.store.claim_conversation(conversation.id, None, conversation.assignee)
                    or conversation
                )
        await self._publish("conversation.updated", conversation)
        return conversation

    async def _acknowledge(
        self, message: Message, conversation: Conversation, threaded: Threaded, now: datetime
    ) -> None:
        """One ack per new conversation, in the customer's language, through
        their channel; never to machines, never beyond the per-sender cap."""
        acks = self.settings.acks
        first = threaded.created or conversation.message_count == 1
        if not acks.enabled or conversation.acked or not first:
            return
        recent = await self.store.count_acks(
            conversation.channel, message.sender.id, now - timedelta(hours=1)
        )
        blocked = ack_block_reason(message, recent, acks.max_per_sender_per_hour)
        if blocked:
            log.info("no ack for %s: %s", conversation.ref, blocked)
            return
        language = message.language or "en"
        text = self.templates.render(
            "ack",
            language,
            conversation.urgency,
            {
                "ref": conversation.ref,
                "name": message.sender.name or "",
                "response_time": humanize_duration(self.settings.sla.target(conversation.urgency), language),
                "subject": conversation.subject or "",
            },
        )
        ack = Message(
            id=f"m_ack_{conversation.id}",
            channel=conversation.channel,
            channel_type=message.channel_type,
            direction=Direction.OUT,
            kind=Kind.ACK,
            external_id=f"m_ack_{conversation.id}",
            sender=Party(id=conversation.channel),
            text=text,
            received_at=now,
            conversation_id=conversation.id,
            subject=conversation.subject,
            language=language,
            recipient=conversation.customer,
            in_reply_to=message.external_id,
            delivery=Delivery(),
        )
        stored = await self.store.enqueue_outbound(ack)
        await self.store.update_conversation(conversation.id, acked=True)
        await self.store.publish(Event("message.created", stored.to_dict()))

    async def _publish(self, kind: str, conversation: Conversation) -> None:
        await self.store.publish(Event(kind, conversation.to_dict()))
