"""Logging set-up with a redaction filter: secrets never reach a log line."""

from __future__ import annotations

import logging
import re
import sys

_TOKENS = re.compile(r"srt_[A-Za-z0-9_-]{20,}")


class Redact(logging.Filter):
    """Masks known secrets and anything shaped like an agent token, in the
    message and its arguments, before any handler formats the record."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def scrub(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):  # one inside another: the longer first
            text = text.replace(secret, "***")
        return _TOKENS.sub("srt_***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        scrubbed = self.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


REDACT = Redact()


def setup(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(REDACT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def add_secret(secret: str | None) -> None:
    if secret and len(secret) >= 6:
        REDACT.secrets.add(secret)
