"""The agent API (SPEC 5): inbox, conversations, replies, assignment, events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from enum import Enum
from typing import Any, TypeVar

import nh3
from aiohttp import web

from router import agents
from router.errors import BadInbound
from router.model import Agent, Event, InboxQuery, Message, Presence, Role, Status, Urgency
from router.store.fanout import put_dropping_oldest
from router.web import inbox
from router.web.app import SERVICES, whole_number

routes = web.RouteTableDef()
MAX_LIMIT = 500
HEARTBEAT_S = 15.0
BACKLOG = 1000  # events kept for a client that falls behind
AGENT = web.RequestKey("agent", Agent)
E = TypeVar("E", bound=Enum)
HTML_TAGS = nh3.ALLOWED_TAGS - {"img"}


async def authenticate(request: web.Request) -> Agent | None:
    """The agent behind the bearer token, else behind the web inbox's session
    cookie (which raises 403 for a state-changing request without its CSRF
    header). Not cached: the event stream re-checks it while it runs."""
    header = request.headers.get("Authorization")
    if header is None:
        return await inbox.session_agent(request)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return await agents.authenticate(request.app[SERVICES].store, token.strip())


async def current_agent(request: web.Request) -> Agent:
    """The agent behind the request, or 401."""
    if AGENT in request:
        return request[AGENT]
    agent = await authenticate(request)
    if agent is None:
        raise BadInbound(401, "unauthorized", "a valid agent token is required (Authorization: Bearer ...)")
    request[AGENT] = agent
    return agent


def safe_html(html: str | None) -> str | None:
    """Customer HTML as any page may show it (SPEC 6 promise 5): nh3 drops
    scripts, styles, event handlers, images (remote ones track the reader)
    and every URL scheme but http, https and mailto. Done where messages are
    served, so nothing a channel or an older version stored reaches a page
    unsanitized."""
    if not html:
        return None
    return nh3.clean(
        html,
        tags=HTML_TAGS,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )


def message_json(message: Message | dict[str, Any]) -> dict[str, Any]:
    """A message as served to agents, its HTML sanitized."""
    data = message.to_dict() if isinstance(message, Message) else dict(message)
    if data.get("html"):
        data["html"] = safe_html(data["html"])
    return data


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInbound(400, "invalid_json", "body is not JSON") from None
    if not isinstance(data, dict):
        raise BadInbound(400, "invalid_body", "body must be a JSON object")
    return data


def _enum(kind: type[E], value: Any, field: str) -> E:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in kind)
        raise BadInbound(400, "invalid_body", f"{field}: must be one of {choices}") from None


@routes.get("/api/v1/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    query = request.query
    status_raw = query.get("status", "open")
    status = None if status_raw == "all" else _enum(Status, status_raw, "status")
    limit = whole_number(query.get("limit", "50"), MAX_LIMIT)
    if limit is None or limit < 1:
        raise BadInbound(400, "invalid_query", "limit: must be a positive number")
    assignee = query.get("assignee")
    inbox = InboxQuery(
        status=status,
        team=query.get("team") or None,
        assignee=agent.name if assignee == "me" else (None if assignee in (None, "", "none") else assignee),
        unassigned=assignee == "none",
        limit=min(limit, MAX_LIMIT),
        cursor=query.get("cursor") or None,
    )
    try:
        page = await request.app[SERVICES].store.list_conversations(inbox)
    except (ValueError, OverflowError):  # OverflowError: a forged number past 64 bits
        raise BadInbound(400, "invalid_query", "cursor: not a cursor this server gave out") from None
    return web.json_response(
        {"conversations": [c.to_dict() for c in page.conversations], "next_cursor": page.next_cursor}
    )


@routes.get("/api/v1/conversations/{ref}")
async def get_conversation(request: web.Request) -> web.Response:
    await current_agent(request)
    services = request.app[SERVICES]
    conversation = await services.desk.conversation(request.match_info["ref"])
    messages = await services.store.conversation_messages(conversation.id)
    return web.json_response({**conversation.to_dict(), "messages": [message_json(m) for m in messages]})


@routes.post("/api/v1/conversations/{ref}/messages")
async def reply(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    text = (await _body(request)).get("text")
    if not isinstance(text, str):
        raise BadInbound(400, "invalid_body", "text: must be a string")
    try:
        message = await request.app[SERVICES].desk.reply(request.match_info["ref"], agent, text)
    except ValueError as exc:
        raise BadInbound(400, "invalid_body", str(exc)) from None
    return web.json_response(message_json(message), status=202)


@routes.post("/api/v1/conversations/{ref}/assign")
async def assign(request: web.Request) -> web.Response:
    await current_agent(request)
    data = await _body(request)
    if "agent" not in data or not (data["agent"] is None or isinstance(data["agent"], str)):
        raise BadInbound(400, "invalid_body", "agent: must be an agent name or null")
    conversation = await request.app[SERVICES].desk.assign(request.match_info["ref"], data["agent"])
    return web.json_response(conversation.to_dict())


@routes.post("/api/v1/conversations/{ref}/status")
async def set_status(request: web.Request) -> web.Response:
    await current_agent(request)
    status = _enum(Status, (await _body(request)).get("status"), "status")
    conversation = await request.app[SERVICES].desk.set_status(request.match_info["ref"], status)
    return web.json_response(conversation.to_dict())


@routes.post("/api/v1/conversations/{ref}/urgency")
async def set_urgency(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    urgency = _enum(Urgency, (await _body(request)).get("urgency"), "urgency")
    conversation = await request.app[SERVICES].desk.set_urgency(request.match_info["ref"], urgency, agent)
    return web.json_response(conversation.to_dict())


@routes.post("/api/v1/messages/{id}/retry")
async def retry_delivery(request: web.Request) -> web.Response:
    await current_agent(request)
    message = await request.app[SERVICES].desk.retry_delivery(request.match_info["id"])
    return web.json_response(message_json(message), status=202)


@routes.get("/api/v1/agents")
async def list_agents(request: web.Request) -> web.Response:
    await current_agent(request)
    found = await request.app[SERVICES].store.list_agents()
    return web.json_response({"agents": [a.to_dict() for a in found]})


@routes.post("/api/v1/agents/{name}/presence")
async def set_presence(request: web.Request) -> web.Response:
    """Agents set their own presence (`me`); admins anyone's."""
    agent = await current_agent(request)
    name = agent.name if request.match_info["name"] == "me" else request.match_info["name"]
    if name != agent.name and agent.role is not Role.ADMIN:
        raise BadInbound(403, "forbidden", "only admins set another agent's presence")
    presence = _enum(Presence, (await _body(request)).get("presence"), "presence")
    moved = await request.app[SERVICES].desk.set_presence(name, presence)
    return web.json_response(
        {
            "agent": name,
            "presence": presence.value,
            "reassigned": [c.ref for c in moved if c.assignee is not None],
            "queued": [c.ref for c in moved if c.assignee is None],
        }
    )


