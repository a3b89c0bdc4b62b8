"""`support-router run`: wire the parts, serve, and shut down in bounded time.

Shutdown order keeps promise 1: stop taking input (channels, then the HTTP
listener, which lets in-flight requests finish their durable enqueue), then
let workers finish the message in hand, then close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from aiohttp import web
from pydantic import SecretStr

from channels import REGISTRY
from channels.base import Channel
from channels.webhook import WebhookChannel
from router import agents, leases, pollers, triage
from router.acks import Templates
from router.config import Config
from router.desk import Desk
from router.errors import Conflict, StoreError
from router.model import Role
from router.outbox import Outbox
from router.pipeline import Pipeline
from router.store import Store, open_store
from router.web.app import Services, create_app

log = logging.getLogger(__name__)
STOP_BUDGET_S = 8.0
RECONNECT_MAX_S = 5.0


def state_dir() -> Path:
    return Path("var").resolve()


def build_channels(config: Config, say: Callable[[str], None] = print) -> dict[str, Channel]:
    """Every configured channel; a webhook secret generated now is shown once."""
    from router import logs

    channels: dict[str, Channel] = {}
    for spec in config.settings.channels:
        adapter = REGISTRY[spec.type]
        settings = adapter.Settings.model_validate(spec.options)
        for value in settings.__dict__.values():
            if isinstance(value, SecretStr):
                logs.add_secret(value.get_secret_value())
        channel = adapter(spec.name, settings, state_dir())
        channel.configure(config)
        if isinstance(channel, WebhookChannel) and channel.generated_secret:
            logs.add_secret(channel.generated_secret)
            say(f"webhook secret for channel {spec.name!r} (shown once): {channel.generated_secret}")
        channels[spec.name] = channel
    return channels


async def ensure_admin(store: Store, config: Config, say: Callable[[str], None] = print) -> None:
    """A first start with no agents creates `admin` and shows its token once.
    Daemons sharing a store may start together: the one that loses the race
    to create it starts all the same (the winner has shown the token)."""
    if await store.list_agents():
        return
    try:
        token = await agents.create(store, "admin", [t.name for t in config.settings.teams], Role.ADMIN)
    except Conflict:
        return
    say(f"admin agent created; its API token (shown once): {token}")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = open_store(config.settings.store.url)
        self.stop_workers = asyncio.Event()
        self.stop_input = asyncio.Event()
        self.pollers: list[asyncio.Task[None]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.runner: web.AppRunner | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        settings = self.config.settings
        await self.store.open()
        self.channels = build_channels(self.config)
        await ensure_admin(self.store, self.config)
        rules = triage.load_rules([self.config.path(p) for p in settings.triage.rules])
        templates = Templates(self.config.path(settings.acks.templates) if settings.acks.templates else None)
        self.pipeline = Pipeline(self.store, self.config, rules, templates)
        self.services = Services(self.store, self.config, self.channels, Desk(self.store, self.config))
        self.runner = web.AppRunner(create_app(self.services), shutdown_timeout=3.0, access_log=None)
        await self.runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self.runner, sock)
        else:
            site = web.TCPSite(self.runner, settings.server.host, settings.server.port)
        await site.start()
        # Worker names are stable across restarts: a restarted daemon takes
        # back what it had claimed when it died, without waiting out the
        # visibility timeout.
        port = sock.getsockname()[1] if sock is not None else settings.server.port
        consumer = f"{socket.gethostname()}:{port}"
        self.outbox = Outbox(self.store, self.config, self.channels, consumer=f"{consumer}/outbox")
        self.tasks = [
            asyncio.create_task(
                keep_running(f"worker {i}", partial(self.pipeline.run, f"{consumer}/w{i}"), self.stop_workers)
            )
            for i in range(settings.pipeline.workers)
        ]
        self.tasks.append(asyncio.create_task(keep_running("outbox", self.outbox.run, self.stop_workers)))
        # A lease holder is this process, not its name: a restart on the same
        # port must not pass for the process that held the lease before it.
        holder = f"{consumer}/{secrets.token_hex(4)}"
        for name, channel in self.channels.items():
            channel.bind_store(self.store)
            await channel.open(self.pipeline.accept)
            if channel.polls:
                poll = partial(pollers.supervise, channel)
                held = leases.hold(self.store, f"poller:{name}", holder, poll, self.stop_input)
                self.pollers.append(asyncio.create_task(held))
            log.info("channel %s (%s) started", name, channel.type)
        self.services.ready = True
        log.info("store %s; inbox at http://%s/", self.store.display_url, settings.server.listen)

    async def stop(self) -> None:
        """Bounded: whatever is still running after the budget is cancelled;
        it was not acknowledged, so the queue hands it out again."""
        self.services.stopping.set()
        self.stop_input.set()
        if self.pollers:
            await asyncio.wait(self.pollers, timeout=2.0)
        for task in self.pollers:
            task.cancel()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        if self.runner is not None:
            await self.runner.cleanup()
        self.stop_workers.set()
        _, late = await asyncio.wait(self.tasks, timeout=STOP_BUDGET_S - 3.0)
        for task in late:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.store.close()
        log.info("stopped")


Loop = Callable[[asyncio.Event], Awaitable[None]]


async def keep_running(name: str, run: Loop, stop: asyncio.Event) -> None:
    """Run a worker loop until `stop`, starting it again with backoff when it
    fails: while the store is unreachable (a Redis restart) workers wait and
    reconnect, and resume their own claims under their stable names."""
    failures = 0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        try:
            await run(stop)
            return
        except Exception as exc:
            failures = 1 if loop.time() - started > RECONNECT_MAX_S * 2 else failures + 1
            delay = min(RECONNECT_MAX_S, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
            if isinstance(exc, StoreError):
                log.warning("%s: %s; retrying in %.1f s", name, exc, delay)
            else:
                log.exception("%s failed; restarting in %.1f s", name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


async def run(config: Config) -> None:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    await stop.wait()
    log.info("stopping")
    await daemon.stop()
