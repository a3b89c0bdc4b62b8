"""Inbound: tag at the door, then dedupe -> thread -> route -> assign -> ack.

`Pipeline.accept` is every channel's sink: it triages first (pure CPU, tens of
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
from router.errors import StoreError
from router.model import (
    Accepted,
    Conversation,
    Delivery,
    DeliveryStatus,
    Direction,
    Event,
    Kind,
    Message,
    Party,
    Status,
    Threaded,
    format_time,
    parse_time,
    utcnow,
)
from router.store import Store

log = logging.getLogger(__name__)
CLAIM_BATCH = 16
VISIBILITY_S = 60.0
BOUNCE_QUIET = timedelta(hours=24)


def _arrival(message: Message, now: datetime) -> datetime:
    """When the SLA clock starts for `message`: when it was queued (never
    later than `now`, should daemons' clocks disagree); `now` for a message
    queued before the router stamped one."""
    return min(message.queued_at, now) if message.queued_at is not None else now


def _bounce_key(channel: str, recipient_id: str) -> str:
    """The store checkpoint holding when mail to this recipient last bounced."""
    return f"bounced/{channel}/{recipient_id}"


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
        self._claiming = asyncio.Lock()

    async def accept(self, message: Message) -> Accepted:
        """The channels' sink: returns once the message is durably queued."""
        verdict = triage.classify(
            message.text, message.subject, self.rules, auto_generated=message.auto_generated
        )
        message.urgency, message.category, message.reason = verdict.urgency, verdict.category, verdict.reason
        # A channel that knows better (a Telegram user's language_code for
        # Latin-script text) has set the language already.
        message.language = message.language or verdict.language
        message.queued_at = self.clock()
        accepted = await self.store.enqueue_inbound(message)
        if not accepted.duplicate:
            metrics.INBOUND.labels(message.channel, verdict.urgency.value).inc()
        return accepted

    async def run(self, consumer: str, stop: asyncio.Event) -> None:
        """One worker: claim, handle, repeat until `stop` is set.

        One worker at a time waits for work (`_claiming`), the others queue
        behind it: a new message wakes one claim, not one per idle worker,
        most of them finding nothing (at a steady 300 msg/s: 1.8 claims a
        message instead of 4.2, each a write, and a tenth less CPU). Whoever
        claims hands the wait on at once, so a burst is still worked on in
        parallel."""
        while not stop.is_set():
            async with self._claiming:
                if stop.is_set():
                    return
                batch = await self._claim(consumer, block_s=0.5)
            await self._process(batch)

    async def drain(self) -> None:
        """Handle everything queued, then return: deterministic tests."""
        while batch := await self._claim("drain", block_s=0):
            await self._process(batch)

    async def _claim(self, consumer: str, block_s: float) -> list[Message]:
        attempts = self.settings.pipeline.max_attempts
        return await self.store.claim_inbound(consumer, CLAIM_BATCH, VISIBILITY_S, block_s, attempts)

    async def _process(self, batch: list[Message]) -> None:
        """Handle a claimed batch, then take the handled messages off the queue
        in one step: a crash before that only repeats idempotent work. A
        failure is recorded at once, so its retry does not wait for the batch."""
        threaded = await self._thread_plain(batch)
        handled: list[str] = []
        for message in batch:
            try:
                await self.handle(message, threaded.get(message.id))
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                dead = await self.store.fail_inbound(message.id, error, self.settings.pipeline.max_attempts)
                log.exception("message %s failed%s", message.id, " (dead-lettered)" if dead else "")
                metrics.PIPELINE_FAILURES.inc()
            else:
                handled.append(message.id)
        if handled:
            await self.store.complete_inbound(handled)

    async def _thread_plain(self, batch: list[Message]) -> dict[str, Threaded | Exception]:
        """Thread the batch's plain messages (new text on a known key: no
        edit, nothing answered, no ref named) in one store step, one round
        trip instead of one each. Only those before the first other message
        and one per key, so every message is still threaded as if one after
        another: a lookup may lead an answer to any key, and a second
        message on a key must see what the first one's handling did."""
        now = self.clock()
        plain: list[tuple[Message, Conversation]] = []
        keys: set[tuple[str, str]] = set()
        for message in batch:
            key = conversations.plain_key(message) if message.edit_of is None else None
            if key is None:
                break
            if (message.channel, key) not in keys:
                keys.add((message.channel, key))
                team = routing.route(self.settings, message)
                start = conversations.start(message, key, team, _arrival(message, now), self.settings.sla)
                plain.append((message, start))
        if len(plain) < 2:
            return {}
        try:
            outcomes = await self.store.thread_messages(plain)
        except StoreError:
            raise  # the store is away: the worker backs off
        except Exception:
            log.exception("threading a batch failed; each message is threaded on its own")
            return {}
        return {message.id: outcome for (message, _), outcome in zip(plain, outcomes, strict=True)}

    async def handle(self, message: Message, threaded: Threaded | Exception | None = None) -> Conversation:
        """`threaded` is the message's outcome in `_thread_plain`, if it had one."""
        now = self.clock()
        if isinstance(threaded, Exception):
            raise threaded
        if message.edit_of is not None and (edited := await self._apply_edit(message, now)) is not None:
            return edited
        team = routing.route(self.settings, message)
        if threaded is None:
            key = await conversations.thread_key(self.store, message)
            threaded = await self.store.thread_message(
                message, conversations.start(message, key, team, _arrival(message, now), self.settings.sla)
            )
        conversation = threaded.conversation
        if threaded.created:
            if threaded.previous_ref:
                reason = f"{conversation.reason} (follows {threaded.previous_ref})"
                conversation = await self.store.update_conversation(conversation.id, reason=reason)
            await self._publish("conversation.created", conversation)
        else:
            conversation = await self._joined(conversation, message, team, now)
        message.conversation_id = conversation.id
        await self.store.publish(Event("message.created", message.to_dict()))
        if conversation.assignee is None and conversation.status is not Status.CLOSED:
            assigned = await routing.assign(self.store, self.settings, conversation)
            if assigned.assignee is not None:
                conversation = assigned
                await self._publish("conversation.updated", conversation)
        if message.bounce_of is not None:
            await self._bounced(message, now)
        await self._acknowledge(message, conversation, threaded, now)
        return conversation

    async def _bounced(self, report: Message, now: datetime) -> None:
        """A bounce of our own mail: that message is `failed` with the remote
        server's reason, and its recipient gets no acks for BOUNCE_QUIET (a
        forged sender address must not earn a stream of bounced acks)."""
        original = await self.store.find_message(report.channel, report.bounce_of or "")
        if original is None or original.direction is not Direction.OUT:
            return
        if original.recipient is not None:
            key = _bounce_key(report.channel, original.recipient.id)
            await self.store.put_checkpoint(key, format_time(now) or "")
        delivery = original.delivery or Delivery()
        if delivery.status is DeliveryStatus.FAILED:
            return
        failed = Delivery(DeliveryStatus.FAILED, delivery.attempts, f"bounced: {report.bounce_error}")
        stored = await self.store.record_delivery(original.id, failed)
        log.info("%s bounced: %s", original.id, report.bounce_error)
        await self.store.publish(Event("message.delivery", stored.to_dict()))

    async def _apply_edit(self, edit: Message, now: datetime) -> Conversation | None:
        """A customer changed a message we hold: it takes the new text and
        tags, its earlier text moves to its `history`, and a conversation the
        edit makes more urgent is escalated. None when we never took the
        original (say, a group message that mentions the bot only since the
        edit): the edit is then handled as a new message."""
        original = await self.store.find_message(edit.channel, edit.edit_of or "")
        if original is None or original.direction is not Direction.IN:
            return None
        if original.conversation_id is None:
            # Threading stores the message whole: thread the original first,
            # so that threading it later cannot put the old text back.
            await self.handle(original)
            original = await self.store.get_message(original.id) or original
        if edit.text != original.text:
            original.history.append(original.text)
            original.text, original.attachments = edit.text, edit.attachments or original.attachments
            original.urgency, original.category, original.reason = edit.urgency, edit.category, edit.reason
            original.language = edit.language
            await self.store.update_message(original)
        conversation = await self.store.get_conversation(original.conversation_id or "")
        if conversation is None:
            return None
        escalates = edit.urgency is not None and edit.urgency.rank < conversation.urgency.rank
        if escalates and conversation.status is not Status.CLOSED:
            conversation = await self.store.update_conversation(
                conversation.id, urgency=edit.urgency, category=edit.category, reason=edit.reason
            )
        if edit.urgency is conversation.urgency and conversation.status is not Status.CLOSED:
            # Not only right after the update above: handled again after a
            # crash that came before the deadline and team, it finds the
            # urgency raised already.
            conversation = await self._escalate(conversation, edit, routing.route(self.settings, edit), now)
        if conversation.assignee is None and conversation.status is not Status.CLOSED:
            # Moved to another team (or waiting in one): assigned there, as a new message would be.
            conversation = await routing.assign(self.store, self.settings, conversation)
        await self._publish("conversation.updated", conversation)
        return conversation

    async def _joined(
        self, conversation: Conversation, message: Message, team: str, now: datetime
    ) -> Conversation:
        """A message joined a conversation. A customer's answer reopens one
        left pending (waiting for them); a more urgent message escalates it;
        and the inbox hears of it whatever changed, since threading changed
        its count, preview and maybe urgency: without the event an answered
        conversation turned critical would sit in the list looking routine."""
        if (
            conversation.status is Status.PENDING
            and message.kind is Kind.CUSTOMER
            and not message.auto_generated
        ):
            conversation = await self.store.update_conversation(conversation.id, status=Status.OPEN)
        conversation = await self._escalate(conversation, message, team, now)
        await self._publish("conversation.updated", conversation)
        return conversation

    async def _escalate(
        self, conversation: Conversation, message: Message, team: str, now: datetime
    ) -> Conversation:
        """A more urgent message in a waiting conversation tightens its
        deadline and, before anyone answered, moves it to the right team."""
        changes: dict[str, object] = {}
        if message.urgency is conversation.urgency and conversation.first_response_at is None:
            due = _arrival(message, now) + self.settings.sla.target(conversation.urgency)
            if conversation.first_response_due is None or due < conversation.first_response_due:
                changes["first_response_due"] = due
            if team != conversation.team:
                changes["team"] = team
        if not changes:
            return conversation
        if "team" in changes and conversation.assignee is not None:
            # Released before the team moves: after a crash between the two
            # steps the move is still to do, and handling it again finishes
            # it; the other way round it would leave the old team's agent.
            await self.store.claim_conversation(conversation.id, None, conversation.assignee)
        return await self.store.update_conversation(conversation.id, **changes)

    async def _acknowledge(
        self, message: Message, conversation: Conversation, threaded: Threaded, now: datetime
    ) -> None:
        """One ack per new conversation, in the customer's language, through
        their channel; never to machines, never beyond the per-sender cap."""
        acks = self.settings.acks
        if not acks.enabled or conversation.acked or not await self._opens(message, conversation, threaded):
            return
        blocked = ack_block_reason(message)
        if not blocked and message.channel_type == "email":  # only mail bounces
            key = _bounce_key(message.channel, message.sender.id)
            bounced_at = parse_time(await self.store.get_checkpoint(key))
            if bounced_at is not None and now - bounced_at < BOUNCE_QUIET:
                blocked = f"mail to {message.sender.id} bounced at {format_time(bounced_at)}"
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
        cap = acks.max_per_sender_per_hour
        stored = await self.store.enqueue_ack(ack, now - timedelta(hours=1), cap)  # marks it acked
        if stored is None:
            log.info("no ack for %s: the customer already got %d acks this hour", conversation.ref, cap)
            return
        await self.store.publish(Event("message.created", stored.to_dict()))

    async def _opens(self, message: Message, conversation: Conversation, threaded: Threaded) -> bool:
        """Whether `message` is the one its conversation's ack answers: the
        first inbound one. Not by the count alone: a message handled again
        after a crash (kill -9 between threading and the ack) may find others
        joined meanwhile, and its conversation must still get its one ack."""
        if threaded.created or conversation.message_count == 1:
            return True
        history = await self.store.conversation_messages(conversation.id)
        first = next((m for m in history if m.direction is Direction.IN), None)
        return first is not None and first.id == message.id

    async def _publish(self, kind: str, conversation: Conversation) -> None:
        await self.store.publish(Event(kind, conversation.to_dict()))
