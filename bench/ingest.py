"""Ingest benchmark: webhook throughput and time-to-inbox of support-router.

    python bench/ingest.py [--messages N] [--rate R] [--seconds S] [--concurrency C]

In one run, on free loopback ports (127.0.0.1 only):

1. baseline: bench/bare_handler.py in its own process (HMAC check, 202);
   then the same with `--triage`, the floor: the router's own parse and
   triage of each message, nothing stored;
2. support-router: `python -m router run -c <tmp>/router.toml` with SQLite in
   a temp dir and a pull-mode webhook channel `web` (no outbound HTTP);
3. throughput: the same closed-loop generator (aiohttp, keep-alive, C
   requests in flight) against each: msg/s and p50/p99 latency to the 202;
4. time to inbox at a paced R msg/s for S s: POST start -> the
   `message.created` SSE event for that message on GET /api/v1/events;
   then a cross-check through the agent API that every accepted message
   is in the inbox ("lost: 0");
5. the daemon's RSS after the run.

Prints figures; asserts nothing about timings. Bodies are built and signed
before any timing starts. The generator shares the machine with the servers.
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
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from channels.webhook import sign
from tests.conftest import write_config as desk_config

HOST = "127.0.0.1"
CUSTOMERS = 500
SECURITY_SHARE = 0.15
WARMUP = 500
MAX_PHASE_S = 90.0
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
EVENT_GRACE_S = 5.0
STOP_TIMEOUT_S = 15.0
GENERATOR_SATURATED = 0.9

COINS = ["USDT", "BTC", "ETH", "SOL", "USDC", "TRX"]
NAMES = ["Ann", "Bo", "Chen Wei", "Dmitri", "Esra", "Fatima", "Gustavo", "Hana", "Ivan", "Jun"]
ROUTINE = [
    "Hi, my {coin} deposit from yesterday still shows pending, tx order {order}. How long does it take?",
    "What are the withdrawal fees for {coin} on the TRC20 network?",
    "How do I change the email address on my account?",
    "Can you explain why my limit order {order} for {amount} {coin} only partially filled?",
    "I want to close my account, what do I need to do?",
    "Where can I download last year's trade history for my taxes?",
    "The app keeps logging me out on Android, is there an update coming?",
    "Is staking {coin} available in my country? I live in Portugal.",
    "My KYC verification has been under review for 3 days, can you check? Ticket {order}.",
    "Thanks for the quick help last week, everything works now.",
    "请问{coin}提现手续费是多少？",
    "我的充值{amount} {coin}还没到账，订单号{order}",
]
SECURITY = [
    "Someone withdrew {amount} {coin} from my account, I did not do it! Please freeze it now",
    "I got an email that my password was changed but it wasnt me. I cant log in anymore",
    "There is a login from a device I dont recognize, and an order {order} I never placed",
    "my account was hacked, all my {coin} is gone",
    "I shared my seed phrase with someone claiming to be support and now {amount} {coin} was transferred out",
    "我的账号被盗了，有人把我的{coin}全部提走了，请马上冻结账户！",
]


# -- workload --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Req:
    external_id: str
    body: bytes
    headers: dict[str, str]


def message_text(rng: random.Random) -> str:
    templates = SECURITY if rng.random() < SECURITY_SHARE else ROUTINE
    return rng.choice(templates).format(
        coin=rng.choice(COINS), amount=rng.randint(10, 50_000), order=rng.randint(10**7, 10**8)
    )


def build_requests(prefix: str, count: int, secret: str, seed: int) -> list[Req]:
    """Distinct ids, ~500 customers, signed now (valid for 5 minutes)."""
    rng = random.Random(seed)
    stamp = str(int(time.time()))
    built = []
    for i in range(count):
        customer = rng.randrange(CUSTOMERS)
        external_id = f"{prefix}-{i}"
        payload = {
            "id": external_id,
            "from": {"id": f"cust-{customer:04d}", "name": NAMES[customer % len(NAMES)]},
            "text": message_text(rng),
        }
        body = json.dumps(payload, ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Router-Timestamp": stamp,
            "X-Router-Signature": sign(secret, stamp, body),
        }
        built.append(Req(external_id, body, headers))
    return built


# -- CPU accounting ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Cores:
    """Average cores busy during a block: the server, this process, the rest."""

    server: float = float("nan")
    client: float = float("nan")
    other: float = float("nan")

    def __str__(self) -> str:
        return (
            f"server {self.server:.2f} cores, this generator process {self.client:.2f}, "
            f"rest of the machine {self.other:.2f}"
        )


@contextlib.contextmanager
def cpu_meter(pid: int) -> Iterator[Cores]:
    """Yields a Cores filled in once the block has run."""
    cores = Cores()
    server, client, machine = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
    began = time.perf_counter()
    yield cores
    wall = time.perf_counter() - began
    cores.server = (cpu_seconds(pid) - server) / wall
    cores.client = (time.process_time() - client) / wall
    cores.other = max(0.0, (machine_busy_seconds() - machine) / wall - cores.server - cores.client)


# -- load generation ---------------------------------------------------------


@dataclass
class Load:
    """What one load run saw."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    cut_short: bool = False
    cores: Cores = field(default_factory=Cores)

    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def server_cpu_per_answer(self) -> float:
        """Server CPU seconds per answer: unlike the rate, it does not
        depend on how much of the machine the generator left over."""
        return self.cores.server * self.elapsed / len(self.latencies) if self.latencies else float("nan")