@routes.get("/api/v1/deadletters")
async def dead_letters(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    if agent.role is not Role.ADMIN:
        raise BadInbound(403, "forbidden", "dead letters are for admins")
    found = await request.app[SERVICES].store.list_dead_letters()
    return web.json_response({"dead_letters": [d.to_dict() for d in found]})


@routes.get("/api/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events; a comment line every 15 s keeps proxies open, and
    then the agent is checked again, so a removed or rotated token (or an
    expired session) ends the stream and the page signs out."""
    await current_agent(request)
    services = request.app[SERVICES]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b": connected\n\n")
    queue: asyncio.Queue[Event] = asyncio.Queue(BACKLOG)

    async def pump() -> None:
        # Bounded like the store's own subscriber queue, which this drains at
        # once: a client that stops reading loses its oldest events instead
        # of the daemon keeping every one.
        subscription = services.store.subscribe()
        async for event in subscription:
            put_dropping_oldest(queue, event)

    pumping = asyncio.create_task(pump())
    stopping = asyncio.create_task(services.stopping.wait())
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while not services.stopping.is_set():
            getting = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait(
                {getting, stopping}, timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED"
            )
            if getting not in done:
                getting.cancel()
                if await authenticate(request) is None:
                    break
                checked = loop.time()
                await response.write(b": keep-alive\n\n")
                continue
            # Also on a busy desk, where the wait above never times out.
            if loop.time() - checked >= HEARTBEAT_S:
                if await authenticate(request) is None:
                    break
                checked = loop.time()
            # What queued meanwhile goes out in the same write: a burst costs
            # one wake-up and one send, not one per event.
            burst = [getting.result()]
            while not queue.empty():
                burst.append(queue.get_nowait())
            await response.write(b"".join(_sse(event) for event in burst))
    except ConnectionResetError:
        pass
    finally:
        for task in (pumping, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return response


def _sse(event: Event) -> bytes:
    data = message_json(event.data) if event.type.startswith("message.") else event.data
    return f"event: {event.type}\ndata: {json.dumps(data)}\n\n".encode()
