"""Real servers for the tests, each on a free loopback port in a temp dir.

Tests never talk to a server they did not start, and never skip when one is
missing: a missing binary fails with the Debian package that provides it.

Redis runs with `appendonly yes` and `appendfsync everysec`. Every write is
in the append-only file (the kernel's page cache) before Redis answers it,
so killing or restarting redis-server, which is what the tests do, loses
nothing acknowledged; `always` would add an fsync per write, which only a
power cut of the host needs, and a shared two-core CI machine pays for.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import functools
import grp
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.store.redis import RedisStore

READY_S = 20.0
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str, package: str) -> str:
    """Looks in sbin too: Debian installs daemons there (/usr/sbin/dovecot)
    and leaves it out of an unprivileged user's PATH."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} (the Debian package {package})")
    return found


@dataclass
class RedisServer:
    """One redis-server process. `start()` after `kill()` or `stop()` brings it
    back on the same port with the same data, as an operator's restart would."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def url(self, prefix: str) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0?prefix={prefix}"

    def start(self) -> None:
        command = [
            binary("redis-server", "redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--requirepass", self.password,
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, args=(self.process, ready), daemon=True)
        self._reader.start()
        if not ready.wait(READY_S) or self.process.poll() is not None:
            self.kill()
            raise AssertionError("redis-server did not start:\n" + "\n".join(self.log[-20:]))

    def _drain(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        """Reads the log as it comes, so the pipe never fills, and says when
        Redis accepts connections (after it has loaded its append-only file)."""
        assert process.stdout is not None
        for line in process.stdout:
            self.log.append(line.rstrip())
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RedisServer]]:
    """A factory: each call starts one more redis-server for this test."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for tests that only need fresh data: each uses its own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_pair(shared_redis: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one prefix, each with its own pool: two daemons' view."""
    url = shared_redis.url(f"pair-{uuid.uuid4().hex[:12]}")
    one, two = RedisStore(url), RedisStore(url)
    await one.open()
    await two.open()
    yield one, two
    await one.close()
    await two.close()


# -- mail: Dovecot (IMAP) and an aiosmtpd peer ----------------------------------

DOVECOT_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
mail_location = maildir:{root}/mail/%u
mail_fsync = never
mail_max_userip_connections = 200
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={root}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


