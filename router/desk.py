"""What agents do, shared by the HTTP API and the CLI so both behave alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from router import routing
from router.config import Config
from router.errors import Conflict, NotFound
from router.model import (
    Agent,
    Conversation,
    Delivery,
    DeliveryStatus,
    Direction,
    Event,
    InboxQuery,
    Kind,
    Message,
    Party,
    Presence,
    Status,
    Urgency,
    new_id,
    utcnow,
)
from router.store import Store

MAX_REPLY_CHARS = 50_000


class Desk:
    def __init__(self, store: Store, config: Config, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.settings = config.settings
        self.clock = clock

    async def conversation(self, id_or_ref: str) -> Conversation:
        conversation = await self.store.get_conversation(id_or_ref)
        if conversation is None:
            raise NotFound(f"no conversation {id_or_ref!r}")
        return conversation

    async def reply(self, id_or_ref: str, agent: Agent, text: str) -> Message:
        """Queue an agent's reply to go out through the customer's channel."""
        if not text.strip():
            raise ValueError("text: must not be empty")
        if len(text) > MAX_REPLY_CHARS:
            raise ValueError(f"text: longer than {MAX_REPLY_CHARS} characters")
        conversation = await self.conversation(id_or_ref)
        if all(spec.name != conversation.channel for spec in self.settings.channels):
            # Queued, it would wait forever: only configured channels send.
            raise Conflict(
                f"channel {conversation.channel!r} is not configured any more; the reply cannot go out"
            )
        history = await self.store.conversation_messages(conversation.id)
        # Threaded under the customer's own latest words: an out-of-office
        # reply to our ack came later, but nobody is answering the robot.
        inbound = [m for m in history if m.direction is Direction.IN]
        customer = [m for m in inbound if not m.auto_generated] or inbound
        message_id = new_id("m")
        reply = Message(
            id=message_id,
            channel=conversation.channel,
            channel_type=customer[-1].channel_type if customer else "",
            direction=Direction.OUT,
            kind=Kind.AGENT,
            external_id=message_id,
            sender=Party(id=agent.name, name=agent.name),
            text=text,
            received_at=self.clock(),
            conversation_id=conversation.id,
            subject=conversation.subject,
            language=customer[-1].language if customer else None,
            recipient=conversation.customer,
            in_reply_to=customer[-1].external_id if customer else None,
            author=agent.name,
            delivery=Delivery(),
        )
        stored = await self.store.enqueue_outbound(reply)
        await self.store.publish(Event("message.created", stored.to_dict()))
        await self._updated(conversation.id)
        return stored

    async def assign(self, id_or_ref: str, agent_name: str | None) -> Conversation:
        conversation = await self.conversation(id_or_ref)
        if agent_name is not None and await self.store.get_agent(agent_name) is None:
            raise NotFound(f"no agent {agent_name!r}")
        claimed = await self.store.claim_conversation(conversation.id, agent_name, conversation.assignee)
        if claimed is None:
            raise Conflict("the conversation was reassigned meanwhile; reload and try again")
        await self._updated(conversation.id)
        return claimed

    async def set_status(self, id_or_ref: str, status: Status) -> Conversation:
        conversation = await self.conversation(id_or_ref)
        updated = await self.store.update_conversation(conversation.id, status=status)
        await self._updated(conversation.id)
        return updated

    async def set_urgency(self, id_or_ref: str, urgency: Urgency, agent: Agent) -> Conversation:
        """An agent's judgement overrides triage, and says so in the reason."""
        conversation = await self.conversation(id_or_ref)
        reason = f"set to {urgency.value} by {agent.name} (triage: {conversation.reason})"
        updated = await self.store.update_conversation(
            conversation.id,
            urgency=urgency,
            reason=reason,
            first_response_due=conversation.created_at + self.settings.sla.target(urgency),
        )
        await self._updated(conversation.id)
        return updated

    async def set_presence(self, name: str, presence: Presence) -> list[Conversation]:
        """Going away hands back every conversation still waiting for its
        first response, and the team strategy reassigns it. Coming back (or
        arriving: `agents add` calls this too) takes up what waited in the
        agent's teams' queues while nobody was there, most urgent first:
        the night's critical report must not wait for someone to go looking.
        Each team's strategy picks, so others available share them. Returns
        the conversations (re)assigned."""
        await self.store.set_presence(name, presence)
        if presence is Presence.AVAILABLE:
            return await self._assign_waiting(name)
        return await self._hand_back(name, unanswered_only=True)

    async def _assign_waiting(self, name: str) -> list[Conversation]:
        agent = await self.store.get_agent(name)
        mine = agent.teams if agent is not None else []
        teams = [t for t in self.settings.teams if t.name in mine and t.assignment != "manual"]
        assigned: list[Conversation] = []
        for team in teams:
            for conversation in await self._every(InboxQuery(team=team.name, unassigned=True)):
                updated = await routing.assign(self.store, self.settings, conversation)
                if updated.assignee is not None:
                    assigned.append(updated)
                    await self._updated(conversation.id)
        return assigned

    async def _every(self, query: InboxQuery) -> list[Conversation]:
        """Every page of `query`, in inbox order."""
        found: list[Conversation] = []
        query.limit, query.cursor = 500, None
        while True:
            page = await self.store.list_conversations(query)
            found += page.conversations
            if not page.next_cursor:
                return found
            query.cursor = page.next_cursor

    async def remove_agent(self, name: str) -> list[Conversation]:
        """Remove the agent and hand back all their open and pending
        conversations, answered or not: nobody can work them under that name
        any more. Removed first, so the team strategy cannot pick them again.
        Returns the conversations handed back; raises NotFound."""
        if not await self.store.remove_agent(name):
            raise NotFound(f"no agent {name!r}")
        return await self._hand_back(name, unanswered_only=False)

    async def _hand_back(self, name: str, *, unanswered_only: bool) -> list[Conversation]:
        """Release the agent's open and pending conversations and let each
        team's strategy assign them again."""
        moved: list[Conversation] = []
        for status in (Status.OPEN, Status.PENDING):
            found = await self._every(InboxQuery(status=status, assignee=name))
            waiting = [c for c in found if not unanswered_only or c.first_response_at is None]
            for conversation in waiting:
                released = await self.store.claim_conversation(conversation.id, None, name)
                if released is not None:
                    moved.append(await routing.assign(self.store, self.settings, released))
                    await self._updated(conversation.id)
        return moved

    async def retry_delivery(self, message_id: str) -> Message:
        message = await self.store.get_message(message_id)
        if message is None or message.delivery is None:
            raise NotFound(f"no outbound message {message_id!r}")
        if message.delivery.status not in (DeliveryStatus.FAILED, DeliveryStatus.DEAD):
            raise Conflict(
                f"message is {message.delivery.status.value}; only failed or dead ones are retried"
            )
        stored = await self.store.record_delivery(message_id, Delivery(next_attempt_at=self.clock()))
        await self.store.publish(Event("message.delivery", stored.to_dict()))
        return stored

    async def _updated(self, conversation_id: str) -> None:
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is not None:
            await self.store.publish(Event("conversation.updated", conversation.to_dict()))
