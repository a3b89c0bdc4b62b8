"""Shared fixtures: a real reply_url receiver, an in-process daemon on a
free loopback port, and a signing client for the webhook channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from channels.webhook import sign
from router import config as configuration
from router.daemon import Daemon
from router.model import Direction, Kind, Message, Party, new_id, utcnow

pytest_plugins = ["tests.services", "tests.mailboxes"]
SECRET = "test-webhook-secret-0123456789"


def customer_message(text: str, sender: str = "u-1", *, at: datetime | None = None, **extra: Any) -> Message:
    """A customer's webhook message on channel `web`, threaded by sender."""
    return Message(
        id=new_id("m"),
        channel="web",
        channel_type="webhook",
        direction=Direction.IN,
        kind=Kind.CUSTOMER,
        external_id=new_id("x"),
        sender=Party(id=sender),
        text=text,
        received_at=at or utcnow(),
        thread_key=sender,
        **extra,
    )


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with free_socket() as sock:
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` on a free loopback port, for the test's duration; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    sock = free_socket()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def redirecting(target: str) -> AsyncIterator[str]:
    """A URL on loopback that answers every GET and POST with a redirect to `target`."""

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_route("*", "/moved", moved)
    async with serving(app) as base:
        yield f"{base}/moved"


def signed_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-Router-Timestamp": stamp,
        "X-Router-Signature": sign(secret, stamp, body),
    }


@dataclass
class Receiver:
    """The customer's app behind reply_url: records every signed POST and
    answers with the status tests choose."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers.get("X-Router-Timestamp", "")
        if request.headers.get("X-Router-Signature") != sign(SECRET, stamp, body):
            return web.Response(status=401)
        status = self.statuses.pop(0) if self.statuses else 200
        self.received.append({**json.loads(body), "_status": status})
        self.headers.append(dict(request.headers))
        self.arrived.set()
        return web.Response(status=status)

    async def reachable(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def delivered(self, **match: Any) -> list[dict[str, Any]]:
        return [
            r for r in self.received if r["_status"] < 300 and all(r.get(k) == v for k, v in match.items())
        ]

    async def wait_for(self, count: int, within_s: float = 10.0, **match: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        while len(self.delivered(**match)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} deliveries matching {match}, got {self.received}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.2)
        return self.delivered(**match)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rec:
        yield rec


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A reply_url receiver on loopback (POST takes, GET answers "reachable")."""
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/replies", rec.handle)
    app.router.add_get("/replies", rec.reachable)
    async with serving(app) as base:
        rec.url = f"{base}/replies"
        yield rec


def write_config(directory: Path, reply_url: str | None, extra: str = "", secret: str = SECRET) -> Path:
    """Two teams (security by least open, support by round robin), a webhook
    channel `web`; the benches use it too, so tests and figures share a desk."""
    reply = f'reply_url = "{reply_url}"' if reply_url else ""
    path = directory / "router.toml"
    path.write_text(
        f"""
[store]
url = "sqlite:///{directory}/router.db"

[[channels]]
name = "web"
type = "webhook"
secret = "{secret}"
{reply}

[[teams]]
name = "security"
assignment = "least_open"

[[teams]]
name = "support"
assignment = "round_robin"

[[routes]]
match = {{ category = "security" }}
team = "security"

[[routes]]
match = {{}}
team = "support"

[outbox]
max_attempts = 3
backoff_max = "1s"
{extra}
"""
    )
    return path


@dataclass
class Running:
    """A daemon started in this test's event loop, and a client for it."""

    daemon: Daemon
    base: str
    http: aiohttp.ClientSession
    token: str = ""

    async def post_message(self, payload: dict[str, Any], channel: str = "web") -> aiohttp.ClientResponse:
        body = json.dumps(payload).encode()
        async with self.http.post(
            f"{self.base}/channels/{channel}/inbound", data=body, headers=signed_headers(body)
        ) as resp:
            await resp.read()
            return resp

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.request(method, f"{self.base}{path}", json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def settle(self) -> None:
        """Wait until the pipeline has handled everything queued."""
        for _ in range(200):
            if await self.daemon.store.inbound_backlog() == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("pipeline did not drain")


@pytest.fixture
async def start_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[Callable[..., Any]]:
    monkeypatch.chdir(tmp_path)
    started: list[Running] = []

    async def start(reply_url: str | None = None, extra: str = "") -> Running:
        config = configuration.load(str(write_config(tmp_path, reply_url, extra)))
        daemon = Daemon(config)
        sock = free_socket()
        await daemon.start(sock)
        out = capsys.readouterr().out
        token = next((line.rsplit(" ", 1)[1] for line in out.splitlines() if "admin agent" in line), "")
        running = Running(daemon, f"http://127.0.0.1:{sock.getsockname()[1]}", aiohttp.ClientSession(), token)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.http.close()
        await running.daemon.stop()
