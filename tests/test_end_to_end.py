"""The first slice as a user sees it: webhook in, triage, route, ack, reply out."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from router.model import parse_time
from tests.conftest import Receiver

CRITICAL = "someone withdrew all my USDT, I did not do it"


async def test_critical_message_is_triaged_routed_acked_and_answered(
    start_daemon, receiver: Receiver
) -> None:
    router = await start_daemon(reply_url=receiver.url)
    resp = await router.post_message(
        {"id": "c-1", "from": {"id": "user-42", "name": "Ann"}, "text": CRITICAL}
    )
    assert resp.status == 202
    await router.settle()

    status, inbox = await router.api("GET", "/api/v1/conversations")
    assert status == 200
    top = inbox["conversations"][0]
    assert top["ref"].startswith("T-")
    assert (top["urgency"], top["category"], top["team"]) == ("critical", "security", "security")
    assert top["reason"]
    assert top["assignee"] == "admin"
    due = parse_time(top["first_response_due"]) - parse_time(top["created_at"])
    assert due == timedelta(minutes=15)
    assert top["first_response_at"] is None

    [ack] = await receiver.wait_for(1, kind="ack")
    assert ack["conversation_ref"] == top["ref"]
    assert top["ref"] in ack["text"] and "15 minutes" in ack["text"]
    assert ack["to"] == {"id": "user-42"} and ack["conversation"] == "user-42"
    assert ack["in_reply_to"] == "c-1"

    status, queued = await router.api(
        "POST", f"/api/v1/conversations/{top['ref']}/messages", {"text": "On it."}
    )
    assert status == 202 and queued["delivery"]["status"] == "queued"
    [reply] = await receiver.wait_for(1, kind="agent")
    assert reply["text"] == "On it." and reply["id"] == queued["id"] and reply["in_reply_to"] == "c-1"
    await asyncio.sleep(0.1)
    status, conversation = await router.api("GET", f"/api/v1/conversations/{top['ref']}")
    kinds = [(m["kind"], (m["delivery"] or {}).get("status")) for m in conversation["messages"]]
    assert kinds == [("customer", None), ("ack", "sent"), ("agent", "sent")]
    assert conversation["first_response_at"] is not None
    assert conversation["message_count"] == 3


async def test_routine_question_lands_below_the_critical_one(start_daemon, receiver: Receiver) -> None:
    router = await start_daemon(reply_url=receiver.url)
    await router.post_message({"id": "r-1", "from": {"id": "u-1"}, "text": "what is the withdrawal fee?"})
    await router.post_message({"id": "c-1", "from": {"id": "u-2"}, "text": CRITICAL})
    await router.settle()
    _, inbox = await router.api("GET", "/api/v1/conversations")
    first, second = inbox["conversations"]
    assert first["urgency"] == "critical"
    assert second["urgency"] in ("low", "normal") and second["team"] == "support"


async def test_chinese_customer_gets_a_chinese_ack(start_daemon, receiver: Receiver) -> None:
    router = await start_daemon(reply_url=receiver.url)
    await router.post_message({"id": "z-1", "from": {"id": "u-9"}, "text": "我的账户被盗了，币全被转走了"})
    [ack] = await receiver.wait_for(1, kind="ack")
    assert "15 分钟" in ack["text"] and ack["conversation_ref"] in ack["text"]


async def test_one_ack_per_conversation(start_daemon, receiver: Receiver) -> None:
    router = await start_daemon(reply_url=receiver.url)
    for i in range(3):
        await router.post_message({"id": f"m-{i}", "from": {"id": "u-1"}, "text": f"question {i} about fees"})
    await router.settle()
    await receiver.wait_for(1, kind="ack")
    await asyncio.sleep(0.3)
    assert len(receiver.delivered(kind="ack")) == 1
    _, inbox = await router.api("GET", "/api/v1/conversations")
    assert len(inbox["conversations"]) == 1 and inbox["conversations"][0]["message_count"] == 4


async def test_failing_reply_url_retries_then_dead(start_daemon, receiver: Receiver) -> None:
    receiver.statuses = [503, 503, 503]
    router = await start_daemon(reply_url=receiver.url)
    await router.post_message({"id": "f-1", "from": {"id": "u-1"}, "text": "hello"})
    for _ in range(100):
        _, inbox = await router.api("GET", "/api/v1/conversations")
        ref = inbox["conversations"][0]["ref"] if inbox["conversations"] else None
        if ref:
            _, conversation = await router.api("GET", f"/api/v1/conversations/{ref}")
            ack = [m for m in conversation["messages"] if m["kind"] == "ack"]
            if ack and ack[0]["delivery"]["status"] == "dead":
                break
        await asyncio.sleep(0.1)
    assert ack[0]["delivery"]["attempts"] == 3
    assert "503" in ack[0]["delivery"]["error"]
    assert len(receiver.received) == 3
    assert len({r["id"] for r in receiver.received}) == 1


async def test_pull_mode_serves_acks_and_replies(start_daemon) -> None:
    router = await start_daemon(reply_url=None)
    await router.post_message({"id": "p-1", "from": {"id": "u-5"}, "conversation": "thread-7", "text": "hi"})
    await router.settle()
    _, inbox = await router.api("GET", "/api/v1/conversations")
    ref = inbox["conversations"][0]["ref"]
    await router.api("POST", f"/api/v1/conversations/{ref}/messages", {"text": "Hello from us"})

    from tests.conftest import signed_headers

    async def pull(after: str) -> dict:
        target = f"/channels/web/outbound?after={after}&limit=10"
        headers = signed_headers(target.encode())
        async with router.http.get(router.base + target, headers=headers) as resp:
            assert resp.status == 200
            return await resp.json()

    page = await pull("")
    assert [m["kind"] for m in page["messages"]] == ["ack", "agent"]
    assert all(m["conversation"] == "thread-7" and m["conversation_ref"] == ref for m in page["messages"])
    assert (await pull(page["next"]))["messages"] == []
    _, conversation = await router.api("GET", f"/api/v1/conversations/{ref}")
    assert {m["delivery"]["status"] for m in conversation["messages"] if m["delivery"]} == {"sent"}
