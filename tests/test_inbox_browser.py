"""The web inbox as agents use it, in real headless Chromium (Debian's
`chromium`, driven by Playwright): sign-in, a critical message arriving live,
reply, close, customer text that tries to run script, sign-out, revoked
tokens, a daemon restart.

One browser serves the whole module (launching it costs more than a test),
so the tests and their daemons share the module's event loop; each test gets
a fresh daemon and a fresh browser context (its own cookies)."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from router import agents
from router import config as configuration
from router.daemon import Daemon
from router.model import Direction, Event, Kind, Message, Party, new_id, utcnow
from router.web import api, inbox
from tests.conftest import Receiver, Running, free_socket, receiving, write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
CRITICAL = "Someone withdrew all my USDT, I did not do it! Please freeze my account"
ENDED = "session has ended"
# Installed before any page script: records CSP violations, which would mean
# something got as far as trying to run.
WATCH = """window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI);
});"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.is_file():  # noqa: ASYNC240 - once per module, before anything runs
        pytest.fail(
            f"{CHROMIUM} is missing: install the Debian package `chromium` (apt-get install chromium); "
            "these tests drive the system Chromium, `playwright install` is not used",
            pytrace=False,
        )
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    """conftest's reply_url receiver, run in this module's loop."""
    async with receiving() as rec:
        yield rec


