"""Team by route, agent by the team's strategy and who is available."""

from __future__ import annotations

import logging

from router.model import Conversation, Message, Presence
from router.settings import Settings, TeamConfig
from router.store import Store

log = logging.getLogger(__name__)
MAX_PICKS = 5
"""Picks of one assignment when the picked agents keep going away meanwhile."""


def route(settings: Settings, message: Message) -> str:
    """First matching route wins; nothing matched goes to the first team."""
    facts = {
        "category": message.category.value if message.category else "general",
        "urgency": message.urgency.value if message.urgency else "low",
        "channel": message.channel,
        "language": message.language or "en",
    }
    for candidate in settings.routes:
        if candidate.matches(facts):
            return candidate.team
    return settings.teams[0].name


async def pick_agent(store: Store, team: TeamConfig) -> str | None:
    """An available agent of the team by its strategy; None for manual teams
    or when nobody is available (the conversation waits in the team queue)."""
    if team.assignment == "manual":
        return None
    agents = sorted(
        a.name for a in await store.list_agents() if team.name in a.teams and a.presence is Presence.AVAILABLE
    )
    if not agents:
        return None
    if team.assignment == "round_robin":
        turn = await store.next_counter(f"round_robin:{team.name}")
        return agents[(turn - 1) % len(agents)]
    counts = await store.open_counts(agents)
    return min(agents, key=lambda name: (counts.get(name, 0), name))


async def assign(store: Store, settings: Settings, conversation: Conversation) -> Conversation:
    """Give an unassigned conversation an agent. The claim is a compare-and-set,
    so two workers never both own one conversation."""
    team = next((t for t in settings.teams if t.name == conversation.team), None)
    if conversation.assignee is not None or team is None:
        return conversation
    for _ in range(MAX_PICKS):
        agent = await pick_agent(store, team)
        if agent is None:
            return conversation
        # `available`: the agent may have been set away since the pick, and
        # their hand-back of conversations may have looked already.
        claimed = await store.claim_conversation(conversation.id, agent, expected=None, available=True)
        if claimed is not None:
            log.debug("assigned %s to %s", conversation.ref, agent)
            return claimed
        conversation = await store.get_conversation(conversation.id) or conversation
        if conversation.assignee is not None:  # someone else assigned it meanwhile
            return conversation
    return conversation
