"""Config loading as a user meets it (SPEC 3): ${VAR} and `<key>_file`
secrets, the env overrides, defaults, and `check-config`'s problem list,
which names every problem at once and never shows a secret."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from channels import REGISTRY
from router import config as configuration
from router.errors import ConfigError
from router.model import Urgency

REPO = Path(__file__).resolve().parents[1]
TEAMS = """
[[teams]]
name = "security"
assignment = "least_open"

[[teams]]
name = "support"

[[routes]]
match = { category = "security" }
team = "security"

[[routes]]
match = {}
team = "support"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No override or config path from the developer's shell leaks in."""
    for name in ("ROUTER_STORE_URL", "ROUTER_LISTEN", "ROUTER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write(directory: Path, text: str, name: str = "router.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path | None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        configuration.load(str(path) if path else None)
    return caught.value.problems


def test_variables_expand_anywhere_in_a_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESK_HOST", "support.example.com")
    monkeypatch.setenv("DESK_TEAM", "support")
    monkeypatch.setenv("DESK_LANG", "zh")
    monkeypatch.setenv("WEB_SECRET", "s3cret-from-env")
    path = write(
        tmp_path,
        """
[server]
public_url = "https://${DESK_HOST}:8443/desk"
[[channels]]
name = "web"
type = "webhook"
secret = "pre-${WEB_SECRET}-post"
reply_url = "https://${DESK_HOST}/replies?team=${DESK_TEAM}"
[[teams]]
name = "${DESK_TEAM}"
[[routes]]
match = { channel = "web", language = ["en", "${DESK_LANG}"] }
team = "${DESK_TEAM}"
""",
    )
    settings = configuration.load(str(path)).settings
    assert settings.server.public_url == "https://support.example.com:8443/desk"
    assert settings.channels[0].options["secret"] == "pre-s3cret-from-env-post"
    assert settings.channels[0].options["reply_url"] == "https://support.example.com/replies?team=support"
    assert settings.teams[0].name == "support"
    assert settings.routes[0].team == "support"
    assert settings.routes[0].match == {"channel": "web", "language": ["en", "zh"]}


def test_a_missing_variable_names_itself_and_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[channels]]\nname = "web"\ntype = "webhook"\nsecret = "${SURELY_NOT_SET_42}"\n' + TEAMS,
    )
    assert problems(path) == [
        f"{path}: channels[0].secret: environment variable SURELY_NOT_SET_42 is not set"
    ]  # one line for the key, not a second one about the empty value left behind


def test_double_dollar_brace_is_a_literal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAL", "yes")
    path = write(tmp_path, '[server]\npublic_url = "https://x/$${NOT_A_VAR}/${REAL}/$5"\n' + TEAMS)
    assert configuration.load(str(path)).settings.server.public_url == "https://x/${NOT_A_VAR}/yes/$5"


def test_secret_file_is_read_relative_to_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    write(conf / "secrets", "from-a-file-0123\n", name="web")
    path = write(conf, '[[channels]]\nname = "web"\ntype = "webhook"\nsecret_file = "secrets/web"\n' + TEAMS)
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        options = configuration.load(str(path)).settings.channels[0].options
    assert options == {"secret": "from-a-file-0123"}  # trailing newline gone, `_file` key replaced


def test_unreadable_secret_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    write(tmp_path, "", name="empty")
    channel = '[[channels]]\nname = "{n}"\ntype = "webhook"\n{k}\n'
    path = write(
        tmp_path,
        channel.format(n="a", k='secret_file = "missing/web"')
        + channel.format(n="b", k='secret_file = "adir"')
        + channel.format(n="c", k='secret_file = "empty"')
        + channel.format(n="d", k='secret = "x1234567"\nsecret_file = "empty"')
        + TEAMS,
    )
    found = problems(path)
    assert (
        found[0]
        == f"{path}: channels[0].secret_file: cannot read {tmp_path}/missing/web: No such file or directory"
    )
    assert found[1] == f"{path}: channels[1].secret_file: cannot read {tmp_path}/adir: Is a directory"
    assert found[2] == f"{path}: channels[2].secret_file: is empty"
    assert found[3] == f"{path}: channels[3].secret_file: give secret or secret_file, not both"
    assert len(found) == 4


def test_env_overrides_store_url_and_listen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path, '[server]\nlisten = "127.0.0.1:9000"\n[store]\nurl = "sqlite:///file.db"\n' + TEAMS
    )
    monkeypatch.setenv("ROUTER_STORE_URL", "sqlite:////srv/router.db")
    monkeypatch.setenv("ROUTER_LISTEN", "0.0.0.0:8181")
    for config in (configuration.load(str(path)), configuration.load()):
        assert config.settings.store.url == "sqlite:////srv/router.db"
        assert (config.settings.server.host, config.settings.server.port) == ("0.0.0.0", 8181)
    monkeypatch.setenv("ROUTER_LISTEN", "8181")
    assert problems(path) == [
        f"{path}: server.listen: '8181' is not host:port (like 127.0.0.1:8080) (from ROUTER_LISTEN)"
    ]


def test_defaults_when_sections_are_missing(tmp_path: Path) -> None:
    settings = configuration.load(str(write(tmp_path, TEAMS))).settings
    assert [settings.sla.target(u) for u in Urgency] == [
        timedelta(minutes=15),
        timedelta(hours=1),
        timedelta(hours=4),
        timedelta(hours=24),
    ]
    assert settings.acks.enabled is True and settings.acks.max_per_sender_per_hour == 3
    assert (settings.outbox.max_attempts, settings.outbox.backoff_max) == (8, "10m")
    assert settings.store.url == "sqlite:///var/router.db"
    assert settings.server.listen == "127.0.0.1:8080"
    assert settings.channels == []


