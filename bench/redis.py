"""Redis store benchmark: scale-out ingest, the pipeline against raw streams, RSS.

    python bench/redis.py [--messages N] [--rate R] [--seconds S] [--concurrency C]
                          [--conversations K]

In one run, against a redis-server it starts in a temp dir on a free loopback
port (appendonly yes, appendfsync everysec, as docker-compose.yml runs it):

0. the floor (bench/bare_handler.py --triage): HMAC check, the router's own
   parse and triage, 202, nothing stored: what no daemon can beat here;
1. one daemon (`python -m router run`, store `redis://...`): closed-loop
   webhook throughput (msg/s, p50/p99 to the 202), then a paced R msg/s for
   S s: POST start -> `message.created` on GET /api/v1/events (visible in
   the inbox), p50/p99;
2. the same with two daemons on the one Redis, requests alternating between
   them and the events read from the first only (they reach every process);
3. in this process, N messages each way: a raw XADD / XREADGROUP / XACK loop
   (4 consumers, the pipeline's batch of 16; the goal's baseline), the same
   with XREADGROUP COUNT 1 (one message per round trip), against the routing
   pipeline (4 workers: claim, triage is done at the door, thread, route,
   assign, ack, complete): messages/s per process;
4. K conversations stored, then a fresh daemon: its RSS after serving inbox
   pages, and what Redis holds.

Prints figures; asserts nothing. Everything runs on this machine's cores,
the generator included; see bench/README.md on reading the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # Run as a script, bench/ comes first on sys.path, and bench/email.py,
    # redis.py and telegram.py would shadow the packages of those names:
    # import from the repository root instead.
    sys.path[0] = str(REPO)

import argparse
import asyncio
import contextlib
import secrets
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import aiohttp
import redis.asyncio as aioredis

from bench.ingest import (
    EventWatch,
    Load,
    Server,
    admin_token,
    baseline_phase,
    build_requests,
    cancel_on_signals,
    child_env,
    closed_loop,
    connector,
    cpu_meter,
    describe,
    free_port,
    ms,
    paced,
    percentile,
    positive,
    rss_mib,
    spawn,
    stop,
    wait_drained,
    wait_ready,
    write_config,
)
from router import config as configuration
from router import triage
from router.acks import Templates
from router.conversations import start
from router.model import Message, utcnow
from router.pipeline import CLAIM_BATCH, Pipeline
from router.store.redis import RedisStore
from tests.conftest import customer_message as desk_message

WORKERS = 4
POPULATE_BATCH = 2000


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[int]:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


async def redis_ready(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                await client.ping()
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")
    finally:
        await client.aclose()


# -- 1, 2: daemons -------------------------------------------------------------


async def start_daemons(tmp: Path, url: str, secret: str, count: int) -> tuple[list[Server], str]:
    config = write_config(tmp, free_port(), secret)
    servers: list[Server] = []
    token = ""
    async with aiohttp.ClientSession() as http:
        for i in range(count):
            port = free_port()
            env = child_env(ROUTER_STORE_URL=url, ROUTER_LISTEN=f"127.0.0.1:{port}")
            server = spawn(f"router{count}-{i}", ["-m", "router", "run", "-c", str(config)], tmp, port, env)
            servers.append(server)
            await wait_ready(http, server)
            if i == 0:
                token = await admin_token(server)
    return servers, token


async def spread_closed_loop(urls: list[str], reqs: list, concurrency: int) -> Load:
    """`closed_loop` against several daemons at once, the requests split evenly."""
    async with aiohttp.ClientSession(connector=connector(concurrency)) as http:
        share = max(1, concurrency // len(urls))
        parts = await asyncio.gather(
            *(closed_loop(http, url, reqs[i :: len(urls)], share) for i, url in enumerate(urls))
        )
    load = Load(elapsed=max(part.elapsed for part in parts))
    for part in parts:
        load.latencies += part.latencies
        load.statuses.update(part.statuses)
        load.accepted += part.accepted
        load.errors += part.errors
        load.cut_short |= part.cut_short
    return load


async def scale_phase(
    tmp: Path, url: str, args: argparse.Namespace, count: int, label: str, floor: Load
) -> None:
    secret = secrets.token_urlsafe(24)
    servers, token = await start_daemons(tmp, url, secret, count)
    urls = [f"{server.base}/channels/web/inbound" for server in servers]
    watch = EventWatch()
    try:
        async with aiohttp.ClientSession() as http:
            await watch.connect(http, f"{servers[0].base}/api/v1/events", token)
            warm = build_requests(f"{label}-warm", 300, secret, seed=1)
            await spread_closed_loop(urls, warm, args.concurrency)
            await wait_drained(http, servers[0].base)
            timed = build_requests(f"{label}-load", args.messages, secret, seed=2)
            with cpu_meter(servers[0].proc.pid) as cores:
                load = await spread_closed_loop(urls, timed, args.concurrency)
            load.cores = cores
            drained = await wait_drained(http, servers[0].base)
            visible = await paced_phase(http, servers, args, secret, label, watch)
        rss = [rss_mib(server.proc.pid)[0] for server in servers]
    finally:
        await watch.stop()
        for server in servers:
            stop(server)
    print(f"\n[{count}] {count} daemon process(es) on one Redis, requests alternating between them")
    print(f"  {describe(load)}")
    print(f"  (CPU: 'server' is the first daemon only); ours/floor: {load.rate() / floor.rate():.2f}")
    handled = "not drained" if drained is None else f"pipeline drained {drained:.2f} s after the last 202"
    print(f"  {handled}")
    print(f"  {visible}")
    print(f"  daemon RSS after the run: {', '.join(f'{value:.1f} MiB' for value in rss)}")


async def paced_phase(
    http: aiohttp.ClientSession,
    servers: list[Server],
    args: argparse.Namespace,
    secret: str,
    label: str,
    watch: EventWatch,
) -> str:
    reqs = build_requests(f"{label}-vis", max(1, int(args.rate * args.seconds)), secret, seed=3)
    started: dict[str, float] = {}
    urls = [f"{server.base}/channels/web/inbound" for server in servers]
    async with aiohttp.ClientSession(connector=connector(64)) as client:
        rate = args.rate / len(urls)
        await asyncio.gather(
            *(paced(client, url, reqs[i :: len(urls)], rate, started) for i, url in enumerate(urls))
        )
    await wait_drained(http, servers[0].base)
    ids = [req.external_id for req in reqs]
    await watch.wait_for(ids, 5.0)
    delays = [watch.arrived[i] - started[i] for i in ids if i in watch.arrived and i in started]
    missing = sum(1 for i in ids if i not in watch.arrived)
    return (
        f"paced {args.rate:g} msg/s for {args.seconds:g} s: POST start -> SSE message.created on the "
        f"first daemon: p50 {ms(percentile(delays, 50))}, p99 {ms(percentile(delays, 99))}, "
        f"max {ms(max(delays, default=float('nan')))}; no event: {missing}"
    )


# -- 3: the pipeline against raw streams ---------------------------------------


async def raw_loop(url: str, count: int, batch: int = CLAIM_BATCH) -> tuple[float, float]:
    """(XADD msg/s, pipelined as the store's enqueues are; XREADGROUP COUNT
    `batch` + XACK msg/s with WORKERS consumers). With the pipeline's claim
    batch this is the floor of what the streams cost; with `batch=1` it is a
    consumer that takes and acknowledges one message per round trip."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    stream, group = f"bench-raw-{uuid.uuid4().hex[:6]}", "g"
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    began = time.perf_counter()
    for first in range(0, count, 500):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(count, first + 500)):
            pipe.xadd(stream, {"m": f"m_{i}"})
        await pipe.execute()
    added = time.perf_counter() - began

    async def consume(name: str) -> None:
        while found := await client.xreadgroup(group, name, {stream: ">"}, count=batch):
            await client.xack(stream, group, *[entry_id for entry_id, _ in found[0][1]])

    began = time.perf_counter()
    await asyncio.gather(*(consume(f"c{i}") for i in range(WORKERS)))
    consumed = time.perf_counter() - began
    await client.delete(stream)
    await client.aclose()
    return count / added, count / consumed


