"""Agent accounts and their API tokens (shown once, stored as SHA-256).

Tokens are 256 random bits, so a fast hash is safe: there is nothing to
brute-force, and lookups stay O(1) on every request."""

from __future__ import annotations

import hashlib
import secrets

from router.errors import Conflict, NotFound
from router.model import Agent, Role
from router.store import Store

TOKEN_PREFIX = "srt_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def create(store: Store, name: str, teams: list[str], role: Role = Role.AGENT) -> str:
    """Create the agent; return its token, the only time it is readable."""
    if await store.get_agent(name) is not None:
        raise Conflict(f"agent {name!r} exists already")
    token = new_token()
    await store.add_agent(Agent(name=name, teams=teams, role=role, token_hash=hash_token(token)))
    return token


async def rotate(store: Store, name: str) -> str:
    if await store.get_agent(name) is None:
        raise NotFound(f"no agent {name!r}")
    token = new_token()
    await store.set_agent_token(name, hash_token(token))
    return token


async def authenticate(store: Store, token: str) -> Agent | None:
    if not token.startswith(TOKEN_PREFIX) or not token.isascii():  # ours always are
        return None
    return await store.agent_by_token(hash_token(token))
