"""One RFC 5322 message (raw bytes) -> one `Message`, whatever shape it is in.

The standard library parses with `policy.default`; everything read from
the result is read defensively (raw header values decoded by our own
lenient code, payloads decoded by `text.decode_bytes`), because broken mail
is normal mail and a crash here would hold up the mailbox. What cannot be
read becomes replacement characters, never an exception: the caller still
dead-letters the raw bytes if anything unforeseen does raise.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import EmailPolicy
from email.utils import parseaddr, parsedate_to_datetime

import nh3

from channels.email import loops
from channels.email.quoting import split_quoted
from channels.email.text import decode_bytes, decode_words, html_to_text, unescape_raw
from channels.email.uuencode import split_uuencoded
from router.model import Attachment, Direction, Kind, Message, Party, new_id, utcnow

MAX_TEXT_CHARS = 100_000
"""Longer text (a pasted log) is cut: the queue carries messages, not files."""
MAX_HTML_CHARS = 500_000
_UNQUOTED_BOUNDARY = re.compile(rb'(boundary=)([^";\s][^;\s]*)', re.IGNORECASE)
_ANGLE_ID = re.compile(r"<([^<>\s]+)>")
_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_SIGNATURES = frozenset(
    {"application/pgp-signature", "application/pkcs7-signature", "application/x-pkcs7-signature"}
)


class _RawPolicy(EmailPolicy):
    """`policy.default` for parsing (EmailMessage, RFC 6532 headers), but a
    header read back from a part is its raw text, unfolded, not an object
    of the header registry. Building those objects was most of the cost
    of a parse (the parser asks for each part's Content-Type several
    times), and we never read them: header values are decoded by our own
    lenient code, and the MIME accessors (`get_content_type`, `get_param`,
    `get_payload(decode=True)`) work on the text, as they always did."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value.replace("\r", "").replace("\n", "")


_PARSER = BytesParser(policy=_RawPolicy())


@dataclass(frozen=True, slots=True)
class Identity:
    """Who we are to the parser: the channel, the domain of the Message-IDs
    we send (to recognise answers and bounces of our own mail) and the loop
    id our outbound mail carries in `X-Support-Router-Loop`."""

    channel: str
    domain: str
    loop_id: str

    def message_id(self, message_id: str) -> str:
        """Our RFC 5322 Message-ID for an outbound message: the same on every
        retry, so a retried send is recognisable."""
        return f"<{message_id}@{self.domain}>"

    def our_id(self, message_id: str) -> str | None:
        """The outbound message id behind one of our Message-IDs, else None."""
        local, _, domain = message_id.strip("<>").rpartition("@")
        return local if domain.lower() == self.domain.lower() and local.startswith("m_") else None


@dataclass(slots=True)
class _Body:
    plain: list[str]
    html: list[str]
    attachments: list[Attachment]


def parse_email(raw: bytes, identity: Identity, truncated_at: int | None = None) -> Message:
    """`truncated_at`: the fetch stopped at that many bytes of a larger mail."""
    msg = _parse_mime(raw)
    headers = _first_headers(msg)
    body = _Body([], [], [])
    _walk(msg, body)
    hint = _charset_hint(msg)
    subject = " ".join(decode_words(headers.get("subject", ""), hint).split()) or None
    sender = _sender(headers, hint)
    text, html = _text(body)
    new_text, quoted = split_quoted(text)
    if truncated_at is not None:
        new_text += f"\n\n[This email is larger than {truncated_at} bytes; only its start was fetched.]"
    content_type = msg.get_content_type()
    auto_reason = loops.auto_generated_reason(
        headers, content_type, sender.address or "", subject or "", identity.loop_id
    )
    references = _references(headers, identity)
    in_reply_to = _ids(headers.get("in-reply-to", ""))
    report = None
    if auto_reason is not None:
        report = loops.delivery_report(
            msg, _split_head(raw)[2], loops.is_robot_sender(sender.address or ""), subject or ""
        )
    bounce_of = (
        identity.our_id(report.original_id) if report and report.failed and report.original_id else None
    )
    if bounce_of and bounce_of not in references:
        references.append(bounce_of)
    return Message(
        id=new_id("m"),
        channel=identity.channel,
        channel_type="email",
        direction=Direction.IN,
        kind=Kind.CUSTOMER,
        external_id=_message_id(headers, raw),
        sender=sender,
        text=new_text[:MAX_TEXT_CHARS],
        quoted=quoted[:MAX_TEXT_CHARS] if quoted else None,
        html=html,
        attachments=body.attachments,
        subject=subject,
        received_at=_date(headers.get("date")),
        auto_generated=auto_reason is not None,
        references=references,
        in_reply_to=_map_id(in_reply_to[-1], identity) if in_reply_to else None,
        bounce_of=bounce_of,
        bounce_error=report.reason if bounce_of and report else None,
    )


def _parse_mime(raw: bytes) -> EmailMessage:
    """The library misreads an unquoted boundary holding "=" (Outlook
    Express writes `boundary=----=_NextPart_…`); quote it and parse again."""
    msg = _PARSER.parsebytes(raw)
    if msg.get_content_maintype() == "multipart" and not msg.is_multipart():
        head, separator, rest = _split_head(raw)
        fixed = _UNQUOTED_BOUNDARY.sub(rb'\1"\2"', head, count=1)
        if fixed != head:
            msg = _PARSER.parsebytes(fixed + separator + rest)
    assert isinstance(msg, EmailMessage)
    return msg


def _first_headers(msg: EmailMessage) -> dict[str, str]:
    """Lower-case name -> first raw value, unfolded. Raw, because the
    header objects of `policy.default` can raise on malformed values."""
    headers: dict[str, str] = {}
    for name, value in msg.raw_items():
        headers.setdefault(name.lower(), re.sub(r"\r?\n(?=[ \t])", "", str(value)).strip())
    return headers