def customer_message(number: int) -> Message:
    sender = f"cust-{number % 500:04d}"
    return desk_message("What are the withdrawal fees for USDT on the TRC20 network?", sender)


async def pipeline_loop(url: str, config_path: Path, count: int) -> tuple[float, float]:
    """(enqueue_inbound msg/s, pipeline msg/s) with WORKERS workers."""
    config = configuration.load(str(config_path))
    store = RedisStore(url)
    await store.open()
    pipeline = Pipeline(store, config, triage.load_rules([]), Templates(None))
    messages = [customer_message(i) for i in range(count)]
    began = time.perf_counter()
    await asyncio.gather(*(pipeline.accept(message) for message in messages))
    accepted = time.perf_counter() - began
    stop_workers = asyncio.Event()
    began = time.perf_counter()
    workers = [asyncio.create_task(pipeline.run(f"bench/w{i}", stop_workers)) for i in range(WORKERS)]
    while await store.inbound_backlog() > 0:
        await asyncio.sleep(0.02)
    handled = time.perf_counter() - began
    stop_workers.set()
    await asyncio.gather(*workers)
    await store.close()
    return count / accepted, count / handled


async def pipeline_phase(tmp: Path, redis_url: str, args: argparse.Namespace) -> None:
    config = write_config(tmp, free_port(), "bench-secret-0123456789")
    raw_add, raw_consume = await raw_loop(redis_url, args.messages)
    _, raw_single = await raw_loop(redis_url, args.messages, batch=1)
    store_url = f"{redis_url}?prefix=bench-pipe-{uuid.uuid4().hex[:6]}"
    accept, handled = await pipeline_loop(store_url, config, args.messages)
    print(f"\n[3] in this one process, {args.messages} messages, {WORKERS} consumers / workers")
    print(f"  raw: XADD {raw_add:.0f} msg/s; XREADGROUP (batch {CLAIM_BATCH}) + XACK {raw_consume:.0f} msg/s")
    print(f"  raw, one message per round trip: XREADGROUP COUNT 1 + XACK {raw_single:.0f} msg/s")
    print(f"  store: enqueue_inbound (triage, dedupe, XADD) {accept:.0f} msg/s")
    print(
        f"  pipeline (claim, thread, route, assign, ack, complete) {handled:.0f} msg/s = "
        f"{handled / raw_consume:.0%} of the raw consume loop (goal >= 30%), "
        f"{handled / raw_single:.0%} of the one-at-a-time one"
    )


