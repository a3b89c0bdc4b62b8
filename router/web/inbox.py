"""The web inbox: the page, its static files, and the agents' cookie sessions.

A session is a signed cookie, not a server-side record, so it survives a
daemon restart (the page just reconnects) and needs nothing from the store.
It names the agent and the hash of the token they signed in with, and is
checked against the store on every request: rotating or removing the token
ends every session made with it, and each session expires after SESSION_S.
The cookie is HttpOnly and SameSite=Strict; state-changing requests made
with it must also carry the CSRF token the page got from `GET /session`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from router import agents
from router.errors import BadInbound
from router.model import Agent
from router.web.app import SERVICES

STATIC = Path(__file__).parent / "static"
COOKIE = "router_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
routes = web.RouteTableDef()


@dataclass(frozen=True, slots=True)
class Claims:
    agent: str
    token_hash: str
    expires: int


@dataclass(frozen=True, slots=True)
class Sessions:
    """Signs and reads session cookies with a key kept under `var/secrets/`,
    or derived from `server.session_secret`: daemons behind one load balancer
    need the same key, or an agent is signed out whenever the balancer
    switches daemons."""

    key: bytes
    secure: bool

    def issue(self, agent: Agent, now: float) -> str:
        claims = {"a": agent.name, "h": agent.token_hash, "e": int(now) + SESSION_S}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"{payload}.{self._mac('session', payload)}"

    def read(self, cookie: str, now: float) -> Claims | None:
        if not cookie.isascii():  # ours always is; compare_digest refuses anything else
            return None
        payload, _, mac = cookie.partition(".")
        if not hmac.compare_digest(self._mac("session", payload), mac):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            claims = Claims(str(data["a"]), str(data["h"]), int(data["e"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        return claims if claims.expires > now else None

    def csrf(self, cookie: str) -> str:
        """Bound to the session, so it changes with every sign-in."""
        return self._mac("csrf", cookie)

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self.key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


SESSIONS = web.AppKey("sessions", Sessions)


def load_key(path: Path) -> bytes:
    """Kept on disk so a restart keeps agents signed in."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    path.touch(mode=0o600)
    path.write_text(key.hex() + "\n")
    return key


async def session_agent(request: web.Request) -> Agent | None:
    """The agent behind the request's session cookie, or None. State-changing
    requests with a valid cookie but without its CSRF token get 403."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    sessions = request.app[SESSIONS]
    claims = sessions.read(cookie, time.time())
    if claims is None:
        return None
    agent = await request.app[SERVICES].store.agent_by_token(claims.token_hash)
    if agent is None or agent.name != claims.agent:
        return None
    sent = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
    if request.method not in SAFE_METHODS and not hmac.compare_digest(sent, sessions.csrf(cookie).encode()):
        raise BadInbound(403, "csrf_failed", f"requests made with the session cookie need {CSRF_HEADER}")
    return agent


def _session_info(request: web.Request, agent: Agent, cookie: str) -> dict[str, Any]:
    """What the page needs to start: who it is, its CSRF token, the desk."""
    services = request.app[SERVICES]
    return {
        "agent": agent.to_dict(),
        "csrf": request.app[SESSIONS].csrf(cookie),
        "channels": [{"name": name, "type": ch.type} for name, ch in sorted(services.channels.items())],
        "teams": [team.name for team in services.config.settings.teams],
    }


def _no_session() -> BadInbound:
    return BadInbound(401, "unauthorized", "not signed in")


@routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@routes.get("/session")
async def current_session(request: web.Request) -> web.Response:
    agent = await session_agent(request)
    if agent is None:
        raise _no_session()
    return web.json_response(_session_info(request, agent, request.cookies[COOKIE]))


@routes.post("/session")
async def sign_in(request: web.Request) -> web.Response:
    """JSON only: a cross-site form cannot send it, which stops login CSRF."""
    if request.content_type != "application/json":
        raise BadInbound(415, "unsupported_media_type", "Content-Type must be application/json")
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInbound(400, "invalid_json", "body is not JSON") from None
    token = data.get("token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not token.strip():
        raise BadInbound(400, "invalid_body", "token: must be an agent token")
    agent = await agents.authenticate(request.app[SERVICES].store, token.strip())
    if agent is None:
        raise BadInbound(401, "invalid_token", "that token is not valid (rotated or removed?)")
    sessions = request.app[SESSIONS]
    cookie = sessions.issue(agent, time.time())
    response = web.json_response(_session_info(request, agent, cookie))
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=SESSION_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=sessions.secure or request.secure,
    )
    return response


@routes.delete("/session")
async def sign_out(request: web.Request) -> web.Response:
    """A still-valid session needs its CSRF token here too; then the cookie goes."""
    await session_agent(request)
    response = web.json_response({"signed_out": True})
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return response


def setup(app: web.Application) -> None:
    """Mount the page and sessions on the app; the key is the configured
    shared secret's, else one of this machine's, kept with its other secrets."""
    from router.daemon import state_dir  # the daemon imports this package: import at call time

    config = app[SERVICES].config
    public = config.settings.server.public_url or ""
    shared = config.settings.server.session_secret
    if shared is not None:
        key = hashlib.sha256(b"support-router session:" + shared.get_secret_value().encode()).digest()
    else:
        key = load_key(state_dir() / "secrets" / "session.key")
    app[SESSIONS] = Sessions(key, public.startswith("https:"))
    app.add_routes(routes)
    app.router.add_static("/static/", STATIC)
