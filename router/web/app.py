"""The aiohttp application: JSON errors, health, metrics, and the route tables."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from channels.base import Channel
from router import metrics
from router.config import Config
from router.desk import Desk
from router.errors import BadInbound, Conflict, NotFound, StoreError
from router.store import Store

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Services:
    """Everything a request handler may touch, as one typed app key."""

    store: Store
    config: Config
    channels: dict[str, Channel]
    desk: Desk
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False


SERVICES = web.AppKey("services", Services)


def whole_number(raw: str, cap: int) -> int | None:
    """A query's ASCII digits as a number, anything above `cap` as `cap + 1`;
    None when it is no such number. `isdigit()` alone passes "²" and 5,000
    nines, and int() refuses both."""
    if not (raw.isascii() and raw.isdigit()):
        return None
    digits = raw.lstrip("0")
    return min(int(digits or "0"), cap + 1) if len(digits) <= len(str(cap)) else cap + 1


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure answers SPEC 5's error object; internals never leak."""
    try:
        return await handler(request)
    except BadInbound as exc:
        return error(exc.status, exc.code, exc.message)
    except NotFound as exc:
        return error(404, "not_found", str(exc))
    except Conflict as exc:
        return error(409, "conflict", str(exc))
    except StoreError:
        log.exception("store error on %s %s", request.method, request.path)
        return error(503, "store_unavailable", "the store is unavailable; try again")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error(exc.status, code, exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error(500, "internal_error", "internal error; it was logged")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await services.store.ping()
    except StoreError as exc:
        return error(503, "store_unavailable", str(exc))
    if not services.ready or services.stopping.is_set():
        return error(503, "not_ready", "channels are starting or stopping")
    return web.json_response({"status": "ready", "channels": sorted(services.channels)})


async def metrics_page(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    metrics.BACKLOG.set(await services.store.inbound_backlog())
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " font-src 'self'; media-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, errors and the event stream included: customer text
    shown by the inbox can never run as script (no inline script, no eval, no
    framing), and files revalidate so an upgrade never serves a stale page."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-cache")


def create_app(services: Services) -> web.Application:
    from router.web import api, inbox, ingress

    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app[SERVICES] = services
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_page),
        ]
    )
    app.add_routes(ingress.routes)
    app.add_routes(api.routes)
    inbox.setup(app)
    app.on_response_prepare.append(security_headers)
    return app