async def post_one(
    http: aiohttp.ClientSession, url: str, req: Req, load: Load, started: dict[str, float] | None = None
) -> None:
    begin = time.perf_counter()
    if started is not None:
        started[req.external_id] = begin
    try:
        async with http.post(url, data=req.body, headers=req.headers) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError):
        load.errors += 1
        return
    load.latencies.append(time.perf_counter() - begin)
    load.statuses[status] += 1
    if status in (200, 202):
        load.accepted.append(req.external_id)


async def closed_loop(http: aiohttp.ClientSession, url: str, reqs: list[Req], concurrency: int) -> Load:
    """`concurrency` workers, each POSTing the next request as soon as its
    previous one was answered; stops early after MAX_PHASE_S."""
    load = Load()
    pending: Iterator[Req] = iter(reqs)
    deadline = time.perf_counter() + MAX_PHASE_S

    async def worker() -> None:
        for req in pending:
            if time.perf_counter() > deadline:
                load.cut_short = True
                return
            await post_one(http, url, req, load)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.elapsed = time.perf_counter() - began
    return load


async def paced(
    http: aiohttp.ClientSession, url: str, reqs: list[Req], rate: float, started: dict[str, float]
) -> Load:
    """Open loop: request i starts at t0 + i/rate whatever the answers do."""
    load = Load()
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    t0 = loop.time()
    for i, req in enumerate(reqs):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(post_one(http, url, req, load, started))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    sent_for = loop.time() - t0
    await asyncio.gather(*in_flight)
    load.elapsed = sent_for
    return load


# -- the SSE watcher ---------------------------------------------------------


class EventWatch:
    """Reads GET /api/v1/events and notes when each inbound message's
    `message.created` arrives, by its external id."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.connected = asyncio.Event()
        self.progress = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def connect(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        """Starts reading; returns once the server said `: connected`."""
        self.task = asyncio.create_task(self._read(http, url, token))
        waiter = asyncio.create_task(self.connected.wait())
        await asyncio.wait({self.task, waiter}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self.task.done():
            self.task.result()
        if not self.connected.is_set():
            raise RuntimeError(f"no SSE connection to {url} after {READY_TIMEOUT_S:.0f} s")

    async def _read(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(url, headers=headers, timeout=timeout) as resp:
            resp.raise_for_status()
            event = b""
            async for raw in resp.content:
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"event: "):
                    event = line[7:]
                elif line.startswith(b"data: ") and event == b"message.created":
                    self._note(line[6:], time.perf_counter())
                elif line.startswith(b": connected"):
                    self.connected.set()

    def _note(self, data: bytes, now: float) -> None:
        message = json.loads(data)
        if message.get("direction") == "in":
            self.arrived.setdefault(message["external_id"], now)
            self.progress.set()

    async def wait_for(self, ids: list[str], grace_s: float) -> None:
        """Until every id has arrived or `grace_s` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while any(i not in self.arrived for i in ids):
                    self.progress.clear()
                    await self.progress.wait()

    async def stop(self) -> None:
        """Cancels the reader; `asyncio.wait` lets our own cancellation through."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task})
            if not self.task.cancelled():
                self.task.exception()  # retrieved: a dropped stream shows as "no event" counts


# -- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def tail(self) -> str:
        lines = self.err.read_text(errors="replace").splitlines()
        return "\n".join(lines[-15:])


def spawn(name: str, args: list[str], cwd: Path, port: int, env: dict[str, str]) -> Server:
    out, err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL
        )
    return Server(name, proc, port, out, err)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def stop(server: Server) -> tuple[int, float]:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; (exit code, seconds)."""
    began = time.monotonic()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode, time.monotonic() - began


