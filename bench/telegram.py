"""Telegram ingest benchmark: updates/s from the Bot API emulator to the inbox.

    python bench/telegram.py [--updates 3000] [--users 300]

Loopback only; the emulator (tests/botapi.py) runs in this process, each
consumer in its own process:

1. raw: a bare loop calls getUpdates (offset, limit 100) against the
   emulator with aiohttp and discards what it gets: what the emulator and
   HTTP allow at best;
2. polling: `python -m router run` (SQLite in a temp dir, one `tg` channel in
   polling mode on the emulator), long-polling when the updates appear: the
   time until the offset passes the last one (every update durably queued)
   and until the pipeline has handled them all (the inbox);
3. webhook: the same daemon in webhook mode; the emulator POSTs every update
   over 40 connections (Telegram's default): the time until every POST was
   answered 200, and until the inbox has them.

Prints updates/s and `ratio ours/raw`; asserts nothing about timings. Each
phase also prints the daemon's CPU (one core = 1.00): on a busy machine,
compare runs rather than single figures.
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
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

import aiohttp

from tests.botapi import TOKEN, BotAPI

PHASE_TIMEOUT_S = 180.0
TEXTS = [
    "What are the withdrawal fees for USDT on the TRC20 network? order {n}",
    "My BTC deposit from yesterday still shows pending, tx {n}. How long does it take?",
    "How do I change the email address on my account?",
    "someone logged in and withdrew all my ETH, I did not do it! order {n}",
    "我的充值还没到账，订单号{n}",
]


def preload(api: BotAPI, updates: int, users: int, seed: int) -> int:
    """Queue `updates` messages from `users` customers; returns the last update id."""
    rng = random.Random(seed)
    people = [api.user(10_000 + i, f"Customer {i}", language_code="en") for i in range(users)]
    for n in range(updates):
        api.say(people[n % users], rng.choice(TEXTS).format(n=n))
    return max(api.pending)


async def until(check: Callable[[], bool], what: str, child: subprocess.Popen[bytes]) -> float:
    """Seconds until `check()` is true (polled every 5 ms), while `child` runs."""
    began = time.monotonic()
    while not check():
        if child.poll() is not None:
            raise SystemExit(f"the child process exited ({child.returncode}) before {what}")
        if time.monotonic() - began > PHASE_TIMEOUT_S:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - began


def start(argv: list[str], env: dict[str, str], cwd: Path | None) -> subprocess.Popen[bytes]:
    """A child process; a daemon's log goes to daemon.err in its directory."""
    if cwd is None:
        return subprocess.Popen(argv, env=env)
    with (cwd / "daemon.err").open("w") as err:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 1. the raw loop ---------------------------------------------------------


async def raw_loop(url: str, expect: int) -> None:
    """Run in a child process: getUpdates until `expect` updates came, discard them."""
    token = os.environ["BENCH_TOKEN"]
    got, offset = 0, 0
    async with aiohttp.ClientSession() as http:
        while got < expect:
            body = {"offset": offset, "limit": 100, "timeout": 10}
            async with http.post(f"{url}/bot{token}/getUpdates", json=body) as resp:
                updates = (await resp.json())["result"]
            if updates:
                offset, got = updates[-1]["update_id"] + 1, got + len(updates)
        async with http.post(f"{url}/bot{token}/getUpdates", json={"offset": offset}) as resp:
            await resp.read()


async def raw_phase(count: int, users: int) -> float:
    api = await BotAPI().start()
    try:
        last = preload(api, count, users, seed=1)
        env = {**os.environ, "BENCH_TOKEN": TOKEN}
        child = start([sys.executable, __file__, "--raw-loop", api.url, str(count)], env, None)
        await until(lambda: api.calls["getupdates"] > 0, "the raw loop's first call", child)
        took = await until(lambda: api.confirmed > last, "the raw loop", child)
        child.wait(timeout=10)
    finally:
        await api.stop()
    rate = count / took
    print(f"[1] raw getUpdates loop: {count} updates in {took:.2f} s = {rate:,.0f} updates/s")
    return rate


# -- 2./3. the daemon --------------------------------------------------------


def write_config(directory: Path, port: int, api: BotAPI, mode: str) -> Path:
    path = directory / "router.toml"
    path.write_text(
        f"""
[store]
url = "sqlite:///{directory}/router.db"

[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"

[[channels]]
name = "tg"
type = "telegram"
token = "{TOKEN}"
mode = "{mode}"
api_url = "{api.url}"

[[teams]]
name = "support"

[[routes]]
match = {{}}
team = "support"
"""
    )
    return path


async def backlog(http: aiohttp.ClientSession, port: int) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    line = next(line for line in text.splitlines() if line.startswith("router_inbound_backlog "))
    return float(line.split()[1])


async def daemon_phase(mode: str, count: int, users: int, raw_rate: float) -> None:
    api = await BotAPI().start()
    with tempfile.TemporaryDirectory(prefix="bench-telegram-") as tmp:
        directory = Path(tmp)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = write_config(directory, port, api, mode)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        daemon = start([sys.executable, "-m", "router", "run", "-c", str(config)], env, directory)
        try:
            async with aiohttp.ClientSession() as http:
                if mode == "polling":
                    await until(lambda: api.calls["getupdates"] > 0, "the daemon's long poll", daemon)
                else:
                    await until(lambda: api.webhook is not None, "setWebhook", daemon)
                await asyncio.sleep(0.5)
                cpu_before = cpu_seconds(daemon.pid)
                began = time.monotonic()
                last = preload(api, count, users, seed=2)
                if mode == "polling":
                    await until(lambda: api.confirmed > last, "the offset to pass the last update", daemon)
                else:
                    await until(lambda: not api.pending, "every webhook POST answered", daemon)
                queued = time.monotonic() - began
                while await backlog(http, port) > 0:
                    await asyncio.sleep(0.02)
                inbox = time.monotonic() - began
                cores = (cpu_seconds(daemon.pid) - cpu_before) / inbox
        except SystemExit:
            print((directory / "daemon.err").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)
            await api.stop()
    number = "2" if mode == "polling" else "3"
    queued_rate, inbox_rate = count / queued, count / inbox
    print(
        f"[{number}] {mode}: {count} updates durably queued in {queued:.2f} s = {queued_rate:,.0f} updates/s"
        f" (ratio ours/raw {queued_rate / raw_rate:.2f}); in the inbox after {inbox:.2f} s"
        f" = {inbox_rate:,.0f} updates/s (ratio {inbox_rate / raw_rate:.2f}); daemon CPU {cores:.2f} cores"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--raw-loop", nargs=2, metavar=("URL", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_loop:
        await raw_loop(args.raw_loop[0], int(args.raw_loop[1]))
        return
    print(f"{args.updates} updates from {args.users} users; machine load {os.getloadavg()[0]:.2f}")
    raw_rate = await raw_phase(args.updates, args.users)
    await daemon_phase("polling", args.updates, args.users, raw_rate)
    await daemon_phase("webhook", args.updates, args.users, raw_rate)


if __name__ == "__main__":
    asyncio.run(main())
