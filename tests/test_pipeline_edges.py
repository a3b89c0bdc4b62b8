"""Pipeline edge cases found by hunting SPEC 6 promises, on the fake-clock desk."""

from __future__ import annotations

from datetime import timedelta

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