def test_built_in_defaults_without_a_file(tmp_path: Path) -> None:
    config = configuration.load()
    s = config.settings
    assert config.source == "built-in defaults" and config.warnings == []
    assert [(c.name, c.type, c.options) for c in s.channels] == [("web", "webhook", {})]  # pull mode
    assert [(t.name, t.assignment) for t in s.teams] == [
        ("security", "least_open"),
        ("support", "round_robin"),
    ]
    assert [(r.match, r.team) for r in s.routes] == [({"category": "security"}, "security"), ({}, "support")]
    assert (s.store.url, s.server.listen) == ("sqlite:///var/router.db", "127.0.0.1:8080")
    write(tmp_path, '[server]\nlisten = "127.0.0.1:9999"\n' + TEAMS)  # ./router.toml wins when present
    assert configuration.load().settings.server.listen == "127.0.0.1:9999"


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
listen = "localhost"

[[channels]]
name = "web"
type = "webhook"
reply_url = "not a url"
timeout = 3

[[channels]]
name = "web"
type = "carrier-pigeon"

[[teams]]
name = "support"
assigment = "round_robin"

[[routes]]
match = { categroy = "security", urgency = "urgent" }
team = "support"

[[routes]]
match = {}
team = "secuirty"

[sla]
critical = "15 minutes"
""",
    )
    assert problems(path) == [
        f"{path}: {line}"
        for line in [
            "server.listen: 'localhost' is not host:port (like 127.0.0.1:8080)",
            "teams[0].assigment: unknown key",
            "sla.critical: '15 minutes' is not a duration like 15m, 1h, 30s or 1d",
            "channels[0].reply_url: Input should be a valid URL, relative URL without a base",
            "channels[0].timeout: unknown key",
            "channels[1].name: duplicate channel name 'web'",
            f"channels[1].type: unknown channel type 'carrier-pigeon' (known: {', '.join(REGISTRY)})",
            "routes[0].match.categroy: unknown match key (use category, urgency, channel, language)",
            "routes[0].match.urgency: 'urgent' is not one of critical, high, normal, low",
            "routes[1].team: no team named 'secuirty'",
        ]
    ]


def test_other_mistakes_a_user_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
[store]
url = "postgres://admin:pg-password-123@db/router"
[[channels]]
name = "Web Desk"
type = "webhook"
[acks]
templates = "no-such-folder"
[[routes]]
match = { channel = "mail" }
team = "support"
""",
    )
    found = problems(path)
    assert found == [
        f"{path}: {line}"
        for line in [
            "store.url: is not sqlite:///relative.db, sqlite:////absolute.db or redis://:password@host:6379/0",
            "channels[0].name: must be 1-40 characters: lower-case letters, digits, - and _",
            "teams: at least one [[teams]] table is needed",
            "routes[0].team: no team named 'support'",
            "routes[0].match.channel: 'mail' is not one of Web Desk",
            f"acks.templates: no folder {tmp_path}/no-such-folder",
        ]
    ]
    write(tmp_path, "[server\nlisten = 1", name="broken.toml")
    [line] = problems(tmp_path / "broken.toml")
    assert line.startswith(f"{tmp_path / 'broken.toml'}: not valid TOML: ")
    assert problems(tmp_path / "nope.toml") == [f"{tmp_path / 'nope.toml'}: file not found"]


def test_last_route_not_a_catch_all_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, TEAMS.rsplit("[[routes]]", 1)[0])
    config = configuration.load(str(path))
    [warning] = config.warnings
    assert warning.startswith(f"{path}: routes: the last route is not a catch-all")
    assert configuration.load(str(write(tmp_path, TEAMS))).warnings == []


def test_secrets_never_appear_in_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_secret, file_secret, inline = (
        "env-secret-0xDEADBEEF",
        "file-secret-0xFEEDFACE",
        "inline-pass-0xC0FFEE",
    )
    monkeypatch.setenv("WEB_SECRET", env_secret)
    monkeypatch.setenv("ROUTER_STORE_URL", f"redis://:{inline}@cache:not-a-port/0")
    write(tmp_path, file_secret + "\n", name="secret.txt")
    path = write(
        tmp_path,
        f"""
[server]
listen = "${{WEB_SECRET}}"
public_url = "https://x/${{WEB_SECRET}}"
[[channels]]
name = "web"
type = "webhook"
secret = "${{WEB_SECRET}}"
reply_url = "https://${{WEB_SECRET}}:bad/"
timeout_s = "{env_secret}"
[[channels]]
name = "app"
type = "webhook"
secret_file = "secret.txt"
reply_url = "{file_secret}"
bogus = "{file_secret}"
[sla]
critical = "${{WEB_SECRET}}"
high = "{file_secret}"
"""
        + TEAMS,
    )
    with pytest.raises(ConfigError) as caught:
        configuration.load(str(path))
    text = "\n".join([str(caught.value), repr(caught.value), *caught.value.problems])
    assert len(caught.value.problems) >= 7, text
    for secret in (env_secret, file_secret, inline):
        assert secret not in text
    assert f"{path}: sla.critical: '***' is not a duration like 15m, 1h, 30s or 1d" in caught.value.problems


def test_the_shipped_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = REPO / "config" / "router.example.toml"
    assert problems(example) == [
        f"{example}: channels[0].secret: environment variable WEB_WEBHOOK_SECRET is not set"
    ]
    monkeypatch.setenv("WEB_WEBHOOK_SECRET", "example-secret-value")
    config = configuration.load(str(example))
    assert config.warnings == []
    assert config.settings.channels[0].options == {"secret": "example-secret-value"}
    assert [t.name for t in config.settings.teams] == ["security", "support"]
    assert config.settings.outbox.max_attempts == 8
