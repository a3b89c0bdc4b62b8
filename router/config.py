"""TOML -> validated settings.

Problems are collected, not raised one by one, so `check-config` can list
them all as `FILE: key.path: what is wrong` and a user fixes a file in one
pass. Values taken from the environment or from `<key>_file` may be secrets:
they are masked in every message, and no message echoes a secret key's value.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from router.errors import ConfigError
from router.model import Category, Urgency
from router.settings import MATCH_KEYS, Settings, TeamConfig

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_KEY = re.compile(r"(secret|password|token)$")
_MIN_MASKED = 6  # shorter values would mask ordinary words in messages


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
OVERRIDES = {("store", "url"): "ROUTER_STORE_URL", ("server", "listen"): "ROUTER_LISTEN"}


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
        return _Loader("built-in defaults", Path.cwd()).build(BUILTIN)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return _Loader(str(path), path.resolve().parent).build(raw)


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_PLAIN = {
    "extra_forbidden": "unknown key",
    "missing": "is required",
    "model_type": "must be a table",
    "string_pattern_mismatch": "must be 1-40 characters: lower-case letters, digits, - and _",
}


def _explain(error: Any) -> str:
    """Pydantic's wording, made to read like the rest of our messages."""
    return _PLAIN.get(error["type"]) or str(error["msg"]).removeprefix("Value error, ")


