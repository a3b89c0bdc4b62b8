"""Mail written by machines: auto-replies, bounces, lists (SPEC 6 promise 3).

Acking a robot starts a loop, so every signal RFC 3834 and the big mail
systems give is honoured, plus the subject prefixes of clients that give
none (iCloud, some Exchange set-ups). Bounces are also read for the
Message-ID they return: a bounce of our own reply marks that reply failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage, Message

_ROBOT_SENDER = re.compile(
    r"(?:^|[^a-z0-9])(?:mailer-daemon|postmaster|no[-_.]?reply|do[-_.]?not[-_.]?reply|bounces?)(?:$|[^a-z0-9])",
    re.IGNORECASE,
)
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[- ]?(?:reply|response|antwort)|autoresponse|out of (?:the )?office"
    r"|abwesenheitsnotiz|réponse automatique|respuesta automática|automatyczna odpowiedź"
    r"|自动回复|自動回覆|自動応答|undeliver(?:ed|able)|delivery status notification"
    r"|mail delivery (?:failed|failure|subsystem))",
    re.IGNORECASE,
)
_LIST_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply"})
_MESSAGE_ID = re.compile(r"^Message-ID:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
_ACTION = re.compile(r"^Action:\s*([A-Za-z]+)", re.IGNORECASE | re.MULTILINE)
_STATUS = re.compile(r"^Status:\s*([245]\.\d{1,3}\.\d{1,3})", re.IGNORECASE | re.MULTILINE)
_DIAGNOSTIC = re.compile(
    r"^Diagnostic-Code:\s*(?:[\w-]+;\s*)?(.+(?:\n[ \t]+.+)*)", re.IGNORECASE | re.MULTILINE
)


def auto_generated_reason(
    headers: Mapping[str, str], content_type: str, sender: str, subject: str, loop_id: str
) -> str | None:
    """Why this mail counts as machine-written, or None for a person's mail.
    `headers` maps lower-case names to their first raw value."""
    if headers.get("x-support-router-loop", "").strip() == loop_id:
        return "our own mail came back"
    auto_submitted = headers.get("auto-submitted", "").strip().lower()
    if auto_submitted and not auto_submitted.startswith("no"):
        return f"Auto-Submitted: {auto_submitted}"
    precedence = headers.get("precedence", "").strip().lower()
    if precedence in _LIST_PRECEDENCE:
        return f"Precedence: {precedence}"
    for name in ("list-id", "list-unsubscribe", "x-auto-response-suppress", "x-autoreply", "x-autorespond"):
        if name in headers:
            return f"{name} header"
    if headers.get("x-apple-action", "").strip().upper() == "VACATION":
        return "X-Apple-Action: VACATION"
    if "return-path" in headers and headers["return-path"].strip() in ("<>", ""):
        return "empty Return-Path"
    if content_type == "multipart/report":
        return "multipart/report"
    if _ROBOT_SENDER.search(sender.rpartition("@")[0] or sender):
        return f"robot sender {sender}"
    if _AUTO_SUBJECT.match(subject):
        return "auto-reply subject"
    return None


@dataclass(slots=True)
class DeliveryReport:
    """What a bounce says about the message it returns."""

    original_id: str | None
    failed: bool
    reason: str


def delivery_report(
    msg: EmailMessage, body: bytes, robot_sender: bool, subject: str
) -> DeliveryReport | None:
    """The DSN of a `multipart/report` (RFC 3464), or, from a mailer-daemon,
    a plain-text bounce that quotes the original headers. `body` is the raw
    message after its own header block, so its own Message-ID is not taken."""
    raw_body = body.decode("latin-1")
    if msg.get_content_type() == "multipart/report":
        return _dsn(msg, raw_body)
    if robot_sender and (found := _MESSAGE_ID.search(raw_body)):
        delayed = re.search(r"delay|warning|will retry", subject, re.IGNORECASE) is not None
        return DeliveryReport(found[1], not delayed, _first_line(subject))
    return None


def _dsn(msg: EmailMessage, raw_body: str) -> DeliveryReport:
    status_text, original = "", None
    for part in msg.iter_parts():
        kind = part.get_content_type()
        if kind in ("message/delivery-status", "message/global-delivery-status"):
            status_text = _part_text(part)
        elif kind in ("message/rfc822", "text/rfc822-headers", "message/global", "message/global-headers"):
            found = _MESSAGE_ID.search(_part_text(part))
            original = found[1] if found else original
    if original is None and (found := _MESSAGE_ID.search(raw_body)):
        original = found[1]
    actions = {action.lower() for action in _ACTION.findall(status_text)}
    statuses = _STATUS.findall(status_text)
    failed = "failed" in actions or (not actions and any(s.startswith("5") for s in statuses))
    diagnostic = _DIAGNOSTIC.search(status_text)
    reason = " ".join(diagnostic[1].split()) if diagnostic else ", ".join(statuses) or "delivery failed"
    return DeliveryReport(original, failed, reason[:300])


def _part_text(part: Message) -> str:
    """A report part's fields as text, however the parser shaped it: the
    `message/*` types come back as lists of header blocks, read raw here
    (serialising them again would cost more than the rest of the parse)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return "\n".join(
            f"{name}: {value}"
            for block in payload
            if isinstance(block, Message)
            for name, value in block.raw_items()
        )
    data = part.get_payload(decode=True)
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "delivery failed"


def is_robot_sender(address: str) -> bool:
    return _ROBOT_SENDER.search(address.rpartition("@")[0] or address) is not None
