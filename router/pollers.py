"""Runs each polling channel's loop, restarting it with backoff when it fails.

One failing mailbox or bot never stops the others or the daemon (SPEC 6
promise 7). Exactly-one-process ownership of each poller (a lease in the
store) wraps `supervise` when several daemons share a store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from channels.base import Channel

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 60.0


async def supervise(channel: Channel, stop: asyncio.Event) -> None:
    failures = 0
    while not stop.is_set():
        try:
            await channel.poll(stop)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            delay = min(BACKOFF_MAX_S, 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
            log.error("channel %s: %s; retrying in %.0f s", channel.name, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
