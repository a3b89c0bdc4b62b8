"""Email ingest benchmark: 1,000 mails from Dovecot into the inbox, against plain imaplib loops.

    python bench/email.py [--messages 1000]

Loopback only, in one run, on a Dovecot started for the occasion (the tests'
tests/services.py, in a temp dir; needs the Debian package dovecot-imapd):

1. the mails (the test corpus, tests/data/email, each made unique with its
   own Message-ID, cycled to --messages) are appended to a staging folder;
2. ours: `python -m router run` (SQLite in a temp dir, one email channel on
   IDLE, acks off: this measures ingest, not SMTP) starts on the empty
   INBOX; once it is ready the mails are moved into INBOX with one UID MOVE,
   and the clock runs until every mail is durably queued ("queued") and
   until every one is a conversation in the inbox ("inbox"), read from the
   SQLite file; the daemon's CPU time over that window (with its mail parse
   worker processes', also shown on their own) is printed per mail;
3. baselines, plain imaplib loops that log in, select and fetch the same
   mails (`BODY.PEEK[]`) and keep nothing: (a) one `UID FETCH` per mail, the
   loop as most people write it; (b) 100 mails per `UID FETCH`; (c) (b)
   handing each mail to the standard library's MIME parser
   (`policy.default`), which shows what parsing alone costs.

Prints every rate and `ratio ours/baseline` against each (goal >= 0.5). The
daemon, Dovecot and this script share the machine's cores: compare the
ratios of one run, not single digits across runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # Run as a script, bench/ comes first on sys.path, and bench/email.py,
    # redis.py and telegram.py would shadow the packages of those names:
    # import from the repository root instead.
    sys.path[0] = str(REPO)

import argparse
import imaplib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from email import policy
from email.parser import BytesParser

from tests.services import Dovecot, free_port

CORPUS = REPO / "tests" / "data" / "email"
BATCH = 100
TIMEOUT_S = 300.0
QUEUED = "SELECT COUNT(*) FROM messages WHERE direction = 'in'"


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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU, all threads, from /proc: of the process, and of
    its running children (the daemon's mail parse workers)."""
    own = children = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        ticks = int(fields[11]) + int(fields[12])
        if stat.parent.name == str(pid):
            own += ticks
        elif fields[1] == str(pid):
            children += ticks
    return own / os.sysconf("SC_CLK_TCK"), children / os.sysconf("SC_CLK_TCK")


def cpu_since(pid: int, before: tuple[float, float]) -> tuple[float, float]:
    """CPU seconds since `before`: (daemon and its children, children alone)."""
    own, children = cpu_seconds(pid)
    return own + children - sum(before), children - before[1]


class Ours:
    """Seconds (and daemon CPU seconds: all of it, and its workers' share)
    from the move until all are queued and until all are in the inbox."""

    queued_s = inbox_s = 0.0
    queued_cpu_s = inbox_cpu_s = (0.0, 0.0)

    def run(self, directory: Path, dovecot: Dovecot, user: str, password: str, total: int) -> None:
        port = free_port()
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "ROUTER_LISTEN": f"127.0.0.1:{port}", "PYTHONPATH": path}
        settings = config(directory, dovecot, user, password)
        command = [sys.executable, "-m", "router", "run", "-c", str(settings)]
        with (directory / "daemon.log").open("wb") as log:
            daemon = subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, daemon, directory / "daemon.log")
            time.sleep(1.0)  # the mailbox loop is connected and idling
            self._measure(daemon.pid, directory / "router.db", dovecot.client(user), total)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{(directory / 'daemon.log').read_text()[-2000:]}") from None
        finally:
            daemon.terminate()
            daemon.wait(timeout=15)

    def _measure(self, pid: int, database: Path, imap: imaplib.IMAP4, total: int) -> None:
        imap.select("Staging")
        cpu, began = cpu_seconds(pid), time.monotonic()
        status, answer = imap.uid("MOVE", "1:*", "INBOX")
        assert status == "OK", answer
        imap.logout()
        while time.monotonic() - began < TIMEOUT_S:
            if not self.queued_s and count(database, QUEUED) >= total:
                self.queued_s, self.queued_cpu_s = time.monotonic() - began, cpu_since(pid, cpu)
            if count(database, "SELECT COUNT(*) FROM conversations") >= total:
                self.inbox_s, self.inbox_cpu_s = time.monotonic() - began, cpu_since(pid, cpu)
                self.queued_s = self.queued_s or self.inbox_s
                self.queued_cpu_s = self.queued_cpu_s or self.inbox_cpu_s
                return
            time.sleep(0.01)
        raise RuntimeError(f"not everything reached the inbox in {TIMEOUT_S:g} s")


