"""Baseline for bench/ingest.py: a bare aiohttp server, one handler.

It checks the webhook signature exactly as SPEC 5 asks (`X-Router-Timestamp`,
`X-Router-Signature: sha256=<hex HMAC-SHA256(secret, "<ts>." + body)>`, at
most 5 minutes of skew) and answers 202; no parsing, no queue, no store. The
secret comes from the BENCH_SECRET environment variable (not argv, so it is
not visible in `ps`).

With `--triage` it is the floor of any router's ingest instead: after the
check, the body is parsed into a `Message` and triaged with the shipped
rules (the router's own `WebhookChannel.parse` and `triage.classify`, the
work the door must do to queue critical messages first), and still nothing
is stored. What support-router costs beyond this floor is its durable queue
and its pipeline.

    BENCH_SECRET=s python bench/bare_handler.py --port 8090 [--triage]
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
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Callable

from aiohttp import web
from pydantic import SecretStr

from channels.webhook import WebhookChannel, WebhookSettings
from router import triage
from router.model import Message

MAX_SKEW_S = 300
ACCEPTED = {"message_id": None, "conversation_ref": None}


def signature_ok(secret: bytes, timestamp: str, signature: str, body: bytes) -> bool:
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_SKEW_S:
        return False
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("sha256=" + digest, signature)


def make_app(secret: bytes, triaged: bool = False) -> web.Application:
    parse, rules = _triage_door() if triaged else (None, None)

    async def inbound(request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        stamp = headers.get("X-Router-Timestamp", "")
        if not signature_ok(secret, stamp, headers.get("X-Router-Signature", ""), body):
            return web.json_response({"error": {"code": "bad_signature", "message": "no"}}, status=401)
        if parse is not None:
            message = parse(body)
            triage.classify(message.text, message.subject, rules)
        return web.json_response(ACCEPTED, status=202)

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_post("/channels/{name}/inbound", inbound)
    app.router.add_get("/readyz", ready)
    return app


def _triage_door() -> tuple[Callable[[bytes], Message], triage.RuleSet]:
    """The router's webhook parser (for a channel named `web`) and its shipped rules."""
    settings = WebhookSettings(secret=SecretStr("unused: the signature is checked above"))
    with tempfile.TemporaryDirectory() as state:
        channel = WebhookChannel("web", settings, Path(state))
    return channel.parse, triage.load_rules()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--triage", action="store_true", help="also parse and triage each message")
    args = parser.parse_args()
    secret = os.environ["BENCH_SECRET"].encode()
    app = make_app(secret, triaged=args.triage)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
