"""The agent API as an integrator sees it: auth, filters, paging, errors, events."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import Receiver


@pytest.fixture
async def router(start_daemon, receiver: Receiver):
    return await start_daemon(reply_url=receiver.url)


async def test_every_agent_endpoint_needs_a_valid_token(router) -> None:
    for method, path in [
        ("GET", "/api/v1/conversations"),
        ("GET", "/api/v1/conversations/T-000001"),
        ("POST", "/api/v1/conversations/T-000001/messages"),
        ("POST", "/api/v1/conversations/T-000001/assign"),
        ("POST", "/api/v1/conversations/T-000001/status"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/agents"),
    ]:
        for header in ({}, {"Authorization": "Bearer srt_wrong"}, {"Authorization": f"Basic {router.token}"}):
            async with router.http.request(method, router.base + path, headers=header) as resp:
                assert resp.status == 401, (method, path, header)
                assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_a_removed_agent_is_locked_out(router) -> None:
    from router import agents

    token = await agents.create(router.daemon.store, "bob", ["support"])
    router.token = token
    assert (await router.api("GET", "/api/v1/conversations"))[0] == 200
    await router.daemon.store.remove_agent("bob")
    assert (await router.api("GET", "/api/v1/conversations"))[0] == 401


async def test_presence_says_which_conversations_were_reassigned_and_which_wait_in_the_queue(router) -> None:
    """The admin is in every team: the only one available in support, so
    going away leaves its conversation to the queue; coming back takes it up."""
    await router.post_message({"id": "m-1", "from": {"id": "u-1"}, "text": "what are the fees?"})
    await router.settle()
    status, away = await router.api("POST", "/api/v1/agents/me/presence", {"presence": "away"})
    [conv] = (await router.api("GET", "/api/v1/conversations"))[1]["conversations"]
    assert status == 200 and (away["reassigned"], away["queued"]) == ([], [conv["ref"]])
    assert conv["assignee"] is None
    status, back = await router.api("POST", "/api/v1/agents/me/presence", {"presence": "available"})
    assert status == 200 and (back["reassigned"], back["queued"]) == ([conv["ref"]], [])


async def test_inbox_filters_and_paging(router) -> None:
    for i in range(120):
        text = "someone hacked my account and stole my BTC" if i % 10 == 0 else f"what are the fees? {i}"
        await router.post_message({"id": f"m-{i}", "from": {"id": f"u-{i}"}, "text": text})
    await router.settle()
    seen: list[dict] = []
    cursor = ""
    while True:
        status, page = await router.api("GET", f"/api/v1/conversations?limit=25&cursor={cursor}")
        assert status == 200
        seen += page["conversations"]
        if not (cursor := page["next_cursor"]):
            break
    assert len(seen) == len({c["id"] for c in seen}) == 120
    assert [c["urgency"] for c in seen[:12]] == ["critical"] * 12
    keys = [(c["first_response_due"], c["created_at"]) for c in seen if c["urgency"] == seen[-1]["urgency"]]
    assert keys == sorted(keys)

    _, security = await router.api("GET", "/api/v1/conversations?team=security&limit=500")
    assert len(security["conversations"]) == 12
    _, mine = await router.api("GET", "/api/v1/conversations?assignee=me&limit=500")
    assert len(mine["conversations"]) == 120  # admin is the only agent
    await router.api("POST", f"/api/v1/conversations/{seen[0]['ref']}/assign", {"agent": None})
    _, nobody = await router.api("GET", "/api/v1/conversations?assignee=none")
    assert [c["ref"] for c in nobody["conversations"]] == [seen[0]["ref"]]

    await router.api("POST", f"/api/v1/conversations/{seen[0]['ref']}/status", {"status": "closed"})
    _, still_open = await router.api("GET", "/api/v1/conversations?limit=500")
    assert seen[0]["ref"] not in [c["ref"] for c in still_open["conversations"]]
    _, closed = await router.api("GET", "/api/v1/conversations?status=closed")
    assert [c["ref"] for c in closed["conversations"]] == [seen[0]["ref"]]
    _, everything = await router.api("GET", "/api/v1/conversations?status=all&limit=9999")
    assert len(everything["conversations"]) == 120  # limit above 500 is clamped, not refused


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/api/v1/conversations?status=bogus", None, 400, "invalid_body"),
        ("GET", "/api/v1/conversations?limit=0", None, 400, "invalid_query"),
        ("GET", "/api/v1/conversations?limit=ten", None, 400, "invalid_query"),
        ("GET", "/api/v1/conversations?cursor=not-ours", None, 400, "invalid_query"),
        ("GET", "/api/v1/conversations/T-999999", None, 404, "not_found"),
        ("POST", "/api/v1/conversations/T-000001/messages", {"text": ""}, 400, "invalid_body"),
        ("POST", "/api/v1/conversations/T-000001/messages", {"txt": "hi"}, 400, "invalid_body"),
        ("POST", "/api/v1/conversations/T-000001/messages", [1], 400, "invalid_body"),
        ("POST", "/api/v1/conversations/T-000001/assign", {"agent": "ghost"}, 404, "not_found"),
        ("POST", "/api/v1/conversations/T-000001/assign", {}, 400, "invalid_body"),
        ("POST", "/api/v1/conversations/T-000001/status", {"status": "done"}, 400, "invalid_body"),
        ("POST", "/api/v1/conversations/T-999999/messages", {"text": "hi"}, 404, "not_found"),
    ],
)
async def test_bad_requests_get_clear_errors(router, method, path, body, status, code) -> None:
    await router.post_message({"id": "m-1", "from": {"id": "u-1"}, "text": "hello"})
    await router.settle()
    got, answer = await router.api(method, path, body)
    assert (got, answer["error"]["code"]) == (status, code)
    assert answer["error"]["message"]


async def test_conversation_by_id_or_ref_has_its_messages_oldest_first(router) -> None:
    await router.post_message({"id": "m-1", "from": {"id": "u-1"}, "text": "first"})
    await router.settle()
    await router.post_message({"id": "m-2", "from": {"id": "u-1"}, "text": "second"})
    await router.settle()
    _, inbox = await router.api("GET", "/api/v1/conversations")
    [conv] = inbox["conversations"]
    _, by_ref = await router.api("GET", f"/api/v1/conversations/{conv['ref']}")
    _, by_id = await router.api("GET", f"/api/v1/conversations/{conv['id']}")
    assert by_ref == by_id
    assert [m["text"] for m in by_ref["messages"] if m["kind"] == "customer"] == ["first", "second"]
    assert by_ref["message_count"] == len(by_ref["messages"]) == 3


async def test_events_stream_tells_agents_what_happened(router, receiver: Receiver) -> None:
    headers = {"Authorization": f"Bearer {router.token}"}
    async with router.http.get(f"{router.base}/api/v1/events", headers=headers) as stream:
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        await router.post_message({"id": "m-1", "from": {"id": "u-1"}, "text": "my account was hacked"})
        events: list[tuple[str, dict]] = []
        kind = ""
        async with asyncio.timeout(10):
            async for raw in stream.content:
                line = raw.decode().strip()
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
                if any(k == "message.delivery" for k, _ in events):
                    break
    kinds = [k for k, _ in events]
    assert kinds[0] == "conversation.created" and "message.created" in kinds
    created = events[0][1]
    assert created["urgency"] == "critical" and created["ref"].startswith("T-")
    inbound = next(d for k, d in events if k == "message.created" and d["direction"] == "in")
    assert inbound["conversation_id"] == created["id"]  # the page files it under its conversation
    delivery = next(d for k, d in events if k == "message.delivery")
    assert delivery["kind"] == "ack" and delivery["delivery"]["status"] == "sent"


async def test_health_readiness_and_metrics(router) -> None:
    await router.post_message({"id": "m-1", "from": {"id": "u-1"}, "text": "hi"})
    await router.settle()
    async with router.http.get(f"{router.base}/healthz") as resp:
        assert resp.status == 200
    async with router.http.get(f"{router.base}/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["channels"] == ["web"]
    async with router.http.get(f"{router.base}/metrics") as resp:
        text = await resp.text()
    assert 'router_inbound_messages_total{channel="web",urgency="low"}' in text
    assert "router_inbound_backlog 0.0" in text