@pytest_asyncio.fixture(loop_scope="module")
async def router(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    receiver: Receiver,
) -> AsyncIterator[Running]:
    """A daemon pushing to `receiver`; its event stream re-checks the agent
    every 0.3 s instead of 15, so a revoked session ends within a second."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api, "HEARTBEAT_S", 0.3)
    config = configuration.load(str(write_config(tmp_path, receiver.url)))
    daemon = Daemon(config)
    sock = free_socket()
    await daemon.start(sock)
    token = re.search(r"srt_\S+", capsys.readouterr().out)
    assert token, "the daemon printed no admin token"
    running = Running(daemon, f"http://127.0.0.1:{sock.getsockname()[1]}", aiohttp.ClientSession(), token[0])
    yield running
    await running.http.close()
    await running.daemon.stop()


@dataclass
class Tab:
    """A page in its own browser context, and everything it must never do."""

    context: BrowserContext
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def assert_harmless(self) -> None:
        assert self.dialogs == [], f"customer content opened dialogs: {self.dialogs}"
        assert self.errors == [], f"the page threw: {self.errors}"
        assert await self.page.evaluate("window.__pwned") is None, "customer content ran script"
        assert await self.page.evaluate("window.__csp") == [], "something tried to run against the CSP"


@pytest_asyncio.fixture(loop_scope="module")
async def tab(browser: Browser) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    await context.add_init_script(WATCH)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    opened = Tab(context, page)

    async def on_dialog(dialog: Any) -> None:
        opened.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: opened.errors.append(str(exc)))
    yield opened
    await context.close()


async def sign_in(tab: Tab, router: Running, token: str | None = None) -> None:
    page = tab.page
    await page.goto(f"{router.base}/")
    await page.fill("#token", token or router.token)
    await page.click("#signin-form button[type=submit]")
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.locator("#live")).to_have_class(re.compile(r"\bon\b"))


def row(page: Page, ref: str) -> Any:
    return page.locator("#list > li", has=page.locator(".ref", has_text=ref))


async def test_an_agent_signs_in_sees_a_critical_live_answers_and_closes_it(
    router: Running, receiver: Receiver, tab: Tab
) -> None:
    page = tab.page
    await router.post_message({"id": "n-1", "from": {"id": "u-1", "name": "Bo"}, "text": "fees?"})
    await router.settle()
    response = await page.goto(f"{router.base}/")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    await sign_in(tab, router)
    [cookie] = await tab.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (inbox.COOKIE, True, "Strict")
    assert await page.evaluate("document.cookie") == ""
    await expect(page.locator("#list > li")).to_have_count(1)
    _, listed = await router.api("GET", "/api/v1/conversations")
    [waiting] = listed["conversations"]
    store = router.daemon.store
    late = await store.update_conversation(waiting["id"], first_response_due=utcnow() - timedelta(minutes=5))
    await store.publish(Event("conversation.updated", late.to_dict()))
    await expect(row(page, waiting["ref"]).locator(".sla")).to_have_text("overdue 5m")
    await expect(row(page, waiting["ref"]).locator(".sla")).to_have_class(re.compile(r"\boverdue\b"))

    await router.post_message({"id": "c-1", "from": {"id": "u-2", "name": "Ann"}, "text": CRITICAL})
    alert = page.locator("#alert")
    await expect(alert).to_be_visible()
    await expect(alert).to_contain_text("New critical conversation")
    top = page.locator("#list > li").first
    await expect(top).to_contain_text("Ann")
    await expect(top.locator(".badge")).to_have_text("CRITICAL")
    await expect(page.locator("button[data-dim=urgency][data-value=critical] .fcount")).to_have_text("1")
    await expect(page.locator("button[data-dim=status][data-value=open] .fcount")).to_have_text("2")
    ref = (await top.locator(".ref").text_content()) or ""

    await page.keyboard.press("j")
    await page.keyboard.press("Enter")
    await expect(page.locator("#chead")).to_contain_text(ref)
    await expect(page.locator("#chead .reason")).to_contain_text("Why critical")
    await expect(page.locator(".msg.k-customer .text")).to_have_text(CRITICAL)
    await expect(page.locator(".msg.k-ack .dlv")).to_have_attribute("data-status", "sent")
    await expect(alert).to_be_hidden()

    await page.keyboard.press("r")
    await expect(page.locator("#reply")).to_be_focused()
    await page.keyboard.type("We froze your account and are looking into it.")
    await page.keyboard.press("Control+Enter")
    reply = page.locator(".msg.k-agent").last
    await expect(reply.locator(".dlv")).to_have_attribute("data-status", "sent")
    [delivered] = await receiver.wait_for(1, kind="agent")
    assert delivered["text"] == "We froze your account and are looking into it."
    assert delivered["conversation_ref"] == ref

    receiver.statuses.append(422)
    await page.fill("#reply", "A second reply the app refuses once.")
    await page.click("#send")
    refused = page.locator(".msg.k-agent").last
    await expect(refused.locator(".dlv")).to_have_attribute("data-status", "failed")
    await expect(refused.locator(".dlv")).to_contain_text("422")
    await refused.locator("button.retry").click()
    await expect(refused.locator(".dlv")).to_have_attribute("data-status", "sent")

    await page.select_option("#assignee", "")
    await expect(row(page, ref).locator(".asg")).to_have_text("unassigned")
    await page.click("#assign-me")
    await expect(row(page, ref).locator(".asg")).to_have_text("admin")
    await page.select_option("#urgency", "high")
    await expect(page.locator("#chead .reason")).to_contain_text("set to high by admin")
    await expect(row(page, ref).locator(".badge")).to_have_text("HIGH")

    await page.keyboard.press("Escape")
    await page.keyboard.press("?")
    await expect(page.locator("#help")).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(page.locator("#help")).to_be_hidden()
    await page.keyboard.press("e")
    await expect(row(page, ref)).to_have_count(0)
    await expect(page.locator("button[data-dim=status][data-value=open] .fcount")).to_have_text("1")
    _, closed = await router.api("GET", f"/api/v1/conversations/{ref}")
    assert closed["status"] == "closed"
    await page.click("button[data-dim=status][data-value=closed]")
    await expect(row(page, ref)).to_have_count(1)
    await tab.assert_harmless()


XSS = [
    "<script>window.__pwned = 1; alert('script')</script>",
    "<img src=x onerror=\"window.__pwned=1;alert('img')\">",
    "<svg onload=\"window.__pwned=1;alert('svg')\"></svg>",
    "<svg><script>window.__pwned=1</script></svg>",
    "<a href=\"javascript:window.__pwned=1;alert('link')\">click me</a>",
    "<a href=\"jav&#x09;ascript:alert('tab')\">tab link</a>",
    "<a href=\"data:text/html,<script>alert('data')</script>\">data link</a>",
    "<iframe src=\"javascript:alert('iframe')\"></iframe>",
    '<iframe srcdoc="<script>parent.__pwned=1</script>"></iframe>',
    '<body onload="window.__pwned=1">',
    "<details open ontoggle=\"window.__pwned=1;alert('toggle')\">x</details>",
    "<input autofocus onfocus=\"window.__pwned=1;alert('focus')\">",
    '<video><source onerror="window.__pwned=1"></video>',
    "<style>body { display: none !important }</style>",
    '<div style="position:fixed;inset:0;z-index:9999;background:red">overlay</div>',
    "<div style=\"background:url(javascript:alert('css'))\">css url</div>",
    '<link rel=stylesheet href="http://127.0.0.1:9/evil.css">',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'meta\')">',
    "<form action=\"javascript:alert('form')\"><button>go</button></form>",
    "<object data=\"javascript:alert('object')\"></object>",
    "<embed src=\"javascript:alert('embed')\">",
    "<base href=\"javascript:alert('base')//\">",
    '<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned=1">',
    '<noscript><p title="</noscript><img src=x onerror=window.__pwned=1>">',
    '"><script>window.__pwned=1</script>',
    "</textarea><script>window.__pwned=1</script>",
    "{{constructor.constructor('window.__pwned=1')()}}",
    "<template><script>window.__pwned=1</script></template>",
]


async def test_customer_text_and_html_never_run(router: Running, tab: Tab) -> None:
    """Every payload arrives as the text, the subject, the sender's name and
    the HTML of one message, through the pipeline's channel sink (the path an
    email takes); the page shows them all and runs none."""
    for i, payload in enumerate(XSS):
        await router.daemon.pipeline.accept(
            Message(
                id=new_id("m"),
                channel="web",
                channel_type="webhook",
                direction=Direction.IN,
                kind=Kind.CUSTOMER,
                external_id=f"xss-{i}",
                sender=Party(id=f"x-{i}", name=payload[:200]),
                text=payload,
                subject=payload,
                html=f"<p>payload {i}:</p>{payload}",
                received_at=utcnow(),
                thread_key=f"x-{i}",
            )
        )
    await router.settle()
    _, listed = await router.api("GET", "/api/v1/conversations?limit=500")
    refs = [c["ref"] for c in listed["conversations"]]
    assert len(refs) == len(XSS) >= 20
    for ref in refs:
        _, served = await router.api("GET", f"/api/v1/conversations/{ref}")
        html = served["messages"][0]["html"].lower()
        assert not re.search(r"<(script|style|iframe|img|svg|object|embed|form|meta|link|base)\b", html), html
        assert not re.search(r"<[^>]*\son\w+\s*=", html), html
        assert not re.search(r"=\s*[\"']?\s*(javascript|data):", html), html

    page = tab.page
    await sign_in(tab, router)
    await expect(page.locator("#listcount")).to_have_text(f"{len(XSS)} conversations")
    for ref in refs:
        await page.evaluate("ref => { location.hash = '#/c/' + ref; }", ref)
        await expect(page.locator("#chead .ref")).to_have_text(ref)
        message = page.locator(".msg.k-customer")
        await message.locator(".fmt .link").click()
        await expect(message.locator(".html")).to_be_visible()
        text = await message.locator(".text").text_content()
        assert text in XSS, "customer text must show exactly as written"
        assert await page.locator("#chead h2").text_content() == text
    dangerous = await page.evaluate(
        """() => {
        const found = [];
        for (const el of document.querySelectorAll('#app *')) {
          if (/^(SCRIPT|STYLE|IFRAME|OBJECT|EMBED|META|BASE|LINK)$/.test(el.tagName)) found.push(el.tagName);
          if (el.tagName === 'FORM' && !el.matches('.composer')) found.push(el.tagName);
          for (const attr of el.attributes) {
            if (/^on/i.test(attr.name) || /^\\s*(javascript|data):/i.test(attr.value)) found.push(attr.name);
          }
        }
        return found;
      }"""
    )
    assert dangerous == [], f"dangerous markup reached the page: {dangerous}"
    await expect(page.locator("#app")).to_be_visible()
    await tab.assert_harmless()


FETCH_STATUS = """([method, path, headers]) => fetch(path, {
  method, headers: {...headers, 'Content-Type': 'application/json'},
  body: method === 'POST' ? JSON.stringify({status: 'closed'}) : null,
}).then((r) => r.status)"""


async def test_sign_out_csrf_and_revoked_tokens(
    router: Running, tab: Tab, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tab.page
    await sign_in(tab, router)
    for method, path in [("POST", "/api/v1/conversations/T-000001/status"), ("DELETE", "/session")]:
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            status = await page.evaluate(FETCH_STATUS, [method, path, headers])
            assert status == 403, (method, path, headers)

    await page.click("#signout")
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#signin-error")).to_have_text("Signed out.")
    assert await tab.context.cookies() == []
    assert (await page.request.get(f"{router.base}/session")).status == 401
    await page.fill("#token", "srt_not-a-token")
    await page.click("#signin-form button[type=submit]")
    await expect(page.locator("#signin-error")).to_contain_text("not valid")

    store = router.daemon.store
    await sign_in(tab, router, await agents.create(store, "bob", ["support"]))
    await store.remove_agent("bob")
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#signin-error")).to_contain_text(ENDED)

    await sign_in(tab, router, await agents.create(store, "carol", ["support"]))
    await agents.rotate(store, "carol")
    await expect(page.locator("#signin-error")).to_contain_text(ENDED)

    monkeypatch.setattr(inbox, "SESSION_S", 2)
    await sign_in(tab, router)
    await expect(page.locator("#signin-error")).to_contain_text(ENDED, timeout=8_000)
    await tab.assert_harmless()


async def test_the_closed_view_survives_a_reload(router: Running, tab: Tab) -> None:
    """The page remembers its filters across reloads; the Closed view it
    comes back to lists the closed conversations, not "Inbox zero"."""
    await router.post_message({"id": "n-1", "from": {"id": "u-1", "name": "Bo"}, "text": "fees?"})
    await router.settle()
    _, listed = await router.api("GET", "/api/v1/conversations")
    [done] = listed["conversations"]
    await router.api("POST", f"/api/v1/conversations/{done['ref']}/status", {"status": "closed"})
    page = tab.page
    await sign_in(tab, router)
    await page.click("button[data-dim=status][data-value=closed]")
    await expect(row(page, done["ref"])).to_have_count(1)

    await page.reload()
    await expect(page.locator("#live")).to_have_class(re.compile(r"\bon\b"))
    await expect(page.locator("#listtitle")).to_have_text("All · closed")
    await expect(row(page, done["ref"])).to_have_count(1)
    await expect(page.locator("button[data-dim=status][data-value=closed] .fcount")).to_have_text("1")
    await expect(page.locator("#empty")).to_be_hidden()
    await tab.assert_harmless()


async def test_the_page_reconnects_after_the_daemon_restarts(router: Running, tab: Tab) -> None:
    page = tab.page
    await sign_in(tab, router)
    port = int(router.base.rsplit(":", 1)[1])
    config = router.daemon.config
    await router.daemon.stop()
    await expect(page.locator("#live-text")).to_have_text("Reconnecting…")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    router.daemon = Daemon(config)
    await router.daemon.start(sock)
    await expect(page.locator("#live-text")).to_have_text("Live", timeout=10_000)
    await router.post_message({"id": "c-after", "from": {"id": "u-9", "name": "Cy"}, "text": CRITICAL})
    await expect(page.locator("#list > li").first).to_contain_text("Cy")
    await expect(page.locator("#alert")).to_be_visible()
    await expect(page.locator("#signin")).to_be_hidden()
    await tab.assert_harmless()
