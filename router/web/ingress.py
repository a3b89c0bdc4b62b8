"""Channel HTTP routes: webhook ingress, pull-mode outbound, Telegram's webhook (SPEC 5)."""

from __future__ import annotations

from aiohttp import web

from channels.telegram import TelegramChannel
from channels.webhook import WebhookChannel
from router import metrics
from router.errors import BadInbound
from router.web.app import MAX_BODY, SERVICES, whole_number

routes = web.RouteTableDef()
MAX_PULL = 500
MAX_CURSOR = 2**63 - 1  # the stores' sequence numbers are 64-bit


def _webhook(request: web.Request) -> WebhookChannel:
    name = request.match_info["name"]
    channel = request.app[SERVICES].channels.get(name)
    if not isinstance(channel, WebhookChannel):
        raise BadInbound(404, "unknown_channel", f"no webhook channel named {name!r}")
    return channel


def _label(request: web.Request) -> str:
    """A configured channel's name, else one label for them all: a series per
    name anyone posts to would grow /metrics without bound."""
    name = request.match_info["name"]
    return name if name in request.app[SERVICES].channels else "unknown"


@routes.post("/channels/{name}/inbound")
async def inbound(request: web.Request) -> web.Response:
    try:
        if (request.content_length or 0) > MAX_BODY:
            raise BadInbound(413, "payload_too_large", "body over 1 MiB")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadInbound(413, "payload_too_large", "body over 1 MiB") from None
        accepted = await _webhook(request).receive(body, request.headers)
    except BadInbound as exc:
        metrics.REJECTED.labels(_label(request), exc.code).inc()
        raise
    answer = {"message_id": accepted.message_id, "conversation_ref": accepted.conversation_ref}
    return web.json_response(answer, status=200 if accepted.duplicate else 202)


@routes.get("/channels/{name}/outbound")
async def outbound(request: web.Request) -> web.Response:
    """Pull mode: acks and replies for clients without a public endpoint.
    Passing a message with `after` confirms it, which marks it sent."""
    channel = _webhook(request)
    if not channel.pulls_outbound:
        raise BadInbound(409, "push_mode", "this channel pushes to its reply_url; nothing to pull")
    channel.verify(request.raw_path.encode(), request.headers)
    after = whole_number(request.query.get("after", "") or "0", MAX_CURSOR)
    limit = whole_number(request.query.get("limit", "100"), MAX_PULL)
    if after is None or after > MAX_CURSOR or limit is None:
        raise BadInbound(400, "invalid_query", "after must be a cursor from `next`, limit a number")
    limit = max(1, min(limit, MAX_PULL))
    store = request.app[SERVICES].store
    if after:
        await store.mark_pulled(channel.name, after)
    messages = await store.outbound_after(channel.name, after, limit)
    conversations = {}
    payloads = []
    for message in messages:
        key = message.conversation_id or ""
        if key not in conversations:
            conversations[key] = await store.get_conversation(key)
        if conversations[key] is not None:
            payloads.append(channel.payload(message, conversations[key]))
    cursor = messages[-1].seq if messages else after
    return web.json_response({"messages": payloads, "next": str(cursor or "")})


@routes.post("/channels/{name}/telegram")
async def telegram(request: web.Request) -> web.Response:
    """Telegram's webhook: size, channel, secret, then the update. 200 only
    once its message is durably queued; anything else makes Telegram retry."""
    name = request.match_info["name"]
    try:
        if (request.content_length or 0) > MAX_BODY:
            raise BadInbound(413, "payload_too_large", "body over 1 MiB")
        channel = request.app[SERVICES].channels.get(name)
        if not isinstance(channel, TelegramChannel) or not channel.takes_webhooks:
            raise BadInbound(404, "unknown_channel", f"no Telegram webhook channel named {name!r}")
        channel.verify(request.headers)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadInbound(413, "payload_too_large", "body over 1 MiB") from None
        await channel.receive(body)
    except BadInbound as exc:
        metrics.REJECTED.labels(_label(request), exc.code).inc()
        raise
    # Empty: a JSON body with a "method" would be run by Telegram as a Bot API call.
    return web.Response()
