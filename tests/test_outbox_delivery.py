"""Outbound delivery as the customer and the desk see it: what a receiver's
answers do to the number of sends and to the reply's final status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Running, free_socket


class Answering:
    """A reply_url that answers every POST with the status and headers the
    test sets, and records what it got."""

    def __init__(self) -> None:
        self.url = ""
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        self.headers: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.json())
        return web.Response(status=self.status, headers=self.headers)


@pytest.fixture
async def answering() -> AsyncIterator[Answering]:
    peer = Answering()
    app = web.Application()
    app.router.add_post("/replies", peer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = free_socket()
    await web.SockSite(runner, sock).start()
    peer.url = f"http://127.0.0.1:{sock.getsockname()[1]}/replies"
    yield peer
    await runner.cleanup()


async def until(check: Callable[[], bool], within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def ack_delivery(router: Running) -> dict[str, Any]:
    _, inbox = await router.api("GET", "/api/v1/conversations")
    ref = inbox["conversations"][0]["ref"]
    _, conversation = await router.api("GET", f"/api/v1/conversations/{ref}")
    [ack] = [m for m in conversation["messages"] if m["kind"] == "ack"]
    return ack["delivery"]


async def test_a_retry_after_of_ages_keeps_the_ack_queued_and_posts_it_once(
    start_daemon, answering: Answering
) -> None:
    """A receiver (or the proxy in front) asking to wait longer than the
    calendar goes must not take the outbox down: before, every restart of
    the outbox loop re-sent the ack, with no attempt ever counted."""
    answering.status = 503
    answering.headers = {"Retry-After": "99999999999999"}
    router = await start_daemon(reply_url=answering.url)
    await router.post_message({"id": "r-1", "from": {"id": "u-1"}, "text": "what is the fee?"})
    await until(lambda: len(answering.posts) >= 1)
    await asyncio.sleep(1.5)
    assert len(answering.posts) == 1
    delivery = await ack_delivery(router)
    assert (delivery["status"], delivery["attempts"]) == ("queued", 1)
    assert "503" in delivery["error"]
