"""First meaningful paint of the web inbox with many open conversations.

    python bench/inbox_paint.py [--conversations 1000] [--runs 5] [--screenshots docs]

In one run, on loopback only:

1. `python -m router run` on SQLite in a temp dir, a webhook channel `web`
   pushing to a local receiver (acks and replies get `sent`), three agents;
2. N conversations from N customers through the signed webhook (a realistic
   mix of urgencies, a few with subjects), waited for until all are in the
   inbox and every ack is delivered, so the daemon is idle while measuring;
3. Debian's Chromium (headless, via Playwright) signs in once, then loads the
   page `--runs` times and reads, per load, from navigation start: the
   `inbox-painted` mark the page sets on the first frame that shows rows
   (first meaningful paint), and the time until all N conversations are
   loaded and listed (the list shows only the rows in view).

Prints the figures (median and worst); asserts nothing. With --screenshots,
also writes inbox.png and conversation.png (a critical conversation with an
ack, a sent reply and a failed one) into that directory.
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
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import Page, async_playwright

from channels.webhook import sign
from tests.conftest import write_config as desk_config

HOST = "127.0.0.1"
SECRET = "bench-inbox-secret-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
JS_BYTES = (REPO / "router/web/static/app.js").stat().st_size
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
NAMES = [
    "Ann Keller", "Bo Svensson", "Chen Wei", "Dmitri Orlov", "Esra Yilmaz", "Fatima Rahman",
    "Gustavo Lima", "Hana Sato", "Ivan Petrov", "Jun Park", "Kofi Mensah", "Lena Fischer",
]  # fmt: skip
COINS = ["USDT", "BTC", "ETH", "SOL", "USDC"]
TEXTS = {
    "critical": [
        "Someone withdrew {amount} {coin} from my account, I did not do it! Please freeze it now",
        "I got an email that my password was changed but it wasn't me. I can't log in anymore",
        "There is a login from a device I don't recognize and an order {order} I never placed",
    ],
    "high": [
        "My {coin} withdrawal {order} failed but the funds were deducted from my balance",
        "I sent {coin} on the wrong network, {amount} {coin} is missing",
        "Deposit of {amount} {coin} not credited after 6 hours, tx {order}",
    ],
    "normal": [
        "How do I reset my 2FA? I changed phones",
        "Why is the withdrawal fee for {coin} so high today?",
        "My verification has been stuck for 3 days, ticket {order}",
        "The app keeps logging me out on Android, very annoying",
    ],
    "low": [
        "What are your trading hours for {coin} futures?",
        "Feature request: dark mode in the mobile app please",
        "Is staking {coin} available in Portugal?",
        "Thanks for the quick help last week!",
    ],
}
MIX = [("critical", 0.005), ("high", 0.12), ("normal", 0.38), ("low", 0.495)]
SUBJECTS = ["Account problem", "Question about fees", "Withdrawal", "Deposit missing", "Login issue"]
DEMO = {"conversation": "demo", "from": {"id": "demo", "name": "Mara Jensen"}}
DEMO_TEXT = (
    "Hi, someone just withdrew 2.4 BTC from my account to an address I don't know.\n"
    "I did not make this withdrawal. Please freeze my account now!"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Receiver:
    """The customer's app behind reply_url. The second agent reply of the demo
    conversation is refused (422), so the screenshot shows a failed delivery."""

    def __init__(self) -> None:
        self.count = 0
        self.demo_replies = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.count += 1
        if body.get("conversation") == "demo" and body.get("kind") == "agent":
            self.demo_replies += 1
            if self.demo_replies == 2:
                return web.Response(status=422, text="recipient blocked the app")
        return web.Response(status=200)


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver, port: int) -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_post("/replies", receiver.handle)
    app.router.add_get("/replies", lambda r: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield
    finally:
        await runner.cleanup()


def write_config(directory: Path, reply_url: str) -> Path:
    """The tests' desk, without the per-sender ack cap: the bench's customers write a lot."""
    return desk_config(directory, reply_url, "[acks]\nmax_per_sender_per_hour = 1000\n", SECRET)


def cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "router", *args, "-c", str(config)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def payloads(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    built = []
    for i in range(count):
        urgency = rng.choices([u for u, _ in MIX], [w for _, w in MIX])[0]
        text = rng.choice(TEXTS[urgency]).format(
            coin=rng.choice(COINS), amount=rng.randint(10, 50_000), order=rng.randint(10**7, 10**8)
        )
        sender = {"id": f"cust-{i:05d}", "name": NAMES[i % len(NAMES)]}
        item: dict[str, Any] = {"id": f"b-{i}", "from": sender, "text": text}
        if rng.random() < 0.25:
            item["subject"] = rng.choice(SUBJECTS)
        built.append(item)
    return built


async def post(http: aiohttp.ClientSession, base: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Router-Timestamp": stamp,
        "X-Router-Signature": sign(SECRET, stamp, body),
    }
    async with http.post(f"{base}/channels/web/inbound", data=body, headers=headers) as resp:
        if resp.status not in (200, 202):
            raise RuntimeError(f"ingress answered {resp.status}: {await resp.text()}")


async def seed(http: aiohttp.ClientSession, base: str, token: str, count: int) -> None:
    """The demo conversation first (it tops the inbox), then the bulk; wait until all are listed."""
    await post(http, base, {**DEMO, "id": "demo-1", "subject": "Unauthorized withdrawal", "text": DEMO_TEXT})
    queue = payloads(count - 1, seed=7)
    sem = asyncio.Semaphore(32)

    async def one(item: dict[str, Any]) -> None:
        async with sem:
            await post(http, base, item)

    await asyncio.gather(*(one(item) for item in queue))
    deadline = time.monotonic() + 120
    while await listed(http, base, token) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the inbox did not fill up within 2 minutes")
        await asyncio.sleep(0.5)


async def listed(http: aiohttp.ClientSession, base: str, token: str) -> int:
    total, cursor = 0, ""
    while True:
        url = f"{base}/api/v1/conversations?limit=500&cursor={cursor}"
        async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            page = await resp.json()
        total += len(page["conversations"])
        if not (cursor := page["next_cursor"]):
            return total


async def demo_thread(http: aiohttp.ClientSession, base: str, token: str, receiver: Receiver) -> None:
    """A reply that is sent, a follow-up from the customer, a reply that fails."""
    auth = {"Authorization": f"Bearer {token}"}
    ref = "T-000001"
    replies = [
        "Hi Mara, I have frozen your account and blocked withdrawals. Please don't share any codes with "
        "anyone; I'm checking the withdrawal with our security team now.",
        "Thanks Mara. The address belongs to a known phishing cluster; we have opened a case and will "
        "update you within the hour.",
    ]
    await http.post(f"{base}/api/v1/conversations/{ref}/messages", json={"text": replies[0]}, headers=auth)
    await asyncio.sleep(0.5)
    follow_up = "Thank you. I also got an SMS with a login code I never asked for an hour ago."
    await post(http, base, {**DEMO, "id": "demo-2", "text": follow_up})
    await asyncio.sleep(0.5)
    await http.post(f"{base}/api/v1/conversations/{ref}/messages", json={"text": replies[1]}, headers=auth)
    deadline = time.monotonic() + 20
    while receiver.demo_replies < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


async def wait_quiet(receiver: Receiver, expected: int) -> None:
    """Acks go out after ingest; measure only once the outbox is idle."""
    deadline = time.monotonic() + 120
    last, still = -1, 0
    while time.monotonic() < deadline and (receiver.count < expected or still < 4):
        await asyncio.sleep(0.25)
        still = still + 1 if receiver.count == last else 0
        last = receiver.count


PAINT_JS = """() => new Promise((resolve) => {
  const done = () => {
    const mark = performance.getEntriesByName('inbox-painted')[0];
    const row = document.querySelector('#list > li');
    const rows = row ? Number(row.getAttribute('aria-setsize')) : 0;
    if (!mark) return setTimeout(done, 20);
    resolve({painted: mark.startTime, rows});
  };
  done();
})"""
ALL_ROWS_JS = """(n) => new Promise((resolve) => {
  const listed = () => Number(document.querySelector('#list > li')?.getAttribute('aria-setsize') || 0);
  const check = () => listed() >= n ? resolve(performance.now()) : setTimeout(check, 10);
  check();
})"""


async def measure(page: Page, base: str, count: int, runs: int) -> list[dict[str, float]]:
    results = []
    for _ in range(runs):
        await page.goto(f"{base}/")
        figures = await page.evaluate(PAINT_JS)
        figures["all_rows"] = await page.evaluate(ALL_ROWS_JS, count)
        results.append(figures)
    return results


def summary(name: str, values: list[float]) -> str:
    return f"{name}: median {statistics.median(values):.0f} ms, worst {max(values):.0f} ms"


def run(args: argparse.Namespace) -> None:
    """Set up in a temp dir, start the daemon, drive it; always stop it."""
    with tempfile.TemporaryDirectory(prefix="inbox-paint-") as tmp:
        directory = Path(tmp)
        receiver_port, port = free_port(), free_port()
        config = write_config(directory, f"http://{HOST}:{receiver_port}/replies")
        cli(config, "agents", "add", "ann", "--team", "support")
        cli(config, "agents", "add", "bo", "--team", "support")
        cli(config, "agents", "add", "sam", "--team", "security")
        token = re.findall(r"srt_\S+", cli(config, "agents", "token", "ann"))[0]
        env = {**os.environ, "ROUTER_LISTEN": f"{HOST}:{port}", "PYTHONPATH": str(REPO)}
        log = directory / "daemon.log"
        with log.open("w") as err:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "router", "run", "-c", str(config)],
                cwd=directory,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            asyncio.run(drive(f"http://{HOST}:{port}", token, receiver_port, daemon, args))
        except DaemonDown:
            sys.exit(f"the daemon did not get ready:\n{log.read_text()}")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()


class DaemonDown(Exception):
    pass


async def drive(
    base: str, token: str, receiver_port: int, daemon: subprocess.Popen[bytes], args: argparse.Namespace
) -> None:
    receiver = Receiver()
    async with receiving(receiver, receiver_port), aiohttp.ClientSession() as http:
        await ready(http, base, daemon)
        began = time.perf_counter()
        await seed(http, base, token, args.conversations)
        await demo_thread(http, base, token, receiver)
        await wait_quiet(receiver, args.conversations)
        print(f"seeded {args.conversations} open conversations in {time.perf_counter() - began:.1f} s")
    await browse(base, token, args)


async def ready(http: aiohttp.ClientSession, base: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.poll() is None:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise DaemonDown


async def browse(base: str, token: str, args: argparse.Namespace) -> None:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
        signed = await context.request.post(f"{base}/session", data={"token": token})
        if not signed.ok:
            raise RuntimeError(f"sign-in failed: {signed.status}")
        page = await context.new_page()
        results = await measure(page, base, args.conversations, args.runs)
        print(f"Chromium {browser.version}, {args.runs} loads of the page")
        print(f"conversations listed in the first frame with rows: {results[-1]['rows']}")
        print(summary("first meaningful paint (first frame with rows)", [r["painted"] for r in results]))
        loaded = [r["all_rows"] for r in results]
        print(summary(f"all {args.conversations} conversations loaded and listed", loaded))
        print(f"page JavaScript: {JS_BYTES} bytes unminified")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (busy cores slow it)")
        if args.screenshots:
            await screenshots(page, base, args.screenshots)
        await browser.close()


async def screenshots(page: Page, base: str, out: Path) -> None:
    """The inbox just as a new critical conversation arrives, then the demo thread."""
    await page.goto(f"{base}/")
    await page.wait_for_selector("#list > li")
    await page.keyboard.press("j")
    async with aiohttp.ClientSession() as http:
        text = "Hi, I got a 2FA reset email I never asked for and now I can't log in. Is my account hacked?"
        await post(http, base, {"id": "live-1", "from": {"id": "live", "name": "Priya Nair"}, "text": text})
    await page.wait_for_selector("#alert:not([hidden])")
    await page.screenshot(path=str(out / "inbox.png"))
    await page.click("#list > li >> nth=0")
    await page.wait_for_selector(".msg.k-agent .d-failed")
    await page.screenshot(path=str(out / "conversation.png"))
    print(f"screenshots: {out / 'inbox.png'}, {out / 'conversation.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--screenshots", metavar="DIR", type=Path, help="write inbox.png and conversation.png here"
    )
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: install the Debian package `chromium`")
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
