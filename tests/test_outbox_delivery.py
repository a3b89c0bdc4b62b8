"""Outbound delivery as the customer and the desk see it: what a receiver's
answers do to the number of sends and to the reply's final status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router import config as configuration
from router.daemon import Daemon
from router.model import Delivery, DeliveryStatus, utcnow
from tests.conftest import Running, free_socket, write_config


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


async def test_a_desk_that_retries_for_weeks_keeps_counting_past_1024_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answering: Answering
) -> None:
    """`outbox.max_attempts = 2000` (keep trying for a fortnight at the 10m
    cap): the exponential backoff of attempt 1025 is past what a float holds.
    Before, the outbox loop crashed there and every restart re-sent the ack
    without counting the attempt, so the retries never ended."""
    monkeypatch.chdir(tmp_path)
    answering.status = 503
    answering.headers = {"Retry-After": "60"}  # so each try shows as one POST
    path = write_config(tmp_path, answering.url)
    path.write_text(path.read_text().replace("max_attempts = 3", "max_attempts = 2000"))
    daemon = Daemon(configuration.load(str(path)))
    sock = free_socket()
    await daemon.start(sock)
    router = Running(daemon, f"http://127.0.0.1:{sock.getsockname()[1]}", aiohttp.ClientSession())
    try:
        await router.post_message({"id": "w-1", "from": {"id": "u-1"}, "text": "what is the fee?"})
        await until(lambda: len(answering.posts) == 1)
        ack_id = answering.posts[0]["id"]
        for _ in range(100):
            ack = await daemon.store.get_message(ack_id)
            if ack and ack.delivery and ack.delivery.attempts == 1:
                break
            await asyncio.sleep(0.05)
        # A week of outage later: the 1024th try failed too, the next is due.
        await daemon.store.record_delivery(
            ack_id, Delivery(DeliveryStatus.QUEUED, 1024, "HTTP 503", utcnow())
        )
        await until(lambda: len(answering.posts) == 2)
        await asyncio.sleep(1.5)
        assert len(answering.posts) == 2
        ack = await daemon.store.get_message(ack_id)
        assert ack is not None and ack.delivery is not None
        assert (ack.delivery.status, ack.delivery.attempts) == (DeliveryStatus.QUEUED, 1025)
    finally:
        await router.http.close()
        await daemon.stop()
