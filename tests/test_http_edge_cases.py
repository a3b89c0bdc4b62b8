"""HTTP edge cases found by hunting: each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

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
