"""The log redaction (router/logs.py): no part of a secret reaches a line."""

from __future__ import annotations

import logging

import pytest

from router import logs


@pytest.fixture
def redact(monkeypatch: pytest.MonkeyPatch) -> logs.Redact:
    fresh = logs.Redact()
    monkeypatch.setattr(logs, "REDACT", fresh)
    return fresh


def test_a_secret_that_contains_another_is_masked_whole(redact: logs.Redact) -> None:
    """An SMTP password that extends the IMAP one, a webhook secret cut from
    the bot token: masking the shorter first would leave the rest of the
    longer one in the line. Twenty pairs, so set order cannot hide it."""
    pairs = [(f"imap-pass-{n:02d}", f"imap-pass-{n:02d}-smtp-extra-{n:02d}") for n in range(20)]
    for short, long in pairs:
        logs.add_secret(short)
        logs.add_secret(long)
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "login failed for %s", (pairs,), None)
    redact.filter(record)
    line = record.getMessage()
    assert "extra" not in line and "imap" not in line, line
