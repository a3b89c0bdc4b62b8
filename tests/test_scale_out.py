"""Several daemons on one Redis (SPEC 6 promises 1, 2, 6), as real processes.

Daemons (tests/scale_daemon.py: `support-router run` plus a polling test
channel) share one redis-server; webhook messages are spread over them the
way a load balancer would, and a client re-sends whatever got no 2xx to the
next daemon. What users see is checked through the agent API: every accepted
message in the inbox exactly once, every conversation exactly one ack (one
delivery id: a delivery sent again keeps its id, so the receiver drops the
copy). Claims and leases are shortened so a kill -9 is recovered in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from router.store.redis import RedisStore
from tests.conftest import Receiver, signed_headers, write_config
from tests.services import RedisServer, free_port
from tests.test_daemon_process import wait_ready

REPO = Path(__file__).resolve().parents[1]
VISIBILITY_S = 3.0
LEASE_TTL_S = 2.0
CUSTOMERS = 200
IN_FLIGHT = 24
CRITICAL = "someone withdrew all my USDT, I did not do it"


@dataclass
class Node:
    port: int
    cwd: Path
    proc: subprocess.Popen[str]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Desk:
    """Daemons sharing one Redis, one config and one customer receiver."""

    redis: RedisServer
    root: Path
    receiver: Receiver
    url: str
    nodes: list[Node] = field(default_factory=list)
    token: str = ""

    @property
    def polls(self) -> Path:
        return self.root / "polls.log"

    async def start(self, count: int, extra: str = "") -> None:
        """The first alone (it creates the admin agent), the others together."""
        extra += f'\n[[channels]]\nname = "poller"\ntype = "recording"\nlog = "{self.polls}"\n'
        config = write_config(self.root, self.receiver.url, extra)
        for batch in ([0], list(range(1, count))):
            started = [self._spawn(config, len(self.nodes) + i) for i in range(len(batch))]
            self.nodes += started
            await asyncio.gather(*(wait_ready(node.port, node.proc, within_s=60) for node in started))
        out = (self.nodes[0].cwd / "daemon.out").read_text()
        self.token = out.split("(shown once): ")[1].split()[0]

    def _spawn(self, config: Path, index: int) -> Node:
        cwd = self.root / f"node{index}"
        cwd.mkdir()
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "ROUTER_LISTEN": f"127.0.0.1:{port}",
            "ROUTER_STORE_URL": self.url,
            "ROUTER_TEST_VISIBILITY_S": str(VISIBILITY_S),
            "ROUTER_TEST_LEASE_TTL_S": str(LEASE_TTL_S),
        }
        env.pop("ROUTER_CONFIG", None)
        with (cwd / "daemon.out").open("w") as out, (cwd / "daemon.err").open("w") as err:
            command = [sys.executable, "-m", "tests.scale_daemon", "run", "-c", str(config)]
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        return Node(port, cwd, proc)

    def ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.alive]

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.proc.wait(timeout=20)


@pytest.fixture
async def desk(
    redis_server: Callable[[], RedisServer], tmp_path: Path, receiver: Receiver
) -> AsyncIterator[Desk]:
    server = redis_server()
    made = Desk(server, tmp_path, receiver, server.url(f"scale-{uuid.uuid4().hex[:8]}"))
    yield made
    made.stop()


async def send(desk: Desk, ids: list[str], accepted: set[str], within_s: float = 120) -> None:
    """POST each message to the live daemons in turn, IN_FLIGHT at a time;
    what got no 2xx (its daemon died, Redis was away) is sent again."""
    deadline = time.monotonic() + within_s
    turn = 0
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def post(port: int, message_id: str) -> bool:
            number = int(message_id.rsplit("-", 1)[1])
            text = CRITICAL if number % 25 == 0 else f"what is the fee for withdrawal {message_id}?"
            payload = {"id": message_id, "from": {"id": f"cust-{number % CUSTOMERS}"}, "text": text}
            body = json.dumps(payload).encode()
            url = f"http://127.0.0.1:{port}/channels/web/inbound"
            try:
                async with http.post(url, data=body, headers=signed_headers(body)) as resp:
                    return resp.status in (200, 202)
            except (aiohttp.ClientError, TimeoutError):
                return False

        pending = list(ids)
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} messages never accepted"
            retry: list[str] = []
            for start in range(0, len(pending), IN_FLIGHT):
                chunk = pending[start : start + IN_FLIGHT]
                ports = desk.ports()
                answers = await asyncio.gather(
                    *(post(ports[(turn + k) % len(ports)], i) for k, i in enumerate(chunk))
                )
                turn += len(chunk)
                for message_id, ok in zip(chunk, answers, strict=True):
                    (accepted.add if ok else retry.append)(message_id)
            pending = retry
            if pending:
                await asyncio.sleep(0.3)


async def when(accepted: set[str], count: int) -> None:
    while len(accepted) < count:
        await asyncio.sleep(0.01)


async def assert_each_once_and_one_ack(desk: Desk, accepted: set[str], within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    store = RedisStore(desk.url)
    await store.open()
    try:
        while (backlog := await store.inbound_backlog()) > 0:
            assert time.monotonic() < deadline, f"{backlog} messages never handled"
            await asyncio.sleep(0.2)
    finally:
        await store.close()
    inbox = await inbox_messages(desk)
    seen = [external_id for ids in inbox.values() for external_id in ids]
    assert len(seen) == len(set(seen)), "a message shows twice"
    assert accepted <= set(seen), f"lost: {sorted(accepted - set(seen))[:5]}"
    receiver = desk.receiver
    while {r["conversation_ref"] for r in receiver.delivered(kind="ack")} != set(inbox):
        assert time.monotonic() < deadline, "some conversations got no ack"
        receiver.arrived.clear()
        await asyncio.wait({asyncio.ensure_future(receiver.arrived.wait())}, timeout=0.5)
    deliveries: dict[str, set[str]] = defaultdict(set)
    for ack in receiver.delivered(kind="ack"):
        deliveries[ack["conversation_ref"]].add(ack["id"])
    assert {ref: len(ids) for ref, ids in deliveries.items()} == dict.fromkeys(inbox, 1)


async def inbox_messages(desk: Desk) -> dict[str, list[str]]:
    """Conversation ref -> external ids of its inbound messages, through the
    API of any live daemon (they all serve the same inbox)."""
    base = f"http://127.0.0.1:{desk.ports()[0]}/api/v1"
    headers = {"Authorization": f"Bearer {desk.token}"}
    refs: list[str] = []
    async with aiohttp.ClientSession(headers=headers) as http:
        cursor = ""
        while True:
            query = "status=all&limit=500" + (f"&cursor={cursor}" if cursor else "")
            async with http.get(f"{base}/conversations?{query}") as resp:
                page = await resp.json()
            refs += [c["ref"] for c in page["conversations"]]
            if not (cursor := page["next_cursor"] or ""):
                break
        gate = asyncio.Semaphore(8)

        async def messages(ref: str) -> list[str]:
            async with gate, http.get(f"{base}/conversations/{ref}") as resp:
                body = await resp.json()
            assert resp.status == 200, f"GET {ref}: HTTP {resp.status} {body}"
            return [m["external_id"] for m in body["messages"] if m["direction"] == "in"]

        found = await asyncio.gather(*(messages(ref) for ref in refs))
    return dict(zip(refs, found, strict=True))


def poll_runs(path: Path) -> list[tuple[int, int, float, float]]:
    """(pid, fencing token, first poll, last poll) of each uninterrupted run of polls."""
    runs: list[tuple[int, int, float, float]] = []
    for line in path.read_text().splitlines():
        pid, token, at = int(line.split()[0]), int(line.split()[1]), float(line.split()[2])
        if runs and runs[-1][:2] == (pid, token):
            runs[-1] = (pid, token, runs[-1][2], at)
        else:
            runs.append((pid, token, at, at))
    return runs


async def test_three_daemons_share_3000_messages(desk: Desk) -> None:
    await desk.start(3)
    ids = [f"s-{i}" for i in range(3000)]
    accepted: set[str] = set()
    await send(desk, ids, accepted)
    assert accepted == set(ids)
    await assert_each_once_and_one_ack(desk, accepted)
    runs = poll_runs(desk.polls)
    assert len({pid for pid, *_ in runs}) == 1, f"the poller ran in several processes: {runs}"


async def test_kill_9_of_the_lease_holder_mid_stream(desk: Desk) -> None:
    """Its claimed messages are finished by the others, its poller taken
    over within the lease time, and never two pollers at once."""
    await desk.start(3)
    ids = [f"k-{i}" for i in range(900)]
    accepted: set[str] = set()
    sending = asyncio.create_task(send(desk, ids, accepted))
    await when(accepted, 300)
    holder = poll_runs(desk.polls)[-1][0]
    [victim] = [node for node in desk.nodes if node.proc.pid == holder]
    victim.proc.kill()
    killed_at = time.time()
    victim.proc.wait()
    await sending
    await assert_each_once_and_one_ack(desk, accepted)
    # The messages may all be done before the lease runs out: give the
    # takeover the time it is allowed, then look.
    takeover_by = killed_at + LEASE_TTL_S * 1.1 + 1.0
    while time.time() < takeover_by and not [r for r in poll_runs(desk.polls) if r[2] > killed_at]:
        await asyncio.sleep(0.1)
    runs = poll_runs(desk.polls)
    tokens = [token for _, token, _, _ in runs]
    assert tokens == sorted(set(tokens)), f"a poller ran twice or tokens did not grow: {runs}"
    assert all(last <= killed_at for pid, _, _, last in runs if pid == holder)
    after = [run for run in runs if run[2] > killed_at]
    assert after, "nobody polled after the holder was killed"
    successor, _, took_over, _ = after[0]
    assert successor != holder
    assert took_over - killed_at < LEASE_TTL_S * 1.1 + 1.0, "the lease was not taken over in time"


async def test_redis_restart_mid_stream_loses_nothing_acknowledged(desk: Desk) -> None:
    await desk.start(2)
    ids = [f"r-{i}" for i in range(600)]
    accepted: set[str] = set()
    sending = asyncio.create_task(send(desk, ids, accepted))
    await when(accepted, 200)
    desk.redis.kill()
    async with aiohttp.ClientSession() as http:
        for port in desk.ports():
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 503
        await asyncio.sleep(1.0)
        desk.redis.start()
        for node in desk.nodes:
            await wait_ready(node.port, node.proc, within_s=30)
    await sending
    assert accepted == set(ids)
    await assert_each_once_and_one_ack(desk, accepted)


async def test_one_sign_in_serves_every_daemon_with_a_shared_session_secret(desk: Desk) -> None:
    """Behind a load balancer an agent's requests reach any daemon: the
    session cookie one daemon issued must be good at the others."""
    await desk.start(2, '[server]\nsession_secret = "shared-by-every-daemon-0123"\n')
    first, second = (f"http://127.0.0.1:{port}" for port in desk.ports())
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{first}/session", json={"token": desk.token}) as resp,
    ):
        assert resp.status == 200
        cookie = resp.cookies["router_session"].value
        csrf = (await resp.json())["csrf"]
    async with aiohttp.ClientSession(cookies={"router_session": cookie}) as http:
        async with http.get(f"{second}/session") as resp:
            assert resp.status == 200
            assert (await resp.json())["agent"]["name"] == "admin"
        presence = {"presence": "away"}
        async with http.post(f"{second}/api/v1/agents/admin/presence", json=presence) as resp:
            assert resp.status == 403, "a state change without the CSRF token must be refused"
        headers = {"X-CSRF-Token": csrf}
        async with http.post(
            f"{second}/api/v1/agents/admin/presence", json=presence, headers=headers
        ) as resp:
            assert resp.status == 200
