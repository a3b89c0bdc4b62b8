"""Threading: which conversation a message belongs to, and the new one's shape.

Channels give a thread key (webhook `conversation`/`from.id`, Telegram chat)
and, for email, the external ids the message answers. Those and a ticket
ref in the subject lead to a known conversation, whose key is then used,
so the store only ever threads by (channel, key).
"""

from __future__ import annotations

import re
from datetime import datetime

from router.model import Category, Conversation, Message, Urgency, new_id
from router.settings import SLAConfig
from router.store import Store

REF_IN_SUBJECT = re.compile(r"\[?\b(T-\d{6,})\b\]?")


def format_ref(number: int) -> str:
    return f"T-{number:06d}"


def plain_key(message: Message) -> str | None:
    """The key that threads `message` when it needs no lookup (it answers
    nothing and names no ref), else None: then ask `thread_key`."""
    if message.references or (message.subject and REF_IN_SUBJECT.search(message.subject)):
        return None
    return message.thread_key or message.external_id


async def thread_key(store: Store, message: Message) -> str:
    """The key that threads `message`: a conversation it answers, else the
    ref in its subject, else the channel's own key, else the sender."""
    if (key := plain_key(message)) is not None:
        return key
    for external_id in reversed(message.references):
        known = await store.find_message(message.channel, external_id)
        if known is not None and known.conversation_id:
            conversation = await store.get_conversation(known.conversation_id)
            if conversation is not None:
                return conversation.thread_key
    if message.subject and (found := REF_IN_SUBJECT.search(message.subject)):
        conversation = await store.get_conversation(found[1])
        if conversation is not None and conversation.channel == message.channel:
            return conversation.thread_key
    return message.thread_key or message.external_id


def start(message: Message, key: str, team: str, now: datetime, sla: SLAConfig) -> Conversation:
    """The conversation `message` opens if it joins none; the store gives it a ref."""
    urgency = message.urgency or Urgency.LOW
    return Conversation(
        id=new_id("c"),
        channel=message.channel,
        customer=message.sender,
        thread_key=key,
        created_at=now,
        last_message_at=now,
        subject=message.subject,
        urgency=urgency,
        category=message.category or Category.GENERAL,
        reason=message.reason,
        team=team,
        first_response_due=now + sla.target(urgency),
    )
