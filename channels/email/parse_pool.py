"""Fetched mail parsed in a worker process, one UID batch per task.

Parsing is pure CPU: about 0.5 ms for a normal mail, seconds for one near
the 25 MB fetch limit. On the event loop it stalled the whole daemon (the
webhook ingress, the agent API, SSE, the other mailboxes) for that long.
A worker process parses instead, on another core; one task carries a whole
batch, so the pickling round trip is paid once per batch, not per mail.

Workers are spawned, never forked: the daemon runs threads (SQLite's,
aiohttp's resolver), and a forked child inherits their locks in whatever
state they were. A spawned worker starts a fresh interpreter and imports
the parser once (about a second of CPU, on its own core).

A mail is never lost to the pool: when a worker dies (killed, out of
memory), the batch it had is parsed here on the event loop, as it was
before there was a pool, and the next batch gets a new worker. A pool that
cannot start at all, or whose workers keep dying, is given up for the
rest of the process's life, and mail is parsed on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from channels.email.parse import Identity
from router.model import Message

log = logging.getLogger(__name__)

Parse = Callable[[bytes, Identity, int | None], Message]
Mail = tuple[bytes, int | None]
"""A fetched mail's raw bytes, and the size it was cut at (None: whole)."""
Parsed = Message | str
"""The Message, or why the mail does not parse (`Type: reason`)."""

WORKERS = min(2, os.cpu_count() or 1)
"""Enough for two mailboxes backfilling at once; workers are spawned only
as batches need them, so one busy mailbox runs one."""
BREAKS_TO_GIVE_UP = 3
"""Worker deaths in a row, with no batch coming back in between, after
which the pool is given up: a worker that dies while starting would
otherwise be spawned again for every batch."""
STOP_GRACE_S = 1.0
"""How long `close` lets an idle worker exit before killing it; one in the
middle of a large mail is killed (its batch was never acknowledged)."""


def parse_batch(parse: Parse, identity: Identity, mails: Sequence[Mail]) -> list[Parsed]:
    """Every mail's Message or error, in order. In the worker and, as the
    fallback, in the daemon itself: one mail that raises costs only itself."""
    results: list[Parsed] = []
    for raw, truncated_at in mails:
        try:
            results.append(parse(raw, identity, truncated_at))
        except Exception as exc:
            results.append(f"{type(exc).__name__}: {exc}")
    return results


def _in_worker() -> None:
    """A worker leaves SIGINT and SIGTERM to the daemon: Ctrl-C in a terminal,
    or a service manager signalling the whole process group, would kill it
    mid-batch while the daemon is still draining. `ParsePool.close` stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ParsePool:
    """The worker processes one daemon parses its mail in, shared by all of
    its mailboxes (see `shared`)."""

    def __init__(self, workers: int = WORKERS) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._breaks = 0
        self._given_up = False
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The worker processes now running."""
        # ProcessPoolExecutor has no public view of its processes.
        return list(self._executor._processes or {}) if self._executor is not None else []

    def start(self) -> None:
        """Spawn a worker now, while nothing waits for it, so the first batch
        does not wait for its interpreter to start and import the parser."""
        executor = self._running()
        if executor is not None:
            try:
                executor.submit(os.getpid)
            except Exception as exc:
                self._give_up(executor, exc)

    async def parse(self, parse: Parse, identity: Identity, mails: Sequence[Mail]) -> list[Parsed]:
        """`parse_batch` in a worker; here, on the event loop, when there is
        none to be had. `parse` must be a module-level function (the worker
        imports it by name)."""
        executor = self._running()
        results = await self._in_worker(executor, parse, identity, mails) if executor else None
        return parse_batch(parse, identity, mails) if results is None else results

    async def close(self) -> None:
        """Stop the workers and wait for them, within about a second, as the
        daemon has 10 s to exit: one still in a batch is killed. Its caller,
        if still waiting, parses the batch itself; the daemon stops its
        mailboxes first, and the batch, never acknowledged, is fetched again
        at the next start. Idempotent; after it, mail is parsed on the loop."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list((executor._processes or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)

        def stop() -> None:
            for process in processes:
                process.join(STOP_GRACE_S)
                if process.is_alive():
                    process.kill()
                    process.join()

        await asyncio.to_thread(stop)

    async def _in_worker(
        self, executor: ProcessPoolExecutor, parse: Parse, identity: Identity, mails: Sequence[Mail]
    ) -> list[Parsed] | None:
        """None when the worker did not parse the batch (the reason logged)."""
        try:
            results = await asyncio.wrap_future(executor.submit(parse_batch, parse, identity, list(mails)))
        except BrokenProcessPool:
            self._broken(executor, len(mails))
            return None
        except Exception as exc:  # no worker could be spawned, `parse` does not pickle: for good
            self._give_up(executor, exc)
            return None
        self._breaks = 0
        return results

    def _running(self) -> ProcessPoolExecutor | None:
        """The executor, created on first use; None once closed or given up."""
        if self._closed or self._given_up:
            return None
        if self._executor is None:
            try:
                context = multiprocessing.get_context("spawn")
                self._executor = ProcessPoolExecutor(self.workers, context, initializer=_in_worker)
            except Exception as exc:
                self._give_up(None, exc)
        return self._executor

    def _broken(self, executor: ProcessPoolExecutor, count: int) -> None:
        """A worker died: this batch is parsed here, the next gets a new pool.
        Only the first of the mailboxes that see the same death logs it."""
        if self._executor is not executor:
            return
        self._executor = None
        executor.shutdown(wait=False)  # it fails what it still holds with BrokenProcessPool
        self._breaks += 1
        if self._breaks >= BREAKS_TO_GIVE_UP:
            self._give_up(None, RuntimeError(f"its worker process died {self._breaks} times in a row"))
            return
        log.warning(
            "email parsing: the worker process died; the %d mails it had are parsed on the event loop,"
            " the next batch goes to a new worker",
            count,
        )

    def _give_up(self, executor: ProcessPoolExecutor | None, exc: Exception) -> None:
        if executor is not None:
            executor.shutdown(wait=False)  # another mailbox's batch in it may still come back
        self._executor = None
        if not self._given_up:
            self._given_up = True
            log.error(
                "email parsing: no worker process (%s: %s); parsing on the event loop from now on,"
                " which stalls the daemon while a large mail is read",
                type(exc).__name__,
                exc,
            )


_shared: ParsePool | None = None
_holders = 0


def shared() -> ParsePool:
    """The process's one pool, for an email channel to use until it calls
    `release`: several mailboxes share its workers rather than each
    spawning its own. No process starts until a mailbox needs one."""
    global _shared, _holders
    if _shared is None:
        _shared = ParsePool()
    _holders += 1
    return _shared


async def release() -> None:
    """The last email channel to close stops the workers."""
    global _shared, _holders
    _holders -= 1
    if _holders == 0 and _shared is not None:
        pool, _shared = _shared, None
        await pool.close()
