"""Every row of SPEC 5's webhook table, and the bad input users will send."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest

from tests.conftest import signed_headers

OK = {"id": "msg-1", "from": {"id": "user-1", "name": "Ann"}, "text": "hello"}


async def raw_post(router, body: bytes, headers: dict[str, str], channel: str = "web") -> tuple[int, dict]:
    data = io.BytesIO(body) if len(body) > 1024 * 1024 else body
    async with router.http.post(f"{router.base}/channels/{channel}/inbound", data=data, headers=headers) as r:
        return r.status, await r.json()


@pytest.fixture
async def router(start_daemon):
    return await start_daemon()


async def inbox_size(router) -> int:
    await router.settle()
    _, inbox = await router.api("GET", "/api/v1/conversations?status=all")
    return sum(c["message_count"] for c in inbox["conversations"])


async def test_accepted_then_same_id_again_is_200_with_same_ids(router) -> None:
    body = json.dumps(OK).encode()
    status, first = await raw_post(router, body, signed_headers(body))
    assert status == 202 and first["message_id"]
    await router.settle()
    status, again = await raw_post(router, body, signed_headers(body))
    assert status == 200
    assert again["message_id"] == first["message_id"]
    assert again["conversation_ref"].startswith("T-")
    assert await inbox_size(router) == 2  # the message and its ack, once


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda h: h.pop("X-Router-Signature"), id="missing-signature"),
        pytest.param(lambda h: h.pop("X-Router-Timestamp"), id="missing-timestamp"),
        pytest.param(lambda h: h.update({"X-Router-Signature": "sha256=" + "0" * 64}), id="wrong-signature"),
        pytest.param(lambda h: h.update({"X-Router-Signature": "md5=abc"}), id="garbage-signature"),
    ],
)
async def test_bad_or_missing_signature_is_401(router, mangle) -> None:
    body = json.dumps(OK).encode()
    headers = signed_headers(body)
    mangle(headers)
    status, answer = await raw_post(router, body, headers)
    assert status == 401 and answer["error"]["code"]
    assert await inbox_size(router) == 0


@pytest.mark.parametrize("skew", [-301, 301, -3600])
async def test_stale_or_future_timestamp_is_401(router, skew: int) -> None:
    body = json.dumps(OK).encode()
    status, answer = await raw_post(router, body, signed_headers(body, timestamp=int(time.time()) + skew))
    assert status == 401 and answer["error"]["code"] == "stale_timestamp"


async def test_replayed_signature_on_another_body_is_401(router) -> None:
    body = json.dumps(OK).encode()
    headers = signed_headers(body)
    assert (await raw_post(router, body, headers))[0] == 202
    forged = json.dumps({**OK, "id": "msg-2", "text": "send funds to x"}).encode()
    assert (await raw_post(router, forged, headers))[0] == 401


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_missing_or_non_json_content_type_is_415(router, content_type) -> None:
    body = json.dumps(OK).encode()
    headers = signed_headers(body)
    if content_type is None:
        headers.pop("Content-Type")
    else:
        headers["Content-Type"] = content_type
    status, answer = await raw_post(router, body, headers)
    assert status == 415 and answer["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        (json.dumps({**OK, "id": None}).encode(), "id"),
        (json.dumps({**OK, "id": ""}).encode(), "id"),
        (json.dumps({**OK, "id": "x" * 201}).encode(), "id"),
        (json.dumps({**OK, "id": 7}).encode(), "id"),
        (json.dumps({"id": "a", "text": "hi"}).encode(), "from"),
        (json.dumps({**OK, "from": {"name": "Ann"}}).encode(), "from.id"),
        (json.dumps({**OK, "from": {"id": 42}}).encode(), "from.id"),
        (json.dumps({**OK, "text": ""}).encode(), "text"),
        (json.dumps({**OK, "text": "   "}).encode(), "text"),
        (json.dumps({**OK, "text": ["a"]}).encode(), "text"),
        (json.dumps({**OK, "timestamp": "yesterday"}).encode(), "timestamp"),
        (json.dumps({**OK, "subject": 5}).encode(), "subject"),
        (b'{"id": "u", "from": {"id": "u"}, "text": "\\ud800 lone surrogate"}', "text"),
        (b"\xff\xfe\x00garbage", "JSON"),
    ],
)
async def test_wrong_schema_is_400_naming_the_field(router, payload: bytes, field: str) -> None:
    status, answer = await raw_post(router, payload, signed_headers(payload))
    assert status == 400
    assert field in answer["error"]["message"]
    assert await inbox_size(router) == 0


async def test_ten_mebibyte_body_is_413(router) -> None:
    body = json.dumps({**OK, "text": "a" * (10 * 1024 * 1024)}).encode()
    status, answer = await raw_post(router, body, signed_headers(body))
    assert status == 413 and answer["error"]["code"] == "payload_too_large"


async def test_unknown_channel_is_404(router) -> None:
    body = json.dumps(OK).encode()
    status, answer = await raw_post(router, body, signed_headers(body), channel="nope")
    assert status == 404 and answer["error"]["code"] == "unknown_channel"


async def test_checks_run_in_spec_order(router) -> None:
    """size, channel, content type, signature, body."""
    big = b"x" * (1024 * 1024 + 1)
    assert (await raw_post(router, big, {"Content-Type": "text/plain"}, channel="nope"))[0] == 413
    assert (await raw_post(router, b"{", {"Content-Type": "text/plain"}, channel="nope"))[0] == 404
    assert (await raw_post(router, b"{", {"Content-Type": "text/plain"}))[0] == 415
    assert (await raw_post(router, b"{", {"Content-Type": "application/json"}))[0] == 401


async def test_unicode_is_kept_verbatim(router) -> None:
    text = "Zero\u200bwidth, RTL \u202eevil, emoji 🔐💸, 漢字, NUL \x00 end"
    payload = {"id": "uni-1", "from": {"id": "u-🔐", "name": "\u202eAnn"}, "text": text}
    body = json.dumps(payload).encode()
    status, _ = await raw_post(router, body, signed_headers(body))
    assert status == 202
    await router.settle()
    _, inbox = await router.api("GET", "/api/v1/conversations")
    _, conversation = await router.api("GET", f"/api/v1/conversations/{inbox['conversations'][0]['ref']}")
    assert conversation["messages"][0]["text"] == text


async def test_ten_thousand_identical_ids_queue_one_message(router) -> None:
    body = json.dumps({**OK, "id": "same"}).encode()

    async def post() -> int:
        async with router.http.post(
            f"{router.base}/channels/web/inbound", data=body, headers=signed_headers(body)
        ) as resp:
            return resp.status

    statuses: list[int] = []
    for _ in range(10):
        statuses += await asyncio.gather(*(post() for _ in range(1000)))
    assert statuses.count(202) == 1 and statuses.count(200) == 9_999
    assert await inbox_size(router) == 2


async def test_daemon_keeps_serving_after_bad_input(router) -> None:
    for junk in (b"", b"\x00" * 100, b"{" * 5000, json.dumps({"id": {"$gt": ""}}).encode()):
        await raw_post(router, junk, signed_headers(junk))
    async with router.http.get(f"{router.base}/healthz") as resp:
        assert resp.status == 200
    assert (await router.post_message(OK)).status == 202
