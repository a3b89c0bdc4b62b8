"""Outbound mail: build the reply, hand it to the SMTP server.

Every mail we send threads under the customer's (`In-Reply-To`,
`References`, `Re:` subject with the ticket ref), has our own Message-ID
derived from the outbound message id (the same on every retry, so a
retried send is recognisable and a bounce or answer can be matched), and
carries our loop header; acks also say `Auto-Submitted: auto-replied`.

A customer's address need not be ASCII (RFC 6530): an IDN domain goes as
its A-label when the local part is ASCII, so any server takes it; a UTF-8
local part needs a server offering SMTPUTF8 (RFC 6531), which aiosmtplib
asks for by itself when an address needs it.

aiosmtplib's errors are translated here: a 5xx answer about the message or
its recipient fails it for good with the server's words; 4xx answers,
timeouts, refused connections and a failed login (a config problem someone
will fix) are retried by the outbox with backoff. A server without SMTPUTF8
for an address that needs it fails the message for good: retrying will not
change what the server offers.
"""

from __future__ import annotations

import html
import re
from email import policy
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr, unquote
from typing import TYPE_CHECKING

import aiosmtplib

from channels.email.imap import tls_context
from channels.email.parse import Identity
from router.conversations import REF_IN_SUBJECT
from router.errors import PermanentFailure, TemporaryFailure
from router.model import Conversation, Kind, Message

if TYPE_CHECKING:
    from channels.email import SmtpSettings

LOOP_HEADER = "X-Support-Router-Loop"
_REPLY_PREFIX = re.compile(r"^\s*(?:re|aw|sv|回复|回覆)\s*[:：]", re.IGNORECASE)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def reply_subject(subject: str | None, ref: str) -> str:
    """`Re: <subject> [T-000123]`: one `Re:`, the ref once."""
    subject = " ".join((subject or "").split())
    if not _REPLY_PREFIX.match(subject):
        subject = f"Re: {subject}".rstrip()
    if ref and not REF_IN_SUBJECT.search(subject):
        subject = f"{subject} [{ref}]"
    return subject


def build(
    message: Message, conversation: Conversation, from_address: str, identity: Identity
) -> EmailMessage:
    """The reply as a MIME message: text/plain plus a simple HTML part."""
    recipient = message.recipient or conversation.customer
    address = recipient.address or (recipient.id if "@" in recipient.id else "")
    if not address:
        raise PermanentFailure(f"no email address for {recipient.id!r}")
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = from_address
    try:
        mail["To"] = _recipient(_one_line(recipient.name or ""), address)
    except (ValueError, IndexError, HeaderParseError) as exc:  # UnicodeError is a ValueError
        raise PermanentFailure(f"invalid recipient address {address!r}: {exc}") from None
    mail["Subject"] = reply_subject(conversation.subject or message.subject, conversation.ref)
    mail["Date"] = format_datetime(message.received_at)
    mail["Message-ID"] = identity.message_id(message.id)
    thread = [_header_id(ref, identity) for ref in (conversation.thread_key, message.in_reply_to) if ref]
    thread = [ref for ref in dict.fromkeys(thread) if ref]
    if message.in_reply_to:
        mail["In-Reply-To"] = _header_id(message.in_reply_to, identity)
    if thread:
        mail["References"] = " ".join(thread)
    if message.kind is Kind.ACK:
        mail["Auto-Submitted"] = "auto-replied"
        mail["X-Auto-Response-Suppress"] = "All"
    mail[LOOP_HEADER] = identity.loop_id
    mail.set_content(message.text)
    mail.add_alternative(_html(message.text), subtype="html")
    return mail


def _recipient(name: str, address: str) -> Address:
    """The customer's address for the To header, and so the envelope.

    An IDN domain becomes its A-label (punycode) when the local part is
    ASCII, so the mail needs no SMTPUTF8. Not when the stdlib's IDNA 2003
    codec would name another domain (it maps `faß.de` to `fass.de`, which
    IDNA 2008 keeps apart): such a domain, like a UTF-8 local part, is sent
    as written, over SMTPUTF8. The stdlib parser calls any non-ASCII local
    part a defect, so it is checked with those characters standing in as
    ASCII letters: RFC 6532 allows them exactly where atext and qtext go.
    """
    local, _, domain = address.rpartition("@")
    a_label = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    checked = Address(name, addr_spec=f"{_NON_ASCII.sub('a', local)}@{a_label}")
    same_domain = domain.isascii() or a_label.encode("ascii").decode("idna") == domain.lower()
    if local.isascii() and same_domain:
        return Address(name, checked.username, a_label)
    return Address(name, unquote(local), domain)


def _header_id(value: str, identity: Identity) -> str:
    """Customer Message-IDs are stored as sent (`<…>`); ours by message id."""
    if value.startswith("<") and value.endswith(">"):
        return value
    return identity.message_id(value) if value.startswith("m_") else ""


def _one_line(value: str) -> str:
    return " ".join(value.split())[:200]


def _html(text: str) -> str:
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    body = "\n".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)
    return f'<!DOCTYPE html>\n<html><body style="font-family: sans-serif">\n{body}\n</body></html>\n'


def _client_options(settings: SmtpSettings) -> dict[str, object]:
    options: dict[str, object] = {
        "hostname": settings.host,
        "port": settings.port,
        "timeout": settings.timeout_s,
        "use_tls": settings.security == "tls",
        "start_tls": settings.security == "starttls",
    }
    if settings.security != "none":
        options["tls_context"] = tls_context(settings.ca_file)
    if settings.username:
        options["username"] = settings.username
        options["password"] = settings.password.get_secret_value() if settings.password else ""
    return options


async def deliver(mail: EmailMessage, settings: SmtpSettings) -> None:
    """Send one mail; raises TemporaryFailure or PermanentFailure."""
    sender = parseaddr(str(mail["From"]))[1]
    where = f"SMTP {settings.host}:{settings.port}"
    try:
        await aiosmtplib.send(mail, sender=sender, **_client_options(settings))  # type: ignore[arg-type]
    except aiosmtplib.SMTPRecipientsRefused as exc:
        raise _answer(where, exc.recipients[0].code, exc.recipients[0].message) from None
    except aiosmtplib.SMTPNotSupported:
        addresses = [sender, *(to.addr_spec for to in mail["To"].addresses)]
        utf8 = ", ".join(address for address in addresses if not address.isascii())
        raise PermanentFailure(f"{where} does not offer SMTPUTF8 (RFC 6531), which {utf8} needs") from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise TemporaryFailure(
            f"{where}: login as {settings.username} failed: {exc.code} {exc.message}"
        ) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise _answer(where, exc.code, exc.message) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise TemporaryFailure(f"{where}: {type(exc).__name__}: {exc}") from None


def _answer(where: str, code: int, text: str) -> TemporaryFailure | PermanentFailure:
    reply = f"{where} answered {code} {' '.join(text.split())}"
    return PermanentFailure(reply) if 500 <= code < 600 else TemporaryFailure(reply)


async def check(settings: SmtpSettings) -> str:
    """`channels test`: connect, EHLO (STARTTLS), log in, quit."""
    options = _client_options(settings)
    username, password = options.pop("username", None), options.pop("password", None)
    client = aiosmtplib.SMTP(**options)  # type: ignore[arg-type]
    where = f"SMTP {settings.host}:{settings.port}"
    try:
        await client.connect()
        if username:
            await client.login(str(username), str(password))
        await client.quit()
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise PermanentFailure(f"{where}: login as {username} failed: {exc.code} {exc.message}") from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise TemporaryFailure(f"{where}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    return f"{where} ready ({settings.security})"
