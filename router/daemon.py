"""`support-router run`: wire the parts, serve, and shut down in bounded time.

Shutdown order keeps promise 1: stop taking input (channels, then the HTTP
listener, which lets in-flight requests finish their durable enqueue), then
let workers finish the message in hand, then close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from pydantic import SecretStr

from channels import REGISTRY
from channels.base import Channel
from channels.webhook import WebhookChannel
from router import agents, pollers, triage
from router.acks import Templates
from router.config import Config
from router.desk import Desk
from router.model import Role
from router.outbox import Outbox
from router.pipeline import Pipeline
from router.store import Store, open_store
from router.web.app import Services, create_app

log = logging.getLogger(__name__)
STOP_BUDGET_S = 8.0


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
        if isinstance(channel, WebhookChannel) and channel.generated_secret:
            logs.add_secret(channel.generated_secret)
            say(f"webhook secret for channel {spec.name!r} (shown once): {channel.generated_secret}")
        channels[spec.name] = channel
    return channels


async def ensure_admin(store: Store, config: Config, say: Callable[[str], None] = print) -> None:
    """A first start with no agents creates `admin` and shows its token once."""
    if await store.list_agents():
        return
    token = await agents.create(store, "admin", [t.name for t in config.settings.teams], Role.ADMIN)
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
            asyncio.create_task(self.pipeline.run(f"{consumer}/w{i}", self.stop_workers))
            for i in range(settings.pipeline.workers)
        ]
        self.tasks.append(asyncio.create_task(self.outbox.run(self.stop_workers)))
        for name, channel in self.channels.items():
            await channel.open(self.pipeline.accept)
            if channel.polls:
                self.pollers.append(asyncio.create_task(pollers.supervise(channel, self.stop_input)))
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
