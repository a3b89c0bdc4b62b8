"""The shape of a valid config: one pydantic model per TOML table.

Kept apart from the loader (router/config.py), which expands variables,
reads secret files and turns validation errors into `FILE: key.path` lines.
"""

from __future__ import annotations

import functools
import re
from datetime import timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from router.model import Urgency

DEFAULT_STORE_URL = "sqlite:///var/router.db"
DEFAULT_LISTEN = "127.0.0.1:8080"
MATCH_KEYS = ("category", "urgency", "channel", "language")
NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@functools.lru_cache(maxsize=64)
def parse_duration(value: str | int | float) -> timedelta:
    """`"15m"`, `"1h"`, `"24h"`, `"30s"`, `"1d"`, or a number of seconds."""
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration like 15m, 1h, 30s or 1d")
    return timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])


def _duration(value: str) -> str:
    parse_duration(value)
    return value


Duration = Annotated[str, AfterValidator(_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    listen: str = DEFAULT_LISTEN
    public_url: str | None = None
    session_secret: SecretStr | None = None
    """Signs the web inbox's session cookies; give every daemon behind one
    load balancer the same, else each keeps its own under var/secrets/."""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port (like 127.0.0.1:8080)")
        return value

    @field_validator("session_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (a long random string)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _store_url(value: str) -> str:
    """Checked without connecting, so check-config can vouch for it; never
    echoes the URL, which may carry a password."""
    try:
        parts = urlsplit(value)
        redis = parts.scheme in ("redis", "rediss") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        redis = False
    if redis or (value.startswith("sqlite:///") and len(value) > len("sqlite:///")):
        return value
    raise ValueError("is not sqlite:///relative.db, sqlite:////absolute.db or redis://:password@host:6379/0")


class StoreConfig(_Strict):
    url: Annotated[str, AfterValidator(_store_url)] = DEFAULT_STORE_URL


class ChannelConfig(BaseModel):
    """Name and type; the rest is validated by the channel's own Settings."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME)
    type: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TeamConfig(_Strict):
    name: str = Field(pattern=NAME)
    assignment: Literal["round_robin", "least_open", "manual"] = "round_robin"


class RouteConfig(_Strict):
    match: dict[str, Any] = {}
    """Keys and values are checked in `_check_routes`, which also knows the
    channel names: a typo would make a route silently never match."""
    team: str

    def matches(self, facts: dict[str, str]) -> bool:
        for key, wanted in self.match.items():
            values = [wanted] if isinstance(wanted, str) else wanted
            if facts.get(key) not in values:
                return False
        return True


class SLAConfig(_Strict):
    critical: Duration = "15m"
    high: Duration = "1h"
    normal: Duration = "4h"
    low: Duration = "24h"

    def target(self, urgency: Urgency) -> timedelta:
        return parse_duration(getattr(self, urgency.value))


class TriageConfig(_Strict):
    rules: list[str] = []


class AcksConfig(_Strict):
    enabled: bool = True
    templates: str | None = None
    max_per_sender_per_hour: int = Field(default=3, ge=0)


class OutboxConfig(_Strict):
    max_attempts: int = Field(default=8, ge=1)
    backoff_max: Duration = "10m"


class PipelineConfig(_Strict):
    workers: int = Field(default=4, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1)


class Settings(_Strict):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    channels: list[ChannelConfig] = []
    teams: list[TeamConfig] = []
    routes: list[RouteConfig] = []
    sla: SLAConfig = SLAConfig()
    triage: TriageConfig = TriageConfig()
    acks: AcksConfig = AcksConfig()
    outbox: OutboxConfig = OutboxConfig()
    pipeline: PipelineConfig = PipelineConfig()
