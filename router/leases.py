"""Runs work (a channel's poll loop) only while this process holds its lease.

Two processes polling one IMAP mailbox or one Telegram bot would take the
same messages twice and fight over the checkpoint, so every poller runs
under a lease in the shared store (SPEC 6 promise 6). The holder renews
every third of the TTL. When a renewal is refused, or renewals have failed
(the store unreachable) for long enough that the lease may have run out,
the work is told to stop and, if it does not within a grace time (at most
STOP_GRACE_S), is cancelled, all before the lease can expire in the store,
so two holders never run at once. Processes without the lease try again every tenth of
the TTL, so one takes over within about TTL + TTL/10 of a holder's death.

While it runs, the work can read its Lease (with the fencing token, which
grows with every new holder) from `HELD`, to stamp what it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from router.errors import StoreError
from router.store import Store

log = logging.getLogger(__name__)
TTL_S = 15.0
STOP_GRACE_S = 1.0
Work = Callable[[asyncio.Event], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    token: int


HELD: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("lease", default=None)


async def hold(
    store: Store, name: str, holder: str, work: Work, stop: asyncio.Event, ttl_s: float | None = None
) -> None:
    """Until `stop`: acquire the lease, run `work(its_stop)` while it is held,
    and compete for it again whenever it is lost or the work ends."""
    ttl_s = ttl_s or TTL_S
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        asked_at = loop.time()
        try:
            token = await store.acquire_lease(name, holder, ttl_s)
        except StoreError as exc:
            log.warning("lease %s: %s", name, exc)
            token = None
        if token is None:
            await _wait(stop, ttl_s / 10)
            continue
        log.info("lease %s held by %s (token %d)", name, holder, token)
        await _run_held(store, Lease(name, holder, token), work, stop, ttl_s, asked_at + ttl_s)
        await _wait(stop, ttl_s / 10)


async def _run_held(
    store: Store, lease: Lease, work: Work, stop: asyncio.Event, ttl_s: float, valid_until: float
) -> None:
    """`valid_until` is this process' earliest idea of when the store lets the
    lease go: ttl_s after the successful request was *sent*."""
    loop = asyncio.get_running_loop()
    grace_s = min(STOP_GRACE_S, ttl_s / 5)
    margin = grace_s + ttl_s / 10
    context = contextvars.copy_context()
    context.run(HELD.set, lease)
    work_stop = asyncio.Event()
    task = asyncio.create_task(work(work_stop), context=context)
    lost = False
    try:
        while not stop.is_set() and not task.done():
            next_renewal = min(loop.time() + ttl_s / 3, valid_until - margin)
            await _wait_any(stop, task, next_renewal - loop.time())
            if stop.is_set() or task.done():
                break
            if loop.time() >= valid_until - margin:
                log.warning("lease %s: store unreachable too long; stopping", lease.name)
                break
            asked_at = loop.time()
            try:
                renewed = await asyncio.wait_for(
                    store.renew_lease(lease.name, lease.holder, ttl_s), valid_until - margin - asked_at
                )
            except (StoreError, TimeoutError) as exc:
                log.warning("lease %s: renewal failed (%s)", lease.name, exc)
                continue
            if not renewed:
                log.warning("lease %s lost by %s", lease.name, lease.holder)
                lost = True
                break
            valid_until = asked_at + ttl_s
    finally:
        work_stop.set()
        await _finish(task, grace_s)
        if not lost:
            with contextlib.suppress(StoreError):
                await store.release_lease(lease.name, lease.holder)


async def _finish(task: asyncio.Task[None], grace_s: float) -> None:
    """Let the work stop by itself for `grace_s`, then cancel it; its errors
    are its supervisor's business (pollers.supervise logs and retries)."""
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))


async def _wait_any(stop: asyncio.Event, task: asyncio.Task[None], seconds: float) -> None:
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({stopping, task}, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
