"""One mailbox, read forever: backfill above the checkpoint, then IDLE (or poll).

Promise 1 in IMAP terms: a message counts as taken only once the sink has
durably queued it (or the dead letters hold its raw bytes); only then may
the UID checkpoint pass it, and only then are the optional \\Seen flag or
move applied. The checkpoint is `UIDVALIDITY:last UID` in the store, so a
restart, a reconnect or hours of downtime resume exactly there, with no
date window and no "last N" limit. A changed UIDVALIDITY means the UIDs
were renumbered: the folder is read again from the start and the store
drops what it already has by Message-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from channels.base import ChannelStore, Sink
from channels.email.imap import Fetched, ImapSession
from channels.email.parse import Identity, parse_email
from channels.email.parse_pool import Parse, Parsed, ParsePool, parse_batch
from router.errors import TemporaryFailure

if TYPE_CHECKING:
    from channels.email import ImapSettings

log = logging.getLogger(__name__)
RECONNECT_MAX_S = 60.0
POISON_ATTEMPTS = 3
"""A message the sink refuses this many times in a row is dead-lettered
raw: after a store outage every message succeeds again, while one the
store cannot take would otherwise hold the mailbox back for ever."""


class Mailbox:
    def __init__(
        self,
        settings: ImapSettings,
        identity: Identity,
        sink: Sink,
        store: ChannelStore,
        parse: Parse = parse_email,
        pool: ParsePool | None = None,
    ) -> None:
        """With a `pool`, mail is parsed in its worker processes (`parse`
        must then be a module-level function); without, on the event loop."""
        self.settings = settings
        self.identity = identity
        self.sink = sink
        self.store = store
        self.parse = parse
        self.pool = pool
        self.key = f"imap/{identity.channel}/{settings.username}@{settings.host}/{settings.folder}"
        self._refusals: dict[tuple[int, int], int] = {}
        self._failures = 0
        """Connection troubles in a row; reset once a backfill went through,
        so a session that fails right after login still backs off."""

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: reconnect with backoff after connection trouble. A
        refused login or a missing folder raises, for the daemon to log and
        retry slowly, so a wrong password is never a tight loop."""
        if self.pool is not None:
            self.pool.start()
        while not stop.is_set():
            session = ImapSession(self.settings)
            try:
                await session.open()
                await self._serve(session, stop)
            except TemporaryFailure as exc:
                self._failures += 1
                delay = min(RECONNECT_MAX_S, 0.5 * 2**self._failures) * random.uniform(0.5, 1.0)
                log.warning(
                    "channel %s: %s; reconnecting in %.1f s", self.identity.channel, exc.reason, delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            finally:
                await session.close()

    async def _serve(self, session: ImapSession, stop: asyncio.Event) -> None:
        last_uid = await self._last_uid(session.uidvalidity)
        idle = self.settings.idle and session.can_idle
        while not stop.is_set():
            last_uid = await self._backfill(session, last_uid, stop)
            self._failures = 0
            if stop.is_set():
                return
            if idle:
                await session.wait_for_mail(stop, min(self.settings.poll_seconds, 25 * 60))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.poll_seconds)

    async def _last_uid(self, uidvalidity: int) -> int:
        stored = await self.store.get_checkpoint(self.key)
        if stored is None:
            return 0
        validity, _, last = stored.partition(":")
        if validity != str(uidvalidity):
            log.warning(
                "channel %s: UIDVALIDITY of %s changed (%s -> %s); reading the folder again,"
                " messages already queued are recognised by Message-ID",
                self.identity.channel,
                self.settings.folder,
                validity,
                uidvalidity,
            )
            return 0
        return int(last or 0)

    async def _backfill(self, session: ImapSession, last_uid: int, stop: asyncio.Event) -> int:
        """Everything above `last_uid`, in UID order and batches; returns the
        new checkpoint. The next batch is fetched and parsed while this one
        is queued: with a pool, the worker parses while the event loop queues."""
        uids = await session.uids_after(last_uid)
        if uids:
            log.debug("channel %s: %d new messages above UID %d", self.identity.channel, len(uids), last_uid)
        batches = [
            uids[i : i + self.settings.batch_size] for i in range(0, len(uids), self.settings.batch_size)
        ]
        upcoming = asyncio.ensure_future(self._fetch(session, batches[0])) if batches else None
        try:
            for index, batch in enumerate(batches):
                assert upcoming is not None
                fetched = await upcoming
                upcoming = None
                if index + 1 < len(batches) and not stop.is_set():
                    upcoming = asyncio.ensure_future(self._fetch(session, batches[index + 1]))
                await self._take(session, fetched)
                last_uid = batch[-1]
                await self.store.put_checkpoint(self.key, f"{session.uidvalidity}:{last_uid}")
                if stop.is_set():
                    break
        finally:
            if upcoming is not None:
                upcoming.cancel()
                with contextlib.suppress(BaseException):
                    await upcoming
        return last_uid

    async def _fetch(self, session: ImapSession, batch: list[int]) -> list[tuple[Fetched, Parsed]]:
        """One batch, each mail with its Message or why it does not parse."""
        max_bytes = self.settings.max_message_bytes
        fetched = await session.fetch(batch, max_bytes)
        mails = [(item.raw, max_bytes if item.size > max_bytes else None) for item in fetched]
        if self.pool is None:
            parsed = parse_batch(self.parse, self.identity, mails)
        else:
            parsed = await self.pool.parse(self.parse, self.identity, mails)
        return list(zip(fetched, parsed, strict=True))

    async def _take(self, session: ImapSession, fetched: list[tuple[Fetched, Parsed]]) -> None:
        """Queue a parsed batch, then flag or move it."""
        uidvalidity = session.uidvalidity
        results = await asyncio.gather(*(self._take_one(uidvalidity, *each) for each in fetched))
        done = [item.uid for (item, _), ok in zip(fetched, results, strict=True) if ok]
        if len(done) < len(fetched):
            raise TemporaryFailure("the store did not take every message; trying again")
        if done and self.settings.mark_seen:
            await session.mark_seen(done)
        if done and self.settings.move_to:
            await session.move(done, self.settings.move_to)

    async def _take_one(self, uidvalidity: int, item: Fetched, message: Parsed) -> bool:
        """True once the message is durably queued or dead-lettered."""
        if isinstance(message, str):
            channel = self.identity.channel
            log.warning("channel %s: UID %d does not parse (%s); dead-lettered", channel, item.uid, message)
            await self._dead_letter(item, f"unparseable email (UID {item.uid}): {message}")
            return True
        try:
            await self.sink(message)
        except Exception as exc:
            key = (uidvalidity, item.uid)
            self._refusals[key] = self._refusals.get(key, 0) + 1
            if self._refusals[key] < POISON_ATTEMPTS:
                log.warning("channel %s: UID %d not queued: %s", self.identity.channel, item.uid, exc)
                return False
            await self._dead_letter(
                item, f"not queued after {POISON_ATTEMPTS} tries: {type(exc).__name__}: {exc}"
            )
        self._refusals.pop((uidvalidity, item.uid), None)
        return True

    async def _dead_letter(self, item: Fetched, error: str) -> None:
        """The raw mail, whole: as text when it is UTF-8, else each byte as one
        Latin-1 character (lossless: `payload.encode("latin-1")` gives it back)."""
        try:
            payload = item.raw.decode("utf-8")
        except UnicodeDecodeError:
            payload, error = item.raw.decode("latin-1"), f"{error} [payload: raw bytes as latin-1]"
        await self.store.add_dead_letter(self.identity.channel, payload, error)


async def check(settings: ImapSettings) -> str:
    """`channels test`: log in, open the folder, report what is there."""
    session = ImapSession(settings)
    try:
        await session.open()
        mode = "IDLE" if session.can_idle and settings.idle else f"polling every {settings.poll_seconds:g} s"
        return f"IMAP {session.where} {settings.folder}: {session.exists} messages, {mode}"
    finally:
        await session.close()
