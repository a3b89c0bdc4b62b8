"""The `support-router` command as a user runs it (SPEC 2): exit codes, one
line per error and no traceback, tokens shown once, the inbox, replies,
channel checks, and one store shared with a daemon in the same directory.

Exit codes and error output are checked on a real `python -m router`
process; the rest calls `router.cli.main` in-process, which is faster."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from router import agents, triage
from router import config as configuration
from router.acks import Templates
from router.cli import main
from router.daemon import Daemon
from router.model import DeliveryStatus, Direction, Kind, Message
from router.pipeline import Pipeline
from router.store import Store, open_store
from tests.conftest import (
    SECRET,
    Receiver,
    customer_message,
    free_port,
    free_socket,
    redirecting,
    signed_headers,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "triage_sample.jsonl"
TOKEN = re.compile(r"srt_[A-Za-z0-9_-]{20,}")
Run = Callable[..., tuple[int, str, str]]
T = TypeVar("T")


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A real `python -m router` in `cwd`, with no ROUTER_* from our shell."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def clis(cwd: Path, *calls: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once: each process spends most of its time
    importing, and the whole file should stay fast."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda args: cli(cwd, *args), calls))


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 1, a single line on stderr, and nothing that looks like a crash."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    return line


_RULES: dict[tuple[Path, ...], triage.RuleSet] = {}
_load_rules = triage.load_rules


def rules(extra: Sequence[Path] = ()) -> triage.RuleSet:
    """Compiling the shipped rules is the slow part of every command; the
    in-process ones share one compiled set."""
    if (key := tuple(extra)) not in _RULES:
        _RULES[key] = _load_rules(extra)
    return _RULES[key]


@pytest.fixture(autouse=True)
def _compile_rules_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triage, "load_rules", rules)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Run]:
    """`router.cli.main` in-process in tmp_path; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    for name in ("ROUTER_STORE_URL", "ROUTER_LISTEN", "ROUTER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() installs its own stderr handler

    def go(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield go
    root.handlers[:] = handlers
    root.setLevel(level)


async def with_store(config_file: Path | None, work: Callable[[Store], Awaitable[T]]) -> T:
    """Look at the store the CLI used, the way the daemon would open it."""
    store = open_store(configuration.load(str(config_file) if config_file else None).settings.store.url)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def seed(config_file: Path) -> None:
    """bob works support, sec works security; three customers write in:
    T-000001 and T-000003 (support, bob), T-000002 (critical, security, sec)."""

    async def work(store: Store) -> None:
        await agents.create(store, "bob", ["support"])
        await agents.create(store, "sec", ["security"])
        pipeline = Pipeline(store, configuration.load(str(config_file)), rules(), Templates(None))
        for sender, text in [
            ("u-1", "what is the fee for BTC withdrawals?"),
            ("u-2", "someone logged into my account and withdrew everything"),
            ("u-3", "how long do deposits take?"),
        ]:
            await pipeline.accept(customer_message(text, sender))
            await pipeline.drain()

    asyncio.run(with_store(config_file, work))


# -- check-config, errors, usage -------------------------------------------------


def test_check_config_summarises_and_masks_the_store_password(tmp_path: Path) -> None:
    write_config(tmp_path, None)
    result = cli(tmp_path, "check-config", ROUTER_STORE_URL="redis://:hunter2-redis-pw@10.9.8.7:6379/0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "config: router.toml",  # ./router.toml, found without -c
        "store: redis://:***@10.9.8.7:6379/0",  # validated only: nothing listens there
        "listen: 127.0.0.1:8080",
        "channels: web (webhook)",
        "teams: security (least_open), support (round_robin)",
        "routes: 2 (category=security -> security; everything else -> support)",
    ]
    assert "hunter2" not in result.stdout + result.stderr and SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "password", ["hunter2/with/slashes", "hunter2?query", "hunter2#frag", "hunter2@at", "hunter2:colon"]
)
def test_check_config_masks_a_store_password_with_url_characters_in_it(tmp_path: Path, password: str) -> None:
    """People paste passwords unencoded: whatever it holds, none of it shows."""
    write_config(tmp_path, None)
    result = cli(tmp_path, "check-config", ROUTER_STORE_URL=f"redis://:{password}@[::1]:6379/0")
    shown = result.stdout + result.stderr
    assert "hunter2" not in shown
    if result.returncode == 0:
        assert "store: redis://:***@[::1]:6379/0" in result.stdout.splitlines()
    else:  # a URL that does not parse is refused, by its key, without its password
        assert "store.url:" in result.stderr


def test_check_config_lists_problems_then_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "nowhere"\n[sla]\nhigh = "soon"\n')
    result, debug = clis(
        tmp_path, ["check-config", "-c", str(bad)], ["--debug", "check-config", "-c", str(bad)]
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"{bad}: server.listen: 'nowhere' is not host:port (like 127.0.0.1:8080)",
        f"{bad}: sla.high: 'soon' is not a duration like 15m, 1h, 30s or 1d",
        f"{bad}: teams: at least one [[teams]] table is needed",
    ]
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_check_config_warns_when_the_last_route_is_not_a_catch_all(run: Run, tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    config.write_text(config.read_text().replace("match = {}", 'match = { language = "en" }'))
    code, out, err = run("check-config")
    assert code == 0 and out.startswith("config: router.toml\n")
    assert err.splitlines() == [
        "warning: router.toml: routes: the last route is not a catch-all (match = {}); "
        "unmatched ones go to the first team"
    ]


def test_check_config_compiles_the_desks_rule_files(run: Run, tmp_path: Path) -> None:
    write_config(tmp_path, None, '[triage]\nrules = ["rules/ours.toml", "rules/gone.toml"]\n')
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ours.toml").write_text("[[rules]\n")
    code, out, err = run("check-config")
    assert (code, out) == (1, "")
    ours, gone = err.splitlines()
    assert ours.startswith(f"{tmp_path / 'rules' / 'ours.toml'}: not valid TOML")
    assert gone.startswith(f"{tmp_path / 'rules' / 'gone.toml'}: cannot read")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    calls = [[], ["frobnicate"], ["agents", "add", "bob"]]  # --team is required
    for args, result in zip(calls, clis(tmp_path, *calls), strict=True):
        assert result.returncode == 2, (args, result)
        assert "Traceback" not in result.stderr and result.stderr.startswith("usage: ")
    for args in (["agents", "add", "", "--team", "support"], ["agents", "presence", "bob", "busy"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2


def test_config_is_found_by_flag_before_or_after_the_command_and_by_env(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    config = write_config(elsewhere, None)
    for args in (["-c", str(config), "check-config"], ["check-config", "-c", str(config)]):
        code, out, _ = run(*args)
        assert code == 0 and out.startswith(f"config: {config}\n"), args
    assert run("agents", "-c", str(config), "add", "bob", "--team", "support")[0] == 0
    assert "bob" in run("agents", "list", "--config", str(config))[1]
    assert run("agents", "list")[1] == ""  # without it: the built-in defaults' own store
    monkeypatch.setenv("ROUTER_CONFIG", str(config))
    code, out, _ = run("check-config")
    assert code == 0 and out.startswith(f"config: {config}\n")
    assert "bob" in run("agents", "list")[1]


# -- agents ----------------------------------------------------------------------


def test_agents_add_list_rotate_presence_remove(run: Run, tmp_path: Path) -> None:
    added = cli(tmp_path, "agents", "add", "bob", "--team", "support")
    assert added.returncode == 0, added.stderr
    [token] = TOKEN.findall(added.stdout)
    assert added.stdout.count(token) == 1 and token not in added.stderr

    code, out, err = run("agents", "list")
    assert code == 0 and out.split() == ["bob", "agent", "available", "support"]
    assert "srt_" not in out + err

    code, out, _ = run("agents", "token", "bob")
    [new] = TOKEN.findall(out)
    assert code == 0 and new != token

    async def who(store: Store) -> list[str | None]:
        return [(a.name if (a := await agents.authenticate(store, t)) else None) for t in (token, new)]

    assert asyncio.run(with_store(None, who)) == [None, "bob"]

    duplicate = cli(tmp_path, "agents", "add", "bob", "--team", "support")
    assert "bob" in one_line_error(duplicate) and not TOKEN.search(duplicate.stdout)
    code, out, err = run("agents", "add", "carol", "--team", "billing")
    assert (code, out, err) == (1, "", "error: --team: no team named 'billing' (teams: security, support)\n")

    assert run("agents", "presence", "bob", "away")[:2] == (0, "bob is away\n")
    assert run("agents", "list")[1].split() == ["bob", "agent", "away", "support"]
    assert run("agents", "remove", "bob")[:2] == (0, "agent bob removed\n")
    assert run("agents", "list")[1] == ""
    code, _, err = run("agents", "remove", "bob")
    assert code == 1 and err == "error: no agent 'bob'\n"


def test_removing_an_agent_hands_their_conversations_to_the_team(run: Run, tmp_path: Path) -> None:
    """Nobody can answer as a removed agent: their open conversations, the
    answered ones too, go back to the team's strategy instead of waiting on
    a name nobody can sign in as (and that no view but "assigned" shows)."""
    config = write_config(tmp_path, None)
    seed(config)
    assert run("agents", "add", "carol", "--team", "support")[0] == 0
    assert run("reply", "T-000001", "Which network?", "--agent", "bob")[0] == 0

    assert run("agents", "remove", "bob")[:2] == (0, "agent bob removed; reassigned 2\n")
    code, out, _ = run("inbox", "--json", "--team", "support")
    assert code == 0
    assert {c["ref"]: c["assignee"] for c in json.loads(out)["conversations"]} == {
        "T-000001": "carol",
        "T-000003": "carol",
    }


def test_a_new_agent_takes_up_the_conversations_waiting_in_their_team(run: Run, tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    seed(config)
    assert run("agents", "presence", "bob", "away")[0] == 0
    code, out, _ = run("inbox", "--json", "--team", "support")
    assert {c["assignee"] for c in json.loads(out)["conversations"]} == {None}
    code, out, _ = run("agents", "add", "carol", "--team", "support")
    assert code == 0
    assert out.splitlines()[1] == "assigned 2 waiting conversation(s) by their teams' strategies"
    code, out, _ = run("inbox", "--json", "--team", "support")
    assert {c["assignee"] for c in json.loads(out)["conversations"]} == {"carol"}


# -- inbox and reply -------------------------------------------------------------


def test_inbox_in_order_with_filters(run: Run, tmp_path: Path) -> None:
    seed(write_config(tmp_path, None))
    code, out, err = run("inbox")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["T-000002", "T-000001", "T-000003"]
    assert lines[0].split()[1:4] == ["critical", "security", "security"]

    code, out, _ = run("inbox", "--json")
    conversations = json.loads(out)["conversations"]
    assert [c["ref"] for c in conversations] == ["T-000002", "T-000001", "T-000003"]
    assert conversations[0]["urgency"] == "critical" and conversations[0]["assignee"] == "sec"

    def refs(*args: str) -> list[str]:
        code, out, err = run("inbox", "--json", *args)
        assert code == 0, err
        return [c["ref"] for c in json.loads(out)["conversations"]]

    assert refs("--team", "support") == ["T-000001", "T-000003"]
    assert refs("--mine", "--agent", "bob") == ["T-000001", "T-000003"]
    assert refs("--mine", "--agent", "sec") == ["T-000002"]
    assert run("inbox", "--team", "suport")[::2] == (
        1,
        "error: --team: no team named 'suport' (teams: security, support)\n",
    )
    assert run("inbox", "--mine", "--agent", "bobby")[0] == 1


def test_reply_queues_an_agent_message(run: Run, tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    seed(config)
    code, out, err = run("reply", "T-000001", "The fee is 0.0002 BTC.", "--agent", "bob")
    assert code == 0 and out.startswith("queued m") and err == ""

    async def messages(store: Store) -> list[Message]:
        conversation = await store.get_conversation("T-000001")
        assert conversation is not None and conversation.first_response_at is not None
        return await store.conversation_messages(conversation.id)

    history = asyncio.run(with_store(config, messages))
    [reply] = [m for m in history if m.kind is Kind.AGENT]
    assert (reply.text, reply.author, reply.direction) == ("The fee is 0.0002 BTC.", "bob", Direction.OUT)
    assert reply.delivery is not None and reply.delivery.status is DeliveryStatus.QUEUED

    unknown = cli(tmp_path, "reply", "T-999999", "hello", "--agent", "bob")
    assert one_line_error(unknown) == "error: no conversation 'T-999999'"
    code, _, err = run("reply", "T-000001", "hi")  # --agent defaults to admin, who does not exist here
    assert code == 1 and err.startswith("error: no agent 'admin'")


def test_deadletters_on_an_empty_store(run: Run) -> None:
    assert run("deadletters", "list") == (0, "no dead letters\n", "")


# -- channels test, triage eval ----------------------------------------------------


async def test_channels_test_reports_each_channel(run: Run, tmp_path: Path, receiver: Receiver) -> None:
    closed = f"http://127.0.0.1:{free_port()}/replies"
    extra = f"""
[[channels]]
name = "partner"
type = "webhook"
secret = "partner-secret-1"
reply_url = "{closed}"

[[channels]]
name = "app"
type = "webhook"
secret = "app-secret-2"
"""
    write_config(tmp_path, receiver.url, extra)
    result = await asyncio.to_thread(cli, tmp_path, "channels", "test")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    web, partner, app = result.stdout.splitlines()
    assert web == "web: OK reply_url reachable (HTTP 200)"
    assert partner.startswith("partner: FAIL reply_url unreachable: ")
    assert app == "app: OK pull mode: clients fetch GET /channels/app/outbound"
    assert "secret" not in result.stdout + result.stderr
    for name, line in [("web", web), ("app", app)]:
        assert await asyncio.to_thread(run, "channels", "test", name) == (0, line + "\n", "")
    code, _, err = await asyncio.to_thread(run, "channels", "test", "mail")
    assert code == 1 and err.endswith("channels: no channel named 'mail'\n")


async def test_channels_test_fails_a_redirecting_reply_url(tmp_path: Path, receiver: Receiver) -> None:
    """Deliveries do not follow redirects, so `channels test` must not call
    such a reply_url reachable."""

    async with redirecting(receiver.url) as url:
        write_config(tmp_path, url)
        result = await asyncio.to_thread(cli, tmp_path, "channels", "test")
    assert result.returncode == 1
    assert result.stdout.startswith("web: FAIL reply_url redirects (HTTP 302)")


def test_triage_eval_json_is_one_object(tmp_path: Path) -> None:
    result = cli(tmp_path, "triage", "eval", str(SAMPLE), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    report = json.loads(result.stdout)
    assert {"n", "urgency_accuracy", "category_accuracy", "per_urgency", "per_category", "confusion"} <= set(
        report
    )
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    assert report["n"] == len(lines) == len(report["predictions"])
    assert set(report["per_urgency"]["critical"]) == {"precision", "recall", "support"}
    assert set(report["predictions"][0]) == {"urgency", "category", "reason"}
    assert report["predictions"][0]["urgency"] == lines[0]["urgency"]


# -- one store for the CLI and a daemon in the same directory -----------------------


async def test_cli_and_a_config_less_daemon_share_var_router_db(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, added, _ = await asyncio.to_thread(run, "agents", "add", "bob", "--team", "support")
    [token] = TOKEN.findall(added)
    assert (tmp_path / "var" / "router.db").is_file()

    daemon = Daemon(configuration.load())
    sock = free_socket()
    await daemon.start(sock)
    try:
        printed = capsys.readouterr().out
        assert "admin agent created" not in printed  # it found bob in the same store
        secret = (tmp_path / "var" / "secrets" / "web.secret").read_text().strip()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        body = json.dumps({"id": "c-1", "from": {"id": "ann"}, "text": "my deposit is missing"}).encode()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/channels/web/inbound", data=body, headers=signed_headers(body, secret)
            ) as r:
                assert r.status == 202
            async with http.get(
                f"{base}/api/v1/conversations", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == 200  # bob's token, made by the CLI, works on the daemon
        for _ in range(200):
            if await daemon.store.inbound_backlog() == 0:
                break
            await asyncio.sleep(0.02)
        inbox = await asyncio.to_thread(cli, tmp_path, "inbox")
        assert inbox.returncode == 0 and inbox.stdout.startswith("T-000001 "), inbox
    finally:
        await daemon.stop()