def one_by_one(imap: imaplib.IMAP4, uids: list[bytes], take: Callable[[bytes], object]) -> int:
    """The loop as most people write it: one UID FETCH per mail."""
    fetched = 0
    for uid in uids:
        _, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                take(item[1])
                fetched += 1
    return fetched


def batched(imap: imaplib.IMAP4, uids: list[bytes], take: Callable[[bytes], object]) -> int:
    """BATCH mails per UID FETCH."""
    fetched = 0
    for start in range(0, len(uids), BATCH):
        chunk = uids[start : start + BATCH]
        _, data = imap.uid("FETCH", b"%s:%s" % (chunk[0], chunk[-1]), "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                take(item[1])
                fetched += 1
    return fetched


def baseline(
    dovecot: Dovecot,
    user: str,
    total: int,
    loop: Callable[[imaplib.IMAP4, list[bytes], Callable[[bytes], object]], int],
    take: Callable[[bytes], object],
) -> float:
    """Seconds for a plain imaplib session to log in, select and run `loop`
    over every mail, handing each to `take`."""
    began = time.monotonic()
    imap = dovecot.client(user)
    imap.select("INBOX", readonly=True)
    _, found = imap.uid("SEARCH", "ALL")
    fetched = loop(imap, found[0].split(), take)
    imap.logout()
    assert fetched == total, f"a baseline fetched {fetched} of {total}"
    return time.monotonic() - began


def report(total: int, ours: Ours, baselines: dict[str, float]) -> None:
    print("baselines (plain imaplib: log in, select, fetch BODY.PEEK[]):")
    for name, seconds in baselines.items():
        print(f"  {name:<32} {seconds:6.2f} s  {total / seconds:7.0f} mails/s")
    print("ours (python -m router run, IDLE; UID MOVE of all of them into INBOX):")
    for name, seconds, (cpu, workers) in (
        ("durably queued", ours.queued_s, ours.queued_cpu_s),
        ("conversations in the inbox", ours.inbox_s, ours.inbox_cpu_s),
    ):
        print(
            f"  {name:<32} {seconds:6.2f} s  {total / seconds:7.0f} mails/s"
            f"  (daemon CPU {1000 * cpu / total:.2f} ms/mail, {1000 * workers / total:.2f} of it in"
            " parse workers)"
        )
    print("ratio ours/baseline (goal >= 0.5):")
    for name, seconds in baselines.items():
        print(f"  vs {name:<29} {seconds / ours.inbox_s:6.2f} inbox, {seconds / ours.queued_s:6.2f} queued")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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
        corpus = mails(args.messages)
        for mail in corpus:
            status, answer = imap.append("Staging", None, None, mail)
            assert status == "OK", answer
        imap.logout()
        size = sum(len(mail) for mail in corpus) / 1024
        print(f"{args.messages} mails, {size:.0f} KiB: the {len(list(CORPUS.glob('*.eml')))} test mails")
        ours = Ours()
        ours.run(work, dovecot, user, password, args.messages)
        stdlib = BytesParser(policy=policy.default)
        baselines = {
            "(a) one UID FETCH per mail": baseline(dovecot, user, args.messages, one_by_one, len),
            f"(b) {BATCH} per UID FETCH": baseline(dovecot, user, args.messages, batched, len),
            "(c) (b) + stdlib MIME parse": baseline(dovecot, user, args.messages, batched, stdlib.parsebytes),
        }
        report(args.messages, ours, baselines)
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
