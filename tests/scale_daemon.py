"""`python -m tests.scale_daemon run -c FILE`: the daemon, plus a polling test channel.

The channel type `recording` stands in for an IMAP mailbox or a Telegram bot
in polling mode: it polls every `interval_s` and appends one line per poll,
`<pid> <fencing token> <unix time>`, to the file its table names, so a test
can tell which process polled when. Environment knobs shorten what a kill -9
costs, so tests finish in seconds: ROUTER_TEST_VISIBILITY_S (pipeline and
outbox claims) and ROUTER_TEST_LEASE_TTL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import ClassVar

from channels import REGISTRY
from channels.base import Channel, ChannelSettings
from router import cli, leases, outbox, pipeline
from router.errors import PermanentFailure
from router.model import Conversation, Message


class RecordingSettings(ChannelSettings):
    log: str
    interval_s: float = 0.05


class RecordingChannel(Channel):
    type: ClassVar[str] = "recording"
    Settings: ClassVar[type[ChannelSettings]] = RecordingSettings
    settings: RecordingSettings
    polls = True

    async def poll(self, stop: asyncio.Event) -> None:
        lease = leases.HELD.get()
        token = lease.token if lease else 0
        while not stop.is_set():
            _record(self.settings.log, f"{os.getpid()} {token} {time.time():.3f}\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.interval_s)

    async def send(self, message: Message, conversation: Conversation) -> str:
        raise PermanentFailure("the recording channel sends nothing")

    async def check(self) -> str:
        return "records polls"


def _record(path: str, line: str) -> None:
    """One write per line, appended: lines of several processes never mix."""
    with open(path, "a") as out:
        out.write(line)


def main() -> int:
    REGISTRY[RecordingChannel.type] = RecordingChannel
    if visibility := os.environ.get("ROUTER_TEST_VISIBILITY_S"):
        pipeline.VISIBILITY_S = outbox.VISIBILITY_S = float(visibility)
    if ttl := os.environ.get("ROUTER_TEST_LEASE_TTL_S"):
        leases.TTL_S = float(ttl)
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
