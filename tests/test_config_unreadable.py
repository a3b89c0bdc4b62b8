"""A value that could not be read is reported once, at the key the user
wrote, and an env override replaces the file's value, problems included."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import config as configuration
from router.errors import ConfigError

TOKEN = "5550001234:AAE-emulator_token_for_tests_0123456"
TEAMS = '\n[[teams]]\nname = "support"\n'


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ROUTER_STORE_URL", "ROUTER_LISTEN", "ROUTER_CONFIG", "SECRETS_DIR", "REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "router.toml"
    path.write_text(text + TEAMS, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        configuration.load(str(path))
    return [p.removeprefix(f"{path}: ") for p in caught.value.problems]


TELEGRAM = '[[channels]]\nname = "tg"\ntype = "telegram"\n'
UNREADABLE = [
    ("a directory", 'token_file = "adir"', "channels[0].token_file: cannot read {tmp}/adir: Is a directory"),
    ("a missing file", 'token_file = "nope"', "channels[0].token_file: cannot read {tmp}/nope: No such file"),
    ("an empty file", 'token_file = "empty"', "channels[0].token_file: is empty"),
    ("not a path", "token_file = 5", "channels[0].token_file: must be a file path"),
    (
        "a path from an unset variable",
        'token_file = "${SECRETS_DIR}/tg"',
        "channels[0].token_file: environment variable SECRETS_DIR is not set",
    ),
    (
        "the webhook secret in a directory",
        f'token = "{TOKEN}"\nwebhook_secret_file = "adir"',
        "channels[0].webhook_secret_file: cannot read {tmp}/adir: Is a directory",
    ),
]


@pytest.mark.parametrize(("case", "key", "expected"), UNREADABLE, ids=[row[0] for row in UNREADABLE])
def test_a_secret_file_that_cannot_be_read_is_one_problem(
    tmp_path: Path, case: str, key: str, expected: str
) -> None:
    """Not a second one saying the token it could not read "is not a bot
    token", which sends the user to check a file that may well be right."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    [problem] = problems(TELEGRAM + key, tmp_path)
    assert problem.startswith(expected.format(tmp=tmp_path))


def test_an_env_override_replaces_a_file_value_that_names_an_unset_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A production config with `redis://:${REDIS_PASSWORD}@...` run on a
    laptop with ROUTER_STORE_URL pointing at SQLite: the override wins, so
    the password that is not set there is no problem."""
    path = tmp_path / "router.toml"
    text = '[server]\nlisten = "${LISTEN_ON}"\n[store]\nurl = "redis://:${REDIS_PASSWORD}@redis:6379/0"\n'
    path.write_text(text + TEAMS, encoding="utf-8")
    monkeypatch.setenv("ROUTER_STORE_URL", "sqlite:///local.db")
    monkeypatch.setenv("ROUTER_LISTEN", "127.0.0.1:8181")
    settings = configuration.load(str(path)).settings
    assert (settings.store.url, settings.server.listen) == ("sqlite:///local.db", "127.0.0.1:8181")
    monkeypatch.setenv("ROUTER_LISTEN", "8181")
    assert problems(text, tmp_path) == [
        "server.listen: '8181' is not host:port (like 127.0.0.1:8080) (from ROUTER_LISTEN)"
    ], "the override's own mistake is the one shown"


def test_a_telegram_webhook_without_public_url_fails_check_config_as_it_fails_run(tmp_path: Path) -> None:
    """`run` refuses it (there is no URL to register with Telegram), so
    check-config must not call it valid."""
    webhook = TELEGRAM + f'token = "{TOKEN}"\nmode = "webhook"\n'
    assert problems(webhook, tmp_path) == [
        "server.public_url: needed by channel 'tg' (telegram, webhook mode)"
    ]
    path = tmp_path / "router.toml"
    path.write_text(
        '[server]\npublic_url = "https://support.example.com"\n' + webhook + TEAMS, encoding="utf-8"
    )
    assert configuration.load(str(path)).settings.channels[0].options["mode"] == "webhook"
