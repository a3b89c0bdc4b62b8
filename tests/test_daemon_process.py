"""The daemon as a real process: first start, signals, and kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from tests.conftest import SECRET, Receiver, free_port, signed_headers, write_config

REPO = Path(__file__).resolve().parents[1]


def spawn(cwd: Path, port: int, *args: str) -> subprocess.Popen[str]:
    """Output goes to files: a pipe nobody reads would block a chatty daemon."""
    env = {**os.environ, "ROUTER_LISTEN": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    env.pop("ROUTER_CONFIG", None)
    out = (cwd / "daemon.out").open("w")
    err = (cwd / "daemon.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "run", *args], cwd=cwd, env=env, stdout=out, stderr=err, text=True
    )
    out.close()
    err.close()
    return proc


async def wait_ready(port: int, proc: subprocess.Popen[str], within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "daemon exited early"
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("daemon did not become ready")


def stop(proc: subprocess.Popen[str], cwd: Path) -> tuple[int, float, str, str]:
    """SIGTERM; the exit code, how long it took, and what it printed."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    took = time.monotonic() - began
    return proc.returncode, took, (cwd / "daemon.out").read_text(), (cwd / "daemon.err").read_text()


async def test_first_start_on_builtin_defaults_prints_token_and_secret_once(tmp_path: Path) -> None:
    port = free_port()
    proc = spawn(tmp_path, port)
    await wait_ready(port, proc)
    code, took, out, err = stop(proc, tmp_path)
    assert code == 0 and took < 10
    assert "admin agent created" in out and "srt_" in out
    assert "webhook secret for channel 'web'" in out
    assert (tmp_path / "var" / "router.db").exists()
    assert "channel web (webhook) started" in err and f"http://127.0.0.1:{port}/" in err
    token = out.split("(shown once): ")[1].split()[0]
    assert token not in err

    proc = spawn(tmp_path, port)
    await wait_ready(port, proc)
    code, _, out, _ = stop(proc, tmp_path)
    assert code == 0 and "shown once" not in out


async def test_secrets_stay_out_of_debug_logs(tmp_path: Path, receiver: Receiver) -> None:
    config = write_config(tmp_path, receiver.url)
    port = free_port()
    proc = spawn(tmp_path, port, "-c", str(config), "--debug")
    await wait_ready(port, proc)
    token = (tmp_path / "daemon.out").read_text().split("(shown once): ")[1].split()[0]
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}"
        body = json.dumps({"id": "x", "from": {"id": "u"}, "text": "hi"}).encode()
        bad = {**signed_headers(body), "X-Router-Signature": "sha256=" + "f" * 64}
        await (await http.post(f"{url}/channels/web/inbound", data=body, headers=bad)).read()
        await (await http.post(f"{url}/channels/web/inbound", data=body, headers=signed_headers(body))).read()
        auth = {"Authorization": f"Bearer {token}"}
        await (await http.get(f"{url}/api/v1/conversations?cursor=zzz", headers=auth)).read()
        await receiver.wait_for(1, kind="ack")
    _, _, _, err = stop(proc, tmp_path)
    assert "DEBUG" in err
    assert SECRET not in err and token not in err


async def test_sigterm_mid_traffic_exits_cleanly_and_loses_nothing(
    tmp_path: Path, receiver: Receiver
) -> None:
    await interrupt_mid_stream(
        tmp_path, receiver, lambda proc: (done := stop(proc, tmp_path))[0] == 0 and done[1] < 10
    )


async def test_kill_9_mid_stream_loses_nothing_and_acks_once(tmp_path: Path, receiver: Receiver) -> None:
    await interrupt_mid_stream(tmp_path, receiver, lambda proc: proc.kill() or proc.wait() is not None)


async def interrupt_mid_stream(tmp_path: Path, receiver: Receiver, interrupt) -> None:
    """500 messages; the daemon is interrupted once 200 are accepted, while
    requests are in flight; the client re-sends what got no answer after
    the restart, as a real client would."""
    config = write_config(tmp_path, receiver.url)
    port = free_port()
    ids = [f"k-{i}" for i in range(500)]
    accepted: list[str] = []
    proc = spawn(tmp_path, port, "-c", str(config))
    await wait_ready(port, proc)
    sending = asyncio.create_task(send(port, ids, accepted))
    while len(accepted) < 200 and not sending.done():
        await asyncio.sleep(0.002)
    began = time.monotonic()
    assert interrupt(proc)
    assert time.monotonic() - began < 10
    await sending
    proc = spawn(tmp_path, port, "-c", str(config))
    await wait_ready(port, proc)
    try:
        await send(port, [i for i in ids if i not in set(accepted)], accepted)
        assert sorted(set(accepted)) == sorted(ids)
        await assert_each_once(port, tmp_path, accepted, receiver)
    finally:
        stop(proc, tmp_path)


async def send(port: int, ids: list[str], accepted: list[str]) -> None:
    """POST messages 20 at a time from 50 customers; ids answered 202/200
    are appended to `accepted`."""
    async with aiohttp.ClientSession() as http:

        async def one(message_id: str) -> None:
            customer = int(message_id.split("-")[1]) % 50
            body = json.dumps(
                {"id": message_id, "from": {"id": f"cust-{customer}"}, "text": f"fee question {message_id}"}
            ).encode()
            try:
                url = f"http://127.0.0.1:{port}/channels/web/inbound"
                async with http.post(url, data=body, headers=signed_headers(body)) as resp:
                    if resp.status in (200, 202):
                        accepted.append(message_id)
            except aiohttp.ClientError:
                pass

        for start in range(0, len(ids), 20):
            await asyncio.gather(*(one(i) for i in ids[start : start + 20]))


async def assert_each_once(port: int, cwd: Path, accepted: list[str], receiver: Receiver) -> None:
    """Every accepted message in the inbox exactly once; one ack (delivery
    id) per conversation."""
    token = await admin_token(cwd)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        base = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 30
        while True:
            async with http.get(f"{base}/conversations?status=all&limit=500") as resp:
                conversations = (await resp.json())["conversations"]
            seen: list[str] = []
            acked = 0
            for conv in conversations:
                async with http.get(f"{base}/conversations/{conv['ref']}") as resp:
                    messages = (await resp.json())["messages"]
                seen += [m["external_id"] for m in messages if m["direction"] == "in"]
                acked += sum(1 for m in messages if m["kind"] == "ack" and m["delivery"]["status"] == "sent")
            if (len(seen) >= len(accepted) and acked == len(conversations)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
    assert sorted(seen) == sorted(set(seen)), "a message shows twice"
    assert set(accepted) <= set(seen), f"lost {sorted(set(accepted) - set(seen))[:5]}"
    per_conversation: dict[str, set[str]] = defaultdict(set)
    for delivery in receiver.delivered(kind="ack"):
        per_conversation[delivery["conversation_ref"]].add(delivery["id"])
    assert len(conversations) == 50
    assert {ref: len(ids) for ref, ids in per_conversation.items()} == {c["ref"]: 1 for c in conversations}


async def admin_token(cwd: Path) -> str:
    """The token printed on first start is gone with that process; rotate it
    through the CLI, as an operator would."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "agents",
        "token",
        "admin",
        "-c",
        str(cwd / "router.toml"),
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode().split("(shown once): ")[1].split()[0]
