"""HTTP edge cases found by hunting: each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.conftest import redirecting

OK = {"id": "msg-1", "from": {"id": "user-1", "name": "Ann"}, "text": "hello"}


async def raw_exchange(router, request: bytes) -> tuple[int, bytes]:
    """One request written byte for byte (aiohttp's client refuses the odd
    headers customers' proxies still send), and the status and body back."""
    host, port = router.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [
        pytest.param("now", "sha256=\u00e9", id="non-ascii-signature"),
        pytest.param("\u00b2", "sha256=0", id="superscript-digit-timestamp"),
        pytest.param("9" * 5000, "sha256=0", id="five-thousand-digit-timestamp"),
    ],
)
async def test_malformed_signature_headers_are_401_not_500(start_daemon, timestamp, signature) -> None:
    router = await start_daemon()
    body = json.dumps(OK).encode()
    stamp = str(int(time.time())) if timestamp == "now" else timestamp
    request = (
        "POST /channels/web/inbound HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Router-Timestamp: {stamp}\r\nX-Router-Signature: {signature}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    status, answer = await raw_exchange(router, request)
    assert status == 401, answer
    assert json.loads(answer)["error"]["code"] in ("bad_signature", "stale_timestamp")


@pytest.mark.parametrize(
    "credential",
    [
        pytest.param("Cookie: router_session=e30.\u00e9".encode(), id="non-ascii-cookie-mac"),
        pytest.param(b"Cookie: router_session=\xff.abc", id="non-utf8-cookie"),
        pytest.param(b"Authorization: Bearer srt_\xff", id="non-utf8-token"),
        pytest.param(b"Authorization: Bearer srt_\xed\xa0\x80", id="surrogate-token"),
    ],
)
async def test_garbled_credentials_are_401_not_500(start_daemon, credential: bytes) -> None:
    router = await start_daemon()
    request = (
        b"GET /api/v1/conversations HTTP/1.1\r\nHost: x\r\n" + credential + b"\r\nConnection: close\r\n\r\n"
    )
    status, answer = await raw_exchange(router, request)
    assert status == 401, answer
    async with router.http.post(f"{router.base}/session", json={"token": "srt_\ud800"}) as resp:
        assert resp.status == 401, await resp.text()


async def test_non_ascii_csrf_header_is_403_not_500(start_daemon) -> None:
    router = await start_daemon()

    async with router.http.post(f"{router.base}/session", json={"token": router.token}) as resp:
        assert resp.status == 200
        cookie = resp.cookies["router_session"].value
    request = (
        "POST /api/v1/conversations/T-000001/status HTTP/1.1\r\nHost: x\r\n"
        f"Cookie: router_session={cookie}\r\nX-CSRF-Token: \u00e9\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    ).encode()
    status, answer = await raw_exchange(router, request)
    assert status == 403, answer
    assert json.loads(answer)["error"]["code"] == "csrf_failed"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param("limit=" + "9" * 5000, 200, id="huge-limit-is-clamped"),
        pytest.param("limit=%C2%B2", 400, id="superscript-limit"),
    ],
)
async def test_odd_inbox_limits_are_clamped_or_400_not_500(start_daemon, query: str, status: int) -> None:
    router = await start_daemon()
    got, answer = await router.api("GET", f"/api/v1/conversations?{query}")
    assert got == status, answer


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param("limit=" + "9" * 5000, 200, id="huge-limit-is-clamped"),
        pytest.param("limit=%C2%B2", 400, id="superscript-limit"),
        pytest.param("after=%C2%B2", 400, id="superscript-cursor"),
        pytest.param("after=" + "9" * 5000, 400, id="huge-cursor"),
        pytest.param("after=" + "9" * 20, 400, id="cursor-beyond-64-bits"),
    ],
)
async def test_odd_pull_queries_are_clamped_or_400_not_500(start_daemon, query: str, status: int) -> None:
    from tests.conftest import signed_headers

    router = await start_daemon()
    target = f"/channels/web/outbound?{query}"
    async with router.http.get(router.base + target, headers=signed_headers(target.encode())) as resp:
        assert resp.status == status, await resp.text()