class _Loader:
    """One load: expands the raw TOML, validates it, and keeps every problem."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source, self.base_dir = source, base_dir
        self.problems: dict[str, list[str]] = {}
        self.masked: set[str] = set()
        self.origin: dict[str, str] = {}
        self.unreadable: set[str] = set()

    def problem(self, path: str, what: str) -> None:
        """A key whose value could not even be read gets one message, not
        a second one about the placeholder left in its place."""
        if path not in self.unreadable and what not in self.problems.setdefault(path, []):
            self.problems[path].append(what)

    def build(self, raw: dict[str, Any]) -> Config:
        data = self.resolve(raw, ())
        for (table, key), variable in OVERRIDES.items():
            value = os.environ.get(variable)
            if value and isinstance(data.setdefault(table, {}), dict):
                data[table][key] = value
                self.origin[f"{table}.{key}"] = variable
                self.problems.pop(f"{table}.{key}", None)  # the file's value, replaced
        self.unreadable |= set(self.problems)
        settings: Settings | None = None
        try:
            settings = Settings.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors():
                self.problem(_key_path(error["loc"]), _explain(error))
        warnings = _cross_check(self, data)
        if self.problems or settings is None:
            raise ConfigError([self.line(p, w) for p, whats in self.problems.items() for w in whats])
        return Config(settings, self.source, self.base_dir, [f"{self.source}: {w}" for w in warnings])

    def line(self, path: str, what: str) -> str:
        if path in self.origin:
            what += f" (from {self.origin[path]})"
        for value in sorted(self.masked, key=len, reverse=True):
            what = what.replace(value, "***")
        return f"{self.source}: {path}: {what}"

    def resolve(self, value: Any, loc: tuple[Any, ...]) -> Any:
        """Expand ${VAR} in strings and read `<key>_file` secrets, recursively."""
        if isinstance(value, list):
            return [self.resolve(item, (*loc, i)) for i, item in enumerate(value)]
        if isinstance(value, str) and "$" in value:
            return self.expand(value, loc)
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            resolved = self.resolve(item, (*loc, key))
            target = key.removesuffix("_file")
            if target == key:
                out[key] = resolved
            elif target in value:
                self.problem(_key_path((*loc, key)), f"give {target} or {key}, not both")
            elif not isinstance(resolved, str):
                self.problem(_key_path((*loc, key)), "must be a file path")
            elif _key_path((*loc, key)) not in self.problems:  # a path with an unset variable is not read
                out[target] = self.read_secret(resolved, (*loc, key))
            if _SECRET_KEY.search(target) and isinstance(out.get(target), str):
                self.mask(out[target])
                if not out[target] and _key_path((*loc, key)) not in self.problems:
                    self.problem(_key_path((*loc, key)), "is empty")
            if target != key and _key_path((*loc, key)) in self.problems:
                self.unreadable.add(_key_path((*loc, target)))  # no second message about what was not read
        return out

    def read_secret(self, name: str, loc: tuple[Any, ...]) -> str:
        path = self.base_dir / Path(name).expanduser()
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            self.problem(_key_path(loc), f"cannot read {path}: {why}")
            return ""
        self.mask(secret)
        return secret

    def mask(self, value: str) -> None:
        if len(value) >= _MIN_MASKED:
            self.masked.add(value)

    def expand(self, value: str, loc: tuple[Any, ...]) -> str:
        def replace(match: re.Match[str]) -> str:
            if match[0] == "$${":
                return "${"
            if match[1] not in os.environ:
                self.problem(_key_path(loc), f"environment variable {match[1]} is not set")
                return ""
            self.mask(os.environ[match[1]])
            return os.environ[match[1]]

        return _VAR.sub(replace, value)


def _tables(value: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(i, t) for i, t in enumerate(value) if isinstance(t, dict)] if isinstance(value, list) else []


def _cross_check(loader: _Loader, data: dict[str, Any]) -> list[str]:
    """What one field cannot know, checked on the raw data so it runs even
    when other sections failed. Returns the warnings."""
    channels = _check_channels(loader, data)
    teams = [n for _, t in _tables(data.get("teams")) if isinstance(n := t.get("name"), str)]
    if not data.get("teams"):
        loader.problem("teams", "at least one [[teams]] table is needed")
    for i, name in enumerate(teams):
        if name in teams[:i]:
            loader.problem(f"teams[{i}].name", f"duplicate team name {name!r}")
    routes = _tables(data.get("routes"))
    for i, route in routes:
        if isinstance(team := route.get("team"), str) and team not in teams:
            loader.problem(f"routes[{i}].team", f"no team named {team!r}")
        _check_match(loader, f"routes[{i}].match", route.get("match"), channels)
    acks = data.get("acks")
    templates = acks.get("templates") if isinstance(acks, dict) else None
    if isinstance(templates, str) and not (loader.base_dir / templates).is_dir():
        loader.problem("acks.templates", f"no folder {loader.base_dir / templates}")
    if routes and routes[-1][1].get("match"):
        return ["routes: the last route is not a catch-all (match = {}); unmatched ones go to the first team"]
    return []


def _check_channels(loader: _Loader, data: dict[str, Any]) -> list[str]:
    """Names unique, types known, each adapter's own keys; returns the names."""
    from channels import REGISTRY

    names: list[str] = []
    for i, channel in _tables(data.get("channels")):
        name, kind = channel.get("name"), channel.get("type")
        if isinstance(name, str):
            if name in names:
                loader.problem(f"channels[{i}].name", f"duplicate channel name {name!r}")
            names.append(name)
        adapter = REGISTRY.get(kind) if isinstance(kind, str) else None
        if adapter is None:
            if isinstance(kind, str):
                known = ", ".join(REGISTRY)
                loader.problem(f"channels[{i}].type", f"unknown channel type {kind!r} (known: {known})")
            continue
        try:
            adapter.Settings.model_validate({k: v for k, v in channel.items() if k not in ("name", "type")})
        except ValidationError as exc:
            for error in exc.errors():
                loader.problem(f"channels[{i}].{_key_path(error['loc'])}", _explain(error))
        server = data.get("server")
        public_url = server.get("public_url") if isinstance(server, dict) else None
        if kind == "telegram" and channel.get("mode") == "webhook" and not public_url:
            # what TelegramChannel.configure refuses at start, said before it
            loader.problem("server.public_url", f"needed by channel {name!r} (telegram, webhook mode)")
    return names


def _check_match(loader: _Loader, where: str, match: Any, channels: list[str]) -> None:
    """Known keys, and values that can occur, each key a string or a list."""
    allowed = {"category": list(Category), "urgency": list(Urgency), "channel": list(dict.fromkeys(channels))}
    for key, wanted in match.items() if isinstance(match, dict) else []:
        values = [wanted] if isinstance(wanted, str) else wanted
        if key not in MATCH_KEYS:
            loader.problem(f"{where}.{key}", f"unknown match key (use {', '.join(MATCH_KEYS)})")
        elif not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            loader.problem(f"{where}.{key}", "must be a string or a list of strings")
        elif bad := [v for v in values if key in allowed and v not in allowed[key]]:
            known = ", ".join(allowed[key]) or "none"
            loader.problem(f"{where}.{key}", f"{bad[0]!r} is not one of {known}")
