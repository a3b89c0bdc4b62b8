"""TOML -> validated settings.

Problems are collected, not raised one by one, so `check-config` can list
them all as `FILE: key.path: what is wrong`. Secrets become `SecretStr` the
moment they are read, so no repr, log line or error message can show them.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.errors import ConfigError
from router.model import Urgency

DEFAULT_STORE_URL = "sqlite:///var/router.db"
DEFAULT_LISTEN = "127.0.0.1:8080"
MATCH_KEYS = ("category", "urgency", "channel", "language")
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> timedelta:
    """`"15m"`, `"1h"`, `"24h"`, `"30s"`, `"1d"`, or a number of seconds."""
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration like 15m, 1h, 30s or 1d")
    return timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    listen: str = DEFAULT_LISTEN
    public_url: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class StoreConfig(_Strict):
    url: str = DEFAULT_STORE_URL


class ChannelConfig(BaseModel):
    """Name and type; the rest is validated by the channel's own Settings."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    type: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TeamConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    assignment: Literal["round_robin", "least_open", "manual"] = "round_robin"


class RouteConfig(_Strict):
    match: dict[str, str | list[str]] = {}
    team: str

    @field_validator("match")
    @classmethod
    def _known_keys(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        unknown = sorted(set(value) - set(MATCH_KEYS))
        if unknown:
            raise ValueError(f"unknown match key {unknown[0]!r} (use {', '.join(MATCH_KEYS)})")
        return value

    def matches(self, facts: dict[str, str]) -> bool:
        for key, wanted in self.match.items():
            values = [wanted] if isinstance(wanted, str) else wanted
            if facts.get(key) not in values:
                return False
        return True


class SLAConfig(_Strict):
    critical: str = "15m"
    high: str = "1h"
    normal: str = "4h"
    low: str = "24h"

    @field_validator("critical", "high", "normal", "low")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

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
    backoff_max: str = "10m"

    @field_validator("backoff_max")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


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


@dataclass
class Config:
    """Validated settings plus where they came from."""

    settings: Settings
    source: str
    base_dir: Path
    warnings: list[str] = field(default_factory=list)

    def path(self, relative: str) -> Path:
        """Paths in the config are relative to the config file."""
        return (self.base_dir / relative).resolve()

    def team(self, name: str) -> TeamConfig | None:
        return next((t for t in self.settings.teams if t.name == name), None)


BUILTIN: dict[str, Any] = {
    "channels": [{"name": "web", "type": "webhook"}],
    "teams": [
        {"name": "security", "assignment": "least_open"},
        {"name": "support", "assignment": "round_robin"},
    ],
    "routes": [{"match": {"category": "security"}, "team": "security"}, {"match": {}, "team": "support"}],
}


def config_path(explicit: str | None) -> Path | None:
    """`-c FILE`, else ROUTER_CONFIG, else ./router.toml when present."""
    chosen = explicit or os.environ.get("ROUTER_CONFIG")
    if chosen:
        return Path(chosen)
    default = Path("router.toml")
    return default if default.exists() else None


def load(explicit: str | None = None) -> Config:
    path = config_path(explicit)
    if path is None:
        return _build(dict(BUILTIN), "built-in defaults", Path.cwd())
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return _build(raw, str(path), path.resolve().parent)


def _build(raw: dict[str, Any], source: str, base_dir: Path) -> Config:
    problems: list[str] = []
    data = _resolve(raw, (), problems, base_dir)
    if url := os.environ.get("ROUTER_STORE_URL"):
        data.setdefault("store", {})["url"] = url
    if listen := os.environ.get("ROUTER_LISTEN"):
        data.setdefault("server", {})["listen"] = listen
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{source}: {_key_path(e['loc'])}: {e['msg']}" for e in exc.errors()]) from None
    warnings: list[str] = []
    problems = _cross_check(settings, warnings)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return Config(settings, source, base_dir, [f"{source}: {w}" for w in warnings])


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _resolve(value: Any, loc: tuple[Any, ...], problems: list[str], base_dir: Path) -> Any:
    """Expand ${VAR} in strings and read `<key>_file` secrets, recursively."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            resolved = _resolve(item, (*loc, key), problems, base_dir)
            if key.endswith("_file") and isinstance(resolved, str) and loc and loc[0] == "channels":
                target = key.removesuffix("_file")
                try:
                    out[target] = (base_dir / resolved).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    problems.append(f"{_key_path((*loc, key))}: cannot read {resolved}: {exc.strerror}")
            else:
                out[key] = resolved
        return out
    if isinstance(value, list):
        return [_resolve(item, (*loc, i), problems, base_dir) for i, item in enumerate(value)]
    if isinstance(value, str) and "$" in value:
        return _expand(value, loc, problems)
    return value


def _expand(value: str, loc: tuple[Any, ...], problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        if match[1] not in os.environ:
            problems.append(f"{_key_path(loc)}: environment variable {match[1]} is not set")
            return ""
        return os.environ[match[1]]

    return _VAR.sub(replace, value)


def _cross_check(settings: Settings, warnings: list[str]) -> list[str]:
    """What one field cannot know: names unique, routes point at teams."""
    from channels import REGISTRY

    problems: list[str] = []
    seen: set[str] = set()
    for i, channel in enumerate(settings.channels):
        if channel.name in seen:
            problems.append(f"channels[{i}].name: duplicate channel name {channel.name!r}")
        seen.add(channel.name)
        adapter = REGISTRY.get(channel.type)
        if adapter is None:
            problems.append(
                f"channels[{i}].type: unknown channel type {channel.type!r} ({', '.join(REGISTRY)})"
            )
            continue
        try:
            adapter.Settings.model_validate(channel.options)
        except ValidationError as exc:
            problems += [f"channels[{i}].{_key_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
    teams = [t.name for t in settings.teams]
    if not teams:
        problems.append("teams: at least one team is needed")
    for name in {t for t in teams if teams.count(t) > 1}:
        problems.append(f"teams: duplicate team name {name!r}")
    for i, route in enumerate(settings.routes):
        if route.team not in teams:
            problems.append(f"routes[{i}].team: no team named {route.team!r}")
    if settings.routes and settings.routes[-1].match:
        warnings.append(
            "routes: the last route is not a catch-all; unmatched conversations go to the first team"
        )
    return problems