# -- 4: RSS with many conversations stored --------------------------------------


async def populate(url: str, config_path: Path, count: int) -> float:
    """`count` conversations, one message each, threaded and off the queue; seconds taken."""
    store = RedisStore(url)
    await store.open()
    sla = configuration.load(str(config_path)).settings.sla
    began = time.perf_counter()
    for first in range(0, count, POPULATE_BATCH):
        batch = [customer_message(i) for i in range(first, min(count, first + POPULATE_BATCH))]
        for message in batch:
            message.thread_key = message.sender.id = f"pop-{message.external_id}"
        await asyncio.gather(*(store.enqueue_inbound(message) for message in batch))
        now = utcnow()
        new = [start(message, message.sender.id, "support", now, sla) for message in batch]
        await asyncio.gather(*map(store.thread_message, batch, new))
        await store.complete_inbound([message.id for message in batch])
    took = time.perf_counter() - began
    await store.close()
    return took


async def rss_phase(tmp: Path, redis_url: str, args: argparse.Namespace) -> None:
    url = f"{redis_url}?prefix=bench-rss-{uuid.uuid4().hex[:6]}"
    took = await populate(url, write_config(tmp, free_port(), "unused-secret-0123456789"), args.conversations)
    secret = secrets.token_urlsafe(24)
    servers, token = await start_daemons(tmp, url, secret, 1)
    [server] = servers
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            began = time.perf_counter()
            cursor, pages = "", 0
            while pages < 20:
                query = {"status": "all", "limit": "500"} | ({"cursor": cursor} if cursor else {})
                async with http.get(f"{server.base}/api/v1/conversations", params=query) as resp:
                    page = await resp.json()
                pages += 1
                if not (cursor := page.get("next_cursor") or ""):
                    break
            paging = (time.perf_counter() - began) / pages
        rss, peak = rss_mib(server.proc.pid)
    finally:
        stop(server)
    client = aioredis.Redis.from_url(redis_url)
    used = (await client.info("memory"))["used_memory"] / 2**20
    await client.aclose()
    print(f"\n[4] {args.conversations} conversations stored ({took:.0f} s to write them through the store)")
    print(f"  a fresh daemon after serving {pages} inbox pages of 500 ({ms(paging)} a page):")
    print(f"  RSS {rss:.1f} MiB (peak {peak:.1f} MiB; goal < 150 MB)")
    print(f"  Redis used_memory {used:.0f} MiB (all phases' data)")


async def main_async(args: argparse.Namespace) -> None:
    cancel_on_signals()
    print("support-router Redis store benchmark")
    with tempfile.TemporaryDirectory(prefix="router-bench-redis-") as name:
        tmp = Path(name)
        with redis_server(tmp) as port:
            redis_url = f"redis://127.0.0.1:{port}/0"
            await redis_ready(redis_url)
            floor = await baseline_phase(tmp, args, secrets.token_urlsafe(24), triaged=True)
            print("  (the goal is >= 3,000 msg/s into the inbox with one daemon)")
            for count in (1, 2):
                url = f"{redis_url}?prefix=bench-scale{count}"
                await scale_phase(tmp, url, args, count, f"s{count}", floor)
            await pipeline_phase(tmp, redis_url, args)
            await rss_phase(tmp, redis_url, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=positive(int), default=3000, help="timed messages per phase")
    parser.add_argument("--rate", type=positive(float), default=200.0, help="paced phase, msg/s")
    parser.add_argument("--seconds", type=positive(float), default=10.0, help="paced phase length")
    parser.add_argument("--concurrency", type=positive(int), default=48, help="in-flight requests")
    parser.add_argument("--conversations", type=positive(int), default=100_000, help="stored for the RSS")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(main_async(parse_args(argv)))
    except asyncio.CancelledError:
        sys.exit("interrupted; servers stopped, temp dir removed")


if __name__ == "__main__":
    main()
