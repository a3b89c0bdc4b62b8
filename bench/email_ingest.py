"""Email ingest benchmark: 1,000 mails from Dovecot into the inbox, against a raw fetch.

    python bench/email_ingest.py [--messages 1000]

Loopback only, in one run, on a Dovecot started for the occasion (the tests'
tests/services.py, in a temp dir; needs the Debian package dovecot-imapd):

1. the mails (the test corpus, tests/data/email, each made unique with its
   own Message-ID, cycled to --messages) are appended to a staging folder;
2. ours: `python -m router run` (SQLite in a temp dir, one email channel on
   IDLE, acks off: this measures ingest, not SMTP) starts on the empty
   INBOX; once it is ready the mails are moved into INBOX with one UID MOVE,
   and the clock runs until every mail is durably queued ("queued") and
   until every one is a conversation in the inbox ("inbox"), read from the
   SQLite file;
3. raw: a plain imaplib loop logs in and fetches the same mails
   (`UID FETCH BODY.PEEK[]`, 100 per command) and does nothing else; then
   the same loop handing each mail to the standard library's MIME parser
   (`policy.default`) and dropping the result, which shows how much of our
   time parsing alone takes.

Prints the rates, `ratio ours/raw` (goal >= 0.5) and `ratio ours/(raw +
parse)`. The daemon, Dovecot and this script share the machine's cores:
compare runs, not single digits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import urllib.request  # noqa: E402
from email import policy  # noqa: E402
from email.parser import BytesParser  # noqa: E402

from tests.services import Dovecot, free_port  # noqa: E402

CORPUS = REPO / "tests" / "data" / "email"
BATCH = 100
TIMEOUT_S = 300.0


def mails(count: int) -> list[bytes]:
    """The corpus cycled to `count`, each with a Message-ID of its own first
    (the parser takes the first one), so none is a duplicate of another."""
    corpus = [path.read_bytes() for path in sorted(CORPUS.glob("*.eml"))]
    return [b"Message-ID: <bench-%d@bench.example>\r\n" % i + corpus[i % len(corpus)] for i in range(count)]


def config(directory: Path, dovecot: Dovecot, user: str, password: str) -> Path:
    path = directory / "router.toml"
    login = f'username = "{user}", password = "{password}"'
    path.write_text(
        f"""
[store]
url = "sqlite:///{directory}/router.db"

[[channels]]
name = "mail"
type = "email"
from_address = "Bench <bench@example.com>"
imap = {{ host = "127.0.0.1", port = {dovecot.port}, security = "none", {login} }}
smtp = {{ host = "127.0.0.1", port = 25, security = "none" }}

[[teams]]
name = "support"

[acks]
enabled = false
"""
    )
    return path


def wait_ready(port: int, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the daemon did not get ready")


def count(database: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            return int(db.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def ours(directory: Path, dovecot: Dovecot, user: str, password: str, total: int) -> tuple[float, float]:
    """(seconds until all queued, seconds until all in the inbox) after the move."""
    port = free_port()
    env = {**os.environ, "ROUTER_LISTEN": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    with (directory / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "router", "run", "-c", str(config(directory, dovecot, user, password))],
            cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_ready(port, daemon, directory / "daemon.log")
        time.sleep(1.0)  # the mailbox loop is connected and idling
        imap = dovecot.client(user)
        imap.select("Staging")
        began = time.monotonic()
        status, answer = imap.uid("MOVE", "1:*", "INBOX")
        assert status == "OK", answer
        imap.logout()
        database, queued_s = directory / "router.db", 0.0
        while time.monotonic() - began < TIMEOUT_S:
            if (
                not queued_s
                and count(database, "SELECT COUNT(*) FROM messages WHERE direction = 'in'") >= total
            ):
                queued_s = time.monotonic() - began
            if count(database, "SELECT COUNT(*) FROM conversations") >= total:
                return queued_s or time.monotonic() - began, time.monotonic() - began
            time.sleep(0.02)
        log = (directory / "daemon.log").read_text()[-2000:]
        raise RuntimeError(f"not everything reached the inbox in {TIMEOUT_S:g} s:\n{log}")
    finally:
        daemon.terminate()
        daemon.wait(timeout=15)


def raw(dovecot: Dovecot, user: str, total: int, parse: bool = False) -> float:
    """A plain imaplib loop: log in, fetch every mail, keep nothing; with
    `parse`, also hand each to the standard library's parser (policy.default),
    which shows what MIME parsing alone costs."""
    parser = BytesParser(policy=policy.default)
    began = time.monotonic()
    imap = dovecot.client(user)
    imap.select("INBOX", readonly=True)
    _, found = imap.uid("SEARCH", "ALL")
    uids = found[0].split()
    fetched = 0
    for start in range(0, len(uids), BATCH):
        chunk = uids[start : start + BATCH]
        _, data = imap.uid("FETCH", b"%s:%s" % (chunk[0], chunk[-1]), "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                fetched += 1
                if parse:
                    parser.parsebytes(item[1])
    imap.logout()
    assert fetched == total, f"raw fetch got {fetched} of {total}"
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dv-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="bench-email-"))
    dovecot = Dovecot(root)
    try:
        dovecot.setup()
        dovecot.start()
        user, password = dovecot.new_user()
        imap = dovecot.client(user)
        imap.create("Staging")
        for mail in mails(args.messages):
            status, answer = imap.append("Staging", None, None, mail)
            assert status == "OK", answer
        imap.logout()
        size = sum(len(mail) for mail in mails(args.messages)) / 1024
        print(
            f"{args.messages} mails, {size:.0f} KiB, cycling the {len(list(CORPUS.glob('*.eml')))} test mails"
        )
        queued_s, inbox_s = ours(work, dovecot, user, password, args.messages)
        raw_s = raw(dovecot, user, args.messages)
        parsed_s = raw(dovecot, user, args.messages, parse=True)
        print(f"raw imaplib fetch: {raw_s:6.2f} s  {args.messages / raw_s:7.0f} mails/s")
        print(f"  + stdlib parse:  {parsed_s:6.2f} s  {args.messages / parsed_s:7.0f} mails/s")
        print(f"ours, queued:      {queued_s:6.2f} s  {args.messages / queued_s:7.0f} mails/s")
        print(f"ours, in inbox:    {inbox_s:6.2f} s  {args.messages / inbox_s:7.0f} mails/s")
        print(f"ratio ours/raw: {raw_s / inbox_s:.2f} (inbox), {raw_s / queued_s:.2f} (queued); goal >= 0.5")
        print(
            f"ratio ours/(raw + parse): {parsed_s / inbox_s:.2f} (inbox), {parsed_s / queued_s:.2f} (queued)"
        )
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
