"""The `support-router` command: argument parsing, exit codes, one-line errors.

Every command reads the same config as the daemon and works on the store
directly, so the CLI and a daemon in the same directory share one store.
Exit codes: 0 ok, 1 a failure the user can fix, 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

from router import agents, logs
from router import config as configuration
from router.config import Config
from router.errors import ConfigError, DeliveryFailure, RouterError
from router.model import Conversation, Presence, Role
from router.store import Store, mask_url, open_store

Command = Callable[[argparse.Namespace, Config], Awaitable[int]]


def main(argv: list[str] | None = None) -> int:
    """Run one command. Without --debug every error is one line on stderr
    (a config error, one line per problem), never a traceback: users paste
    that line into tickets, and a traceback may carry a secret."""
    args = parser().parse_args(argv)
    logs.setup(args.debug)
    if not getattr(args, "handler", None):
        parser().print_usage(sys.stderr)
        return 2
    try:
        config = configuration.load(args.config)
        return asyncio.run(args.handler(args, config))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, ConfigError):
            lines = exc.problems
        elif isinstance(exc, RouterError | OSError | ValueError):
            lines = [f"error: {exc}"]
        else:
            lines = [f"error: unexpected {type(exc).__name__}: {exc} (--debug shows where)"]
        for line in lines:
            print(logs.REDACT.scrub(line), file=sys.stderr)
        return 1


async def _with_store(config: Config, work: Callable[[Store], Awaitable[int]]) -> int:
    store = open_store(config.settings.store.url)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


async def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from router import daemon

    for warning in config.warnings:
        logging.getLogger("router.config").warning(warning)
    await daemon.run(config)
    return 0


async def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    """Validate only: the rule files are compiled as `run` would, but no
    store or channel is contacted, so it works before Redis is up."""
    from router import triage

    s = config.settings
    triage.load_rules([config.path(p) for p in s.triage.rules])
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"config: {config.source}")
    print(f"store: {mask_url(s.store.url)}")
    print(f"listen: {s.server.listen}")
    print(f"channels: {', '.join(f'{c.name} ({c.type})' for c in s.channels) or 'none'}")
    print(f"teams: {', '.join(f'{t.name} ({t.assignment})' for t in s.teams)}")
    routes = [f"{_describe(r.match)} -> {r.team}" for r in s.routes]
    print(f"routes: {len(routes)}" + (f" ({'; '.join(routes)})" if routes else ""))
    return 0


def _describe(match: dict[str, Any]) -> str:
    if not match:
        return "everything else"
    return " and ".join(f"{k}={v if isinstance(v, str) else '|'.join(v)}" for k, v in match.items())


async def cmd_channels_test(args: argparse.Namespace, config: Config) -> int:
    from router.daemon import build_channels

    channels = build_channels(config)
    if args.name and args.name not in channels:
        raise ConfigError([f"{config.source}: channels: no channel named {args.name!r}"])
    failed = 0
    for name, channel in channels.items():
        if args.name and name != args.name:
            continue
        try:
            print(f"{name}: OK {await channel.check()}")
        except DeliveryFailure as exc:
            failed += 1
            print(f"{name}: FAIL {logs.REDACT.scrub(str(exc))}")
        except Exception as exc:  # one broken adapter must not hide the others' results
            failed += 1
            print(f"{name}: FAIL {type(exc).__name__}: {logs.REDACT.scrub(str(exc))}")
        finally:
            await channel.close()
    return 1 if failed else 0


async def cmd_agents(args: argparse.Namespace, config: Config) -> int:
    from router.desk import Desk

    async def work(store: Store) -> int:
        if args.action == "add":
            _known_teams(config, args.team)
            token = await agents.create(store, args.name, args.team, Role(args.role))
            print(f"agent {args.name} created; its API token (shown once): {token}")
            # New agents are available: they take up what waits unassigned in their teams.
            if taken := await Desk(store, config).set_presence(args.name, Presence.AVAILABLE):
                print(f"assigned {len(taken)} waiting conversation(s) by their teams' strategies")
        elif args.action == "token":
            print(f"new API token for {args.name} (shown once): {await agents.rotate(store, args.name)}")
        elif args.action == "remove":
            moved = await Desk(store, config).remove_agent(args.name)
            print(f"agent {args.name} removed{_where_they_went(moved)}")
        elif args.action == "presence":
            moved = await Desk(store, config).set_presence(args.name, Presence(args.presence))
            print(f"{args.name} is {args.presence}{_where_they_went(moved)}")
        else:
            for agent in await store.list_agents():
                print(f"{agent.name}\t{agent.role.value}\t{agent.presence.value}\t{','.join(agent.teams)}")
        return 0

    return await _with_store(config, work)


def _where_they_went(moved: list[Conversation]) -> str:
    """Says where handed-back conversations went ("; reassigned 2, back in
    the team queue 1"): when nobody else is available, they wait unassigned."""
    assigned = sum(1 for conversation in moved if conversation.assignee is not None)
    queued = len(moved) - assigned
    said = [f"reassigned {assigned}"] * bool(assigned) + [f"back in the team queue {queued}"] * bool(queued)
    return f"; {', '.join(said)}" if said else ""


def _known_teams(config: Config, teams: list[str]) -> None:
    if unknown := [t for t in teams if config.team(t) is None]:
        known = ", ".join(t.name for t in config.settings.teams)
        raise RouterError(f"--team: no team named {unknown[0]!r} (teams: {known})")


async def cmd_inbox(args: argparse.Namespace, config: Config) -> int:
    """A misspelt team or agent would show an empty inbox, which reads as
    "nothing to do": refuse it instead."""
    from router.model import InboxQuery

    _known_teams(config, [args.team] if args.team else [])

    async def work(store: Store) -> int:
        if args.mine and await store.get_agent(args.agent) is None:
            raise RouterError(f"no agent {args.agent!r} (see `support-router agents list`)")
        query = InboxQuery(team=args.team, assignee=args.agent if args.mine else None, limit=500)
        rows: list[dict[str, Any]] = []
        while True:
            page = await store.list_conversations(query)
            rows += [c.to_dict() for c in page.conversations]
            if not page.next_cursor:
                break
            query.cursor = page.next_cursor
        if args.json:
            print(json.dumps({"conversations": rows}, ensure_ascii=False))
            return 0
        for c in rows:
            print(
                f"{c['ref']}  {c['urgency']:<8} {c['category']:<14} {c['team'] or '-':<10} "
                f"{c['assignee'] or '-':<10} due {c['first_response_due']}  {_one_line(c['subject'] or '')}"
            )
        if not rows:
            print("no open conversations")
        return 0

    return await _with_store(config, work)


def _one_line(text: str) -> str:
    """A customer's text on the agent's terminal: no line breaks that forge
    rows, no escape sequences that drive the terminal."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


async def cmd_reply(args: argparse.Namespace, config: Config) -> int:
    from router.desk import Desk

    async def work(store: Store) -> int:
        agent = await store.get_agent(args.agent)
        if agent is None:
            raise RouterError(f"no agent {args.agent!r} (see `support-router agents list`)")
        message = await Desk(store, config).reply(args.ref, agent, args.text)
        print(f"queued {message.id}; the running daemon delivers it")
        return 0

    return await _with_store(config, work)


async def cmd_triage_eval(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from router import triage, triage_eval

    rules = triage.load_rules([config.path(p) for p in config.settings.triage.rules])
    result = triage_eval.evaluate(Path(args.file), rules)
    print(json.dumps(result, ensure_ascii=False) if args.json else triage_eval.format_report(result))
    return 0


async def cmd_deadletters(args: argparse.Namespace, config: Config) -> int:
    async def work(store: Store) -> int:
        if args.action == "retry":
            if not await store.retry_dead_letter(args.id):
                raise RouterError(f"no retryable dead letter {args.id!r}")
            print(f"{args.id} queued again")
            return 0
        dead_letters = await store.list_dead_letters()
        for dead in dead_letters:
            print(f"{dead.id}\t{dead.channel}\t{dead.attempts}\t{dead.error}")
        if not dead_letters:
            print("no dead letters")
        return 0

    return await _with_store(config, work)


def _agent_name(name: str) -> str:
    """Names are typed in `--agent`, shown in tab-separated lists and sent
    in the API's assign calls: no blanks, separators or empty names."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise argparse.ArgumentTypeError(f"{name!r}: use letters, digits, . _ @ - (at most 64)")
    return name


def _common(default: Any) -> argparse.ArgumentParser:
    """`-c` and `--debug` work before or after the command; the command's own
    copy must not overwrite a value given before it, hence SUPPRESS."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=default, help="config file ($ROUTER_CONFIG, ./router.toml)")
    common.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    return common


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="support-router", parents=[_common(argparse.SUPPRESS)])
    top.set_defaults(config=None, debug=False)
    common = _common(argparse.SUPPRESS)
    sub = top.add_subparsers(metavar="COMMAND")

    def command(name: str, handler: Command, help_text: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(handler=handler)
        return p

    command("run", cmd_run, "run the daemon")
    command("check-config", cmd_check_config, "validate the config")
    channels = sub.add_parser("channels", parents=[common], help="channel tools").add_subparsers(
        metavar="ACTION", required=True
    )
    command("test", cmd_channels_test, "connect each channel", channels).add_argument("name", nargs="?")

    agent_cmds = sub.add_parser("agents", parents=[common], help="manage agents").add_subparsers(
        dest="action", required=True
    )
    add = command("add", cmd_agents, "create an agent, print its token", agent_cmds)
    add.add_argument("name", type=_agent_name)
    add.add_argument("--team", action="append", required=True)
    add.add_argument("--role", choices=[r.value for r in Role], default="agent")
    command("list", cmd_agents, "list agents", agent_cmds)
    command("remove", cmd_agents, "remove an agent", agent_cmds).add_argument("name")
    command("token", cmd_agents, "rotate an agent's token", agent_cmds).add_argument("name")
    presence = command("presence", cmd_agents, "set available or away", agent_cmds)
    presence.add_argument("name")
    presence.add_argument("presence", choices=[p.value for p in Presence])

    inbox = command("inbox", cmd_inbox, "open conversations in inbox order")
    inbox.add_argument("--team")
    inbox.add_argument("--mine", action="store_true")
    inbox.add_argument("--json", action="store_true")
    inbox.add_argument("--agent", default="admin")
    reply = command("reply", cmd_reply, "send an agent reply")
    reply.add_argument("ref")
    reply.add_argument("text")
    reply.add_argument("--agent", default="admin")

    triage = sub.add_parser("triage", parents=[common], help="triage tools").add_subparsers(
        metavar="ACTION", required=True
    )
    evaluate = command("eval", cmd_triage_eval, "score triage on labeled JSONL", triage)
    evaluate.add_argument("file")
    evaluate.add_argument("--json", action="store_true")

    dead = sub.add_parser("deadletters", parents=[common], help="messages that failed").add_subparsers(
        dest="action", required=True
    )
    command("list", cmd_deadletters, "list dead letters", dead)
    command("retry", cmd_deadletters, "queue one again", dead).add_argument("id")
    return top