@dataclass
class Dovecot:
    """One Dovecot with its own config, passwd-file, maildirs and self-signed
    certificate (`ca_file`) under a short directory in /tmp: its unix sockets
    live there, and a socket path may not exceed 108 bytes. As root it serves
    mail as `nobody` (Dovecot refuses uid 0), otherwise as the current user.
    `restart()` keeps the port and the mail, as an operator's restart would."""

    root: Path
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    users: dict[str, str] = field(
        default_factory=lambda: {f"box{i:02d}@example.com": f"box-password-{i:02d}" for i in range(64)}
    )
    taken: set[str] = field(default_factory=set)
    process: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> str:
        return str(self.root / "cert.pem")

    def setup(self) -> None:
        self.root.chmod(0o755)  # mkdtemp makes it 0700: nobody could not reach the mail
        (self.root / "mail").mkdir()
        if os.geteuid() == 0:
            user, group = "nobody", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
            os.chown(self.root / "mail", pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        else:
            try:
                user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
            except KeyError:  # a container started with --user 4242, say
                pytest.fail(
                    f"uid {os.getuid()} or gid {os.getgid()} has no name in /etc/passwd or /etc/group: "
                    "Dovecot only runs as a named user (default_internal_user)"
                )
        subprocess.run(
            [binary("openssl", "openssl"), "req", "-x509", "-nodes", "-days", "2",
             "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(self.root / "key.pem"), "-out", self.ca_file],
            check=True, capture_output=True,
        )  # fmt: skip
        config = DOVECOT_CONFIG.format(
            root=self.root, user=user, group=group, port=self.port, tls_port=self.tls_port
        )
        (self.root / "dovecot.conf").write_text(config)
        self._write_users()

    def _write_users(self) -> None:
        """Written once, before start: Dovecot does not reliably notice a
        passwd-file rewritten within the same second, so tests take fresh
        mailboxes from this fixed set (`new_user`) instead of adding users."""
        lines = [f"{name}:{{PLAIN}}{password}\n" for name, password in self.users.items()]
        (self.root / "passwd").write_text("".join(lines))

    def new_user(self) -> tuple[str, str]:
        """A mailbox no test has used yet: (user, password)."""
        name = next(name for name in self.users if name not in self.taken)
        self.taken.add(name)
        return name, self.users[name]

    def start(self) -> None:
        """Output goes to files: a captured pipe nobody reads would hang it."""
        command = [binary("dovecot", "dovecot-imapd"), "-F", "-c", str(self.root / "dovecot.conf")]
        with (self.root / "stdout.log").open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        log = (self.root / "stdout.log").read_text(errors="replace")
        self.stop()
        raise AssertionError(f"dovecot did not start:\n{log[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, user: str) -> imaplib.IMAP4:
        """A plain imaplib session, logged in: how tests deliver mail (APPEND)."""
        imap = imaplib.IMAP4("127.0.0.1", self.port)
        imap.login(user, self.users[user])
        return imap

    def append(self, user: str, *mails: bytes, folder: str = "INBOX") -> None:
        imap = self.client(user)
        try:
            for mail in mails:
                status, answer = imap.append(folder, None, None, mail)
                assert status == "OK", answer
        finally:
            imap.logout()


def _dovecot() -> Iterator[Dovecot]:
    root = Path(tempfile.mkdtemp(prefix="dv-", dir="/tmp"))
    server = Dovecot(root)
    try:
        server.setup()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A Dovecot of this test's own, for tests that restart it."""
    yield from _dovecot()


@pytest.fixture(scope="session")
def shared_dovecot() -> Iterator[Dovecot]:
    """One Dovecot for tests that only need a fresh mailbox: each adds a user
    of its own. Stopping Dovecot takes a second, so this saves one per test."""
    yield from _dovecot()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @functools.cached_property
    def message(self) -> email.message.EmailMessage:
        """Parsed once: tests poll these while the daemon shares their loop."""
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed


@dataclass
class SMTPPeer:
    """aiosmtpd on a free loopback port, recording every mail it accepts.
    Recipients in `reject` get that SMTP reply at RCPT instead (`"550 5.1.1
    no such user"`, `"451 4.3.0 try later"`)."""

    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    reject: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[Received]:
        return [mail for mail in self.received if address in mail.rcpt_tos]

    def matching(self, **headers: str) -> list[Received]:
        """Mails whose headers contain these values (`Auto_Submitted="auto"`)."""
        return [
            mail
            for mail in list(self.received)
            if all(
                value in str(mail.message.get(name.replace("_", "-"), "")) for name, value in headers.items()
            )
        ]

    async def wait_for(self, count: int, within_s: float = 10.0, **headers: str) -> list[Received]:
        """At least `count` matching mails, or whatever matched by then."""
        deadline = time.monotonic() + within_s
        while len(found := self.matching(**headers)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return found


def _smtp_peer(smtputf8: bool) -> Iterator[SMTPPeer]:
    from aiosmtpd.controller import Controller

    peer = SMTPPeer()
    controller = Controller(peer, hostname="127.0.0.1", port=peer.port, enable_SMTPUTF8=smtputf8)
    controller.start()
    yield peer
    controller.stop()


@pytest.fixture
def smtp_peer() -> Iterator[SMTPPeer]:
    """aiosmtpd as it comes: no SMTPUTF8, like many servers still."""
    yield from _smtp_peer(smtputf8=False)


@pytest.fixture
def smtputf8_peer() -> Iterator[SMTPPeer]:
    """aiosmtpd offering SMTPUTF8 (RFC 6531): UTF-8 addresses and headers."""
    yield from _smtp_peer(smtputf8=True)
