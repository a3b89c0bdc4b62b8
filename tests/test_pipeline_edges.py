"""Pipeline edge cases found by hunting SPEC 6 promises, on the fake-clock desk."""

from __future__ import annotations

from datetime import timedelta

from router.model import Presence
from tests.test_desk import Desk_, add_agents, conversations, desk  # noqa: F401 (the fixture)


async def test_an_edit_that_escalates_to_security_is_assigned_there(desk: Desk_) -> None:  # noqa: F811
    await add_agents(desk.store, "bob")
    await add_agents(desk.store, "sec1", team="security")
    question = await desk.receive("what is the withdrawal fee?")
    [conv] = await conversations(desk)
    assert (conv.team, conv.assignee) == ("support", "bob")
    desk.clock.advance(minutes=10)
    await desk.receive("someone withdrew all my BTC without my permission!", edit_of=question.external_id)
    [conv] = await conversations(desk)
    assert (conv.urgency.value, conv.team) == ("critical", "security")
    assert conv.first_response_due == desk.clock.now + timedelta(minutes=15)
    assert conv.assignee == "sec1"  # not left unassigned with sec1 available


async def test_an_agent_going_away_while_being_assigned_a_conversation_does_not_keep_it(
    desk: Desk_,  # noqa: F811
) -> None:
    """`agents presence bob away` (the CLI, another process) lands between
    the worker picking bob and claiming the conversation for him: the
    hand-back finds nothing of his yet, so the claim must not stand."""
    await add_agents(desk.store, "bob", "carol")
    store = desk.store
    real_next_counter = store.next_counter

    async def bob_leaves_meanwhile(name: str) -> int:
        turn = await real_next_counter(name)
        await desk.desk.set_presence("bob", Presence.AWAY)
        return turn

    store.next_counter = bob_leaves_meanwhile  # type: ignore[method-assign]
    await desk.receive("how long do deposits take?")
    [conv] = await conversations(desk)
    assert conv.assignee == "carol"