async def wait_ready(http: aiohttp.ClientSession, server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited {server.proc.returncode}:\n{server.tail()}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{server.base}/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready after {READY_TIMEOUT_S:.0f} s:\n{server.tail()}")


async def admin_token(server: Server) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in server.out.read_text(errors="replace").splitlines():
            if "(shown once): " in line and "admin" in line:
                return line.split("(shown once): ", 1)[1].split()[0]
        await asyncio.sleep(0.05)
    raise RuntimeError("the daemon printed no admin token")


def write_config(directory: Path, port: int, secret: str) -> Path:
    """The tests' desk (tests/conftest.py), in pull mode, on `port`."""
    return desk_config(directory, None, f'[server]\nlisten = "{HOST}:{port}"\n', secret)


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


# -- the daemon through its API --------------------------------------------


async def backlog(http: aiohttp.ClientSession, base: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^router_inbound_backlog (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


async def wait_drained(http: aiohttp.ClientSession, base: str) -> float | None:
    """Seconds until the inbound backlog is 0, or None on timeout."""
    began = time.perf_counter()
    while time.perf_counter() - began < DRAIN_TIMEOUT_S:
        if await backlog(http, base) == 0:
            return time.perf_counter() - began
        await asyncio.sleep(0.05)
    return None


async def get_json(
    http: aiohttp.ClientSession, url: str, token: str, params: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(url, params=params, headers={"Authorization": f"Bearer {token}"}) as resp:
        resp.raise_for_status()
        return await resp.json()


async def inbox_refs(http: aiohttp.ClientSession, base: str, token: str) -> list[str]:
    refs: list[str] = []
    cursor = ""
    for _ in range(10_000):
        query = {"status": "all", "limit": "500"} | ({"cursor": cursor} if cursor else {})
        page = await get_json(http, f"{base}/api/v1/conversations", token, query)
        refs += [c["ref"] for c in page["conversations"]]
        cursor = page.get("next_cursor") or ""
        if not cursor:
            break
    return refs


async def inbox_external_ids(http: aiohttp.ClientSession, base: str, token: str) -> tuple[list[str], int]:
    """Every inbound message's external id, over all conversations."""
    refs = await inbox_refs(http, base, token)
    gate = asyncio.Semaphore(8)
    seen: list[str] = []

    async def one(ref: str) -> None:
        async with gate:
            conversation = await get_json(http, f"{base}/api/v1/conversations/{ref}", token)
        seen.extend(m["external_id"] for m in conversation["messages"] if m["direction"] == "in")

    await asyncio.gather(*(one(ref) for ref in refs))
    return seen, len(refs)


# -- report ------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; `values` need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def describe(load: Load) -> str:
    """Two indented lines: answers and latency, then CPU use."""
    odd = {s: n for s, n in load.statuses.items() if s != 202}
    answers = (
        f"{len(load.latencies)} answered in {load.elapsed:.2f} s = {load.rate():.0f} msg/s; "
        f"to the 202: p50 {ms(percentile(load.latencies, 50))}, p99 {ms(percentile(load.latencies, 99))}; "
        f"non-202: {odd or 0}, transport errors: {load.errors}"
    )
    if load.cut_short:
        answers += "; CUT SHORT at the time cap"
    cpu = f"CPU meanwhile: {load.cores}; server CPU per answer {load.server_cpu_per_answer() * 1e6:.0f} µs"
    if load.cores.client > GENERATOR_SATURATED:
        cpu += " (generator saturated: the server could do more)"
    return f"{answers}\n  {cpu}"


def header(args: argparse.Namespace) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("support-router ingest benchmark")
    print(
        f"machine: nproc={os.cpu_count()}, load average before start {load}; the load generator, "
        "the SSE reader and the server under test share these cores over loopback, so every figure "
        "includes the generator's own CPU use"
    )
    print(
        f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}; {args.messages} messages "
        f"(+{WARMUP} warm-up) at {args.concurrency} in flight; "
        f"paced {args.rate:g} msg/s for {args.seconds:g} s"
    )


# -- the phases --------------------------------------------------------------


def connector(limit: int) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=limit, keepalive_timeout=60)


async def throughput(
    server: Server,
    args: argparse.Namespace,
    secret: str,
    prefix: str,
    settle: Callable[[], Awaitable[object]],
) -> tuple[Load, Load]:
    """(warm-up, timed) closed-loop runs against one server, `settle()`
    awaited in between so the timed run starts from an idle server."""
    warm = build_requests(f"{prefix}-warm", WARMUP, secret, seed=1)
    timed = build_requests(f"{prefix}-load", args.messages, secret, seed=2)
    url = f"{server.base}/channels/web/inbound"
    async with aiohttp.ClientSession(connector=connector(args.concurrency)) as http:
        warm_load = await closed_loop(http, url, warm, args.concurrency)
        await settle()
        with cpu_meter(server.proc.pid) as cores:
            load = await closed_loop(http, url, timed, args.concurrency)
    load.cores = cores
    return warm_load, load


async def idle() -> None:
    await asyncio.sleep(0.2)


async def baseline_phase(tmp: Path, args: argparse.Namespace, secret: str, triaged: bool) -> Load:
    port = free_port()
    name = "floor" if triaged else "bare"
    flags = ["--triage"] if triaged else []
    command = [str(REPO / "bench" / "bare_handler.py"), "--port", str(port), *flags]
    server = spawn(name, command, tmp, port, child_env(BENCH_SECRET=secret))
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, server)
        _, load = await throughput(server, args, secret, name, idle)
        rss, _ = rss_mib(server.proc.pid)
    finally:
        stop(server)
    if triaged:
        print("\n[1b] floor: the same plus the router's own parse and triage of each message; nothing stored")
    else:
        print("\n[1] baseline: bare aiohttp, HMAC check -> 202 (own process)")
    print(f"  {describe(load)}")
    print(f"  RSS {rss:.1f} MiB")
    return load


@dataclass
class RouterRun:
    server: Server
    token: str
    watch: EventWatch
    accepted: list[str] = field(default_factory=list)


async def router_throughput(
    run: RouterRun, args: argparse.Namespace, secret: str, bare: Load, floor: Load
) -> None:
    async with aiohttp.ClientSession() as http:
        warm, load = await throughput(
            run.server, args, secret, "thr", lambda: wait_drained(http, run.server.base)
        )
        run.accepted += warm.accepted + load.accepted
        last_answer = time.perf_counter()
        with cpu_meter(run.server.proc.pid) as draining:
            drained = await wait_drained(http, run.server.base)
        caught_up = time.perf_counter() - last_answer
    print("\n[2] support-router: python -m router run (SQLite in a temp dir, pull-mode webhook `web`)")
    print(f"  {describe(load)}")
    ratio = load.rate() / bare.rate() if bare.rate() else float("nan")
    print(f"  ratio ours/bare: {ratio:.2f} (goal >= 0.5); ours/floor: {load.rate() / floor.rate():.2f}")
    cost = bare.server_cpu_per_answer() / load.server_cpu_per_answer()
    print(f"  server CPU per answer, bare/ours: {cost:.2f} (the same ratio, free of the generator's share)")
    if drained is None:
        print(f"  pipeline NOT drained {DRAIN_TIMEOUT_S:.0f} s after the last 202")
    else:
        handled = load.elapsed + caught_up
        rate = len(load.accepted) / handled
        print(
            f"  pipeline (triage, thread, route, assign, ack) drained {caught_up:.2f} s after the last 202: "
            f"{len(load.accepted)} handled end to end in {handled:.2f} s = {rate:.0f} msg/s"
        )
        print(f"  CPU while only draining: {draining}")


async def visibility_phase(run: RouterRun, args: argparse.Namespace, secret: str) -> None:
    count = max(1, int(args.rate * args.seconds))
    reqs = build_requests("vis", count, secret, seed=3)
    started: dict[str, float] = {}
    url = f"{run.server.base}/channels/web/inbound"
    async with aiohttp.ClientSession(connector=connector(64)) as http:
        with cpu_meter(run.server.proc.pid) as cores:
            load = await paced(http, url, reqs, args.rate, started)
        left = await backlog(http, run.server.base)
        await wait_drained(http, run.server.base)
    load.cores = cores
    run.accepted += load.accepted
    await run.watch.wait_for(load.accepted, EVENT_GRACE_S)
    delays = [run.watch.arrived[i] - started[i] for i in load.accepted if i in run.watch.arrived]
    missing = sum(1 for i in load.accepted if i not in run.watch.arrived)
    print(f"\n[3] visible in the inbox, paced {args.rate:g} msg/s for {args.seconds:g} s")
    print(f"  sent {count} in {load.elapsed:.2f} s = {count / load.elapsed:.0f} msg/s offered")
    print(f"  {describe(load)}")
    print(f"  inbound backlog when the last POST was answered: {left:.0f}")
    print(
        f"  POST start -> SSE message.created: p50 {ms(percentile(delays, 50))}, "
        f"p99 {ms(percentile(delays, 99))}, max {ms(max(delays, default=float('nan')))} "
        f"(goal p99 < 50 ms); accepted but no event {EVENT_GRACE_S:.0f} s after the queue drained: {missing}"
    )


async def cross_check(run: RouterRun) -> None:
    async with aiohttp.ClientSession() as http:
        await wait_drained(http, run.server.base)
        seen, conversations = await inbox_external_ids(http, run.server.base, run.token)
    accepted = set(run.accepted)
    lost = len(accepted - set(seen))
    twice = len(seen) - len(set(seen))
    print("\n[4] cross-check through GET /api/v1/conversations?status=all (+ cursor) and each conversation")
    print(
        f"  accepted {len(accepted)}, inbound in the inbox {len(seen)} over {conversations} conversations; "
        f"lost: {lost}; shown twice: {twice}"
    )


async def router_phases(tmp: Path, args: argparse.Namespace, secret: str, bare: Load, floor: Load) -> None:
    port = free_port()
    config = write_config(tmp, port, secret)
    server = spawn("router", ["-m", "router", "run", "-c", str(config)], tmp, port, child_env())
    watch = EventWatch()
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, server)
            run = RouterRun(server, await admin_token(server), watch)
            await watch.connect(http, f"{server.base}/api/v1/events", run.token)
            await router_throughput(run, args, secret, bare, floor)
            await visibility_phase(run, args, secret)
            await cross_check(run)
            await watch.stop()
        rss, peak = rss_mib(server.proc.pid)
    finally:
        await watch.stop()
        code, took = stop(server)
    print(f"\n[5] daemon RSS after the run: {rss:.1f} MiB (peak {peak:.1f} MiB)")
    print(f"  SIGTERM -> exit {code} in {took:.2f} s")


def cancel_on_signals() -> None:
    """SIGINT/SIGTERM cancel the run, so every `finally` stops the servers
    and the temp dir goes (a background job may have SIGINT ignored)."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)


async def main_async(args: argparse.Namespace) -> None:
    cancel_on_signals()
    header(args)
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="router-bench-") as name:
        tmp = Path(name)
        bare = await baseline_phase(tmp, args, secret, triaged=False)
        floor = await baseline_phase(tmp, args, secret, triaged=True)
        reach = floor.rate() / bare.rate()
        print(f"  floor/bare: {reach:.2f} (the most a router that triages at the door can reach)")
        await router_phases(tmp, args, secret, bare, floor)


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=positive(int), default=5000, help="timed messages per server")
    parser.add_argument("--rate", type=positive(float), default=300.0, help="paced phase, msg/s")
    parser.add_argument("--seconds", type=positive(float), default=10.0, help="paced phase length")
    parser.add_argument("--concurrency", type=positive(int), default=48, help="in-flight requests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(main_async(parse_args(argv)))
    except asyncio.CancelledError:
        sys.exit("interrupted; servers stopped, temp dir removed")


if __name__ == "__main__":
    main()
