"""Daemons sharing a fresh Redis start at the same moment (docker-compose
up): every one of them starts, and `admin` is created once, its token shown
by the one daemon that created it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from router import config as configuration
from router.daemon import ensure_admin
from router.store.redis import RedisStore


async def test_two_daemons_starting_together_on_a_fresh_store_both_start(
    redis_pair: tuple[RedisStore, RedisStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROUTER_CONFIG", raising=False)
    config = configuration.load()
    said: list[str] = []
    one, two = redis_pair
    results = await asyncio.gather(
        ensure_admin(one, config, said.append), ensure_admin(two, config, said.append), return_exceptions=True
    )
    assert results == [None, None]
    assert len(said) == 1 and "admin" in said[0]
    assert [agent.name for agent in await one.list_agents()] == ["admin"]