def _walk(part: EmailMessage, body: _Body) -> None:
    """Text and HTML bodies in reading order; every other leaf, and any
    attached message, is an attachment (listed, content left out), and so
    is a file uuencoded into a text/plain body."""
    kind = part.get_content_type()
    if kind.startswith("multipart/") and isinstance(part.get_payload(), list):
        for child in _children(part):
            _walk(child, body)
        return
    if kind.startswith("multipart/"):  # no boundary found: the text is all there is
        body.plain.append(decode_bytes(_payload(part), _safe(part.get_content_charset)))
        return
    if kind in _SIGNATURES:
        return
    disposition = _safe(part.get_content_disposition) or "inline"
    filename = _filename(part)
    if kind in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        text = decode_bytes(_payload(part), _safe(part.get_content_charset))
        if kind == "text/plain":
            text, files = split_uuencoded(text)
            body.attachments.extend(files)
        (body.plain if kind == "text/plain" else body.html).append(text)
        return
    body.attachments.append(Attachment(filename, kind, _size(part)))


def _children(part: EmailMessage) -> list[EmailMessage]:
    payload = part.get_payload()
    return (
        [child for child in payload if isinstance(child, EmailMessage)] if isinstance(payload, list) else []
    )


def _payload(part: EmailMessage) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # a payload the library cannot decode is kept as it came
        data = str(part.get_payload()).encode("utf-8", "surrogateescape")
    return data if isinstance(data, bytes) else b""


def _size(part: EmailMessage) -> int:
    """Decoded bytes; for an attached message, its size as sent (measured
    from the parts, which is much cheaper than serialising it again)."""
    if isinstance(part.get_payload(), list):
        return _encoded_size(part)
    return len(_payload(part))


def _encoded_size(part: EmailMessage) -> int:
    size = sum(len(name) + len(str(value)) + 4 for name, value in part.raw_items()) + 2
    payload = part.get_payload()
    if isinstance(payload, list):
        return size + sum(_encoded_size(child) for child in payload if isinstance(child, EmailMessage))
    return size + len(str(payload))


def _filename(part: EmailMessage) -> str | None:
    name = _safe(part.get_filename)
    return decode_words(name) if name else None


def _safe(method):  # type: ignore[no-untyped-def]
    """A header accessor of `policy.default` that may raise on a malformed header."""
    try:
        return method()
    except Exception:
        return None


def _charset_hint(msg: EmailMessage) -> str | None:
    """The body's charset: the best guess for raw 8-bit bytes in headers."""
    for part in msg.walk():
        if part.get_content_maintype() == "text" and (charset := _safe(part.get_content_charset)):
            return str(charset)
    return None


def _text(body: _Body) -> tuple[str, str | None]:
    """(plain text, sanitized HTML copy). HTML-only mail is read as text."""
    html = "\n".join(body.html) if body.html else None
    if body.plain:
        text = "\n\n".join(part.strip("\n") for part in body.plain)
    else:
        text = html_to_text(html) if html else ""
    clean = nh3.clean(html) if html and len(html) <= MAX_HTML_CHARS else None
    return text.replace("\r\n", "\n").strip(), clean


def _sender(headers: dict[str, str], hint: str | None) -> Party:
    for field in ("from", "sender", "reply-to", "return-path"):
        raw = unescape_raw(headers.get(field, ""), hint)
        if not raw:
            continue
        name, address = parseaddr(raw)
        if "@" not in address:
            found = _ADDRESS.search(raw)
            address = found[0] if found else ""
        if address:
            display = " ".join(decode_words(name, hint).split()) or None
            return Party(id=address.lower(), name=display, address=address)
    return Party(id="unknown-sender")


def _ids(value: str) -> list[str]:
    """Message-IDs in a header, as `<id>`; raw 8-bit bytes in one (it
    happens) become text, never surrogates the store could not encode."""
    return [f"<{found}>" for found in _ANGLE_ID.findall(unescape_raw(value))]


def _map_id(message_id: str, identity: Identity) -> str:
    """Our own Message-IDs stand for the outbound message's id, which is what
    the store knows them by."""
    return identity.our_id(message_id) or message_id


def _references(headers: dict[str, str], identity: Identity) -> list[str]:
    """References then In-Reply-To, nearest last (threading tries the
    nearest first), at most 20, ours mapped to our message ids."""
    found = _ids(headers.get("references", "")) + _ids(headers.get("in-reply-to", ""))
    mapped = [_map_id(message_id, identity) for message_id in found]
    return list(dict.fromkeys(reversed(mapped)))[:20][::-1]


def _message_id(headers: dict[str, str], raw: bytes) -> str:
    """The Message-ID; without one, a hash of the bytes, so fetching the
    same mail again still dedupes."""
    ids = _ids(headers.get("message-id", ""))
    if ids:
        return ids[0][:250]
    return f"<{hashlib.sha256(raw).hexdigest()[:40]}@no-message-id.invalid>"


def _date(value: str | None) -> datetime:
    """The Date header, but never in the future and never unparseable."""
    now = utcnow()
    try:
        parsed = parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError, IndexError, OverflowError):
        parsed = None
    if parsed is None:
        return now
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return min(parsed.astimezone(UTC), now)


def _split_head(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, blank line, body), whichever line ending the mail uses."""
    ends = [(index, sep) for sep in (b"\r\n\r\n", b"\n\n") if (index := raw.find(sep)) >= 0]
    if not ends:
        return raw, b"", b""
    index, separator = min(ends)
    return raw[:index], separator, raw[index + len(separator) :]