async def test_redirecting_reply_url_is_not_taken_for_a_delivery(start_daemon, receiver) -> None:
    """A POST answered 302 was followed as a GET, without the body: the ack
    was marked sent though the customer's app never got it."""
    async with redirecting(receiver.url) as url:
        router = await start_daemon(reply_url=url)
        await router.post_message(OK)
        await router.settle()
        _, inbox = await router.api("GET", "/api/v1/conversations")
        ref = inbox["conversations"][0]["ref"]
        delivery: dict = {}
        for _ in range(100):
            _, conversation = await router.api("GET", f"/api/v1/conversations/{ref}")
            delivery = next(m for m in conversation["messages"] if m["kind"] == "ack")["delivery"]
            if delivery["status"] != "queued":
                break
            await asyncio.sleep(0.05)
        assert receiver.received == []
        assert delivery["status"] == "failed", delivery
        assert "302" in delivery["error"]


async def test_event_stream_ends_for_a_rotated_token_even_on_a_busy_desk(start_daemon, monkeypatch) -> None:
    """The token was checked again only after a quiet heartbeat interval, so
    while events kept coming a rotated or removed agent kept reading them."""
    from router import agents
    from router.model import Event
    from router.web import api

    monkeypatch.setattr(api, "HEARTBEAT_S", 0.3)
    router = await start_daemon()
    store = router.daemon.store
    token = await agents.create(store, "bob", ["support"])
    headers = {"Authorization": f"Bearer {token}"}
    async with router.http.get(f"{router.base}/api/v1/events", headers=headers) as stream:
        assert stream.status == 200

        async def read_to_end() -> None:
            async for _ in stream.content:
                pass

        reading = asyncio.create_task(read_to_end())
        await agents.rotate(store, "bob")
        try:
            async with asyncio.timeout(3):
                while not reading.done():
                    await store.publish(Event("conversation.updated", {"id": "c_busy"}))
                    await asyncio.sleep(0.05)
        finally:
            reading.cancel()


async def test_unknown_channel_names_do_not_grow_the_metrics(start_daemon) -> None:
    """Every name anyone POSTed to became a metrics series of its own: an
    unauthenticated client could grow /metrics (and memory) without bound."""
    router = await start_daemon()
    body = json.dumps(OK).encode()
    names = [f"probe-{time.monotonic_ns()}-{i}" for i in range(3)]
    for name in names:
        for route in ("inbound", "telegram"):
            async with router.http.post(f"{router.base}/channels/{name}/{route}", data=body) as resp:
                assert resp.status == 404
    async with router.http.get(f"{router.base}/metrics") as resp:
        text = await resp.text()
    assert not [name for name in names if name in text]
    assert 'router_ingress_rejected_total{channel="unknown",code="unknown_channel"}' in text


async def test_forged_inbox_cursor_with_a_huge_number_is_400_not_500(start_daemon) -> None:
    import base64

    router = await start_daemon()
    for key in ([10**30, 0, 0, "c_x"], [0, -(10**30), 0, "c_x"]):
        cursor = base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")
        status, answer = await router.api("GET", f"/api/v1/conversations?cursor={cursor}")
        assert (status, answer["error"]["code"]) == (400, "invalid_query"), key


async def test_a_stalled_event_stream_does_not_buffer_every_event(start_daemon) -> None:
    """The store keeps at most 1,000 events for a subscriber that falls
    behind, but the stream moved each into a queue of its own without bound:
    a client that stopped reading (a laptop gone to sleep) made the daemon
    hold every event of a busy desk until the connection died."""
    import socket

    from router.model import Event

    router = await start_daemon()
    host, port = router.base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    writer.write(
        f"GET /api/v1/events HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {router.token}\r\n\r\n".encode()
    )
    assert b" 200 " in await reader.readuntil(b": connected\n\n")
    published = 4000
    for i in range(published):  # the stream's reader stalls meanwhile
        await router.daemon.store.publish(
            Event("conversation.updated", {"id": f"c_{i}", "pad": "x" * 10_000})
        )
        await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    received = 0
    try:
        while True:
            received += (await asyncio.wait_for(reader.readuntil(b"\n\n"), 2)).startswith(b"event: ")
    except TimeoutError:
        pass
    finally:
        writer.close()
    assert 0 < received < published * 0.6
