"""Acknowledgments: which text a new conversation gets, and whether it gets one.

An ack is the first thing a worried customer reads, so the texts live in plain
files a desk can rewrite (SPEC 3 `[acks]`), while the shipped ones guarantee a
Chinese or English answer, with the security advice, even with no config.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template

from router.errors import NotFound
from router.model import Message, Urgency

# What `$name` becomes when the customer gave none, per template language:
# "Hi there," and "尊敬的用户，您好！" read naturally where a name would go.
NAME_FALLBACK = {"en": "there", "zh": "尊敬的用户"}

# Values come from customers (display names, subjects): one short line each, so
# a crafted name cannot add paragraphs to a mail sent from our address.
_VALUE_LIMIT = 80

_LANGUAGE = re.compile(r"[a-z]{2,3}")

_NO_REPLY = re.compile(
    r"(?:^|[^a-z0-9])(?:mailer-daemon|postmaster|no[-_]?reply|do[-_]?not[-_]?reply)(?:$|[^a-z0-9])",
    re.IGNORECASE,
)

_UNIT_MINUTES = (24 * 60, 60, 1)
_UNIT_NAMES = {
    "en": (("day", "days"), ("hour", "hours"), ("minute", "minutes")),
    "zh": (("天", "天"), ("小时", "小时"), ("分钟", "分钟")),
}


def shipped_templates() -> Traversable:
    """The templates installed with the package. A source checkout that was
    never installed has no `router.shipped`, so read the repository's copy."""
    try:
        return resources.files("router.shipped") / "templates"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "config" / "templates"


def _language(language: str | None) -> str:
    """`zh-CN`, `zh_Hans`, `ZH` all pick the `zh` files; anything that is not a
    plain language code (it ends up in a file name) falls back to English."""
    primary = re.split(r"[-_]", (language or "").strip().lower(), maxsplit=1)[0]
    return primary if _LANGUAGE.fullmatch(primary) else "en"


def _one_line(value: str) -> str:
    line = " ".join(str(value).split())
    return line if len(line) <= _VALUE_LIMIT else line[: _VALUE_LIMIT - 1] + "…"


class Templates:
    """Ack and greeting texts: the desk's override directory over the shipped set.

    Lookup goes from the most specific file name to the least, and at each name
    the override directory is asked before the shipped one:

        <name>.<lang>.<urgency>.txt, <name>.<lang>.txt, <name>.en.txt

    So a desk's `ack.en.txt` replaces ours, yet a Chinese customer reporting a
    hacked account still gets the shipped `ack.zh.critical.txt` (in Chinese,
    with what to do right now) rather than the desk's generic English text.
    Searching the whole override chain first would let one generic override
    silently drop the language and the security advice. A desk that wants its
    own critical text overrides `ack.<lang>.critical.txt`.

    Files are read once and kept: edits take effect on restart.
    """

    def __init__(self, override_dir: Path | None) -> None:
        self._sources: list[Traversable] = [d for d in (override_dir, shipped_templates()) if d is not None]
        self._cache: dict[tuple[int, str], str | None] = {}

    def render(self, name: str, language: str | None, urgency: Urgency | None, values: dict[str, str]) -> str:
        """One pass of `safe_substitute`: a `$` typed by a customer stays as
        typed, and an unknown placeholder in a desk's file is left visible
        instead of failing the ack."""
        text, used = self._find(name, _language(language), urgency)
        filled = {key: _one_line(value) for key, value in values.items()}
        if not filled.get("name"):
            filled["name"] = NAME_FALLBACK.get(used, NAME_FALLBACK["en"])
        return Template(text).safe_substitute(filled)

    def _find(self, name: str, language: str, urgency: Urgency | None) -> tuple[str, str]:
        """The template text and the language it is written in."""
        candidates = [(f"{name}.{language}.txt", language), (f"{name}.en.txt", "en")]
        if urgency is not None:
            candidates.insert(0, (f"{name}.{language}.{urgency}.txt", language))
        for filename, written_in in candidates:
            for index, source in enumerate(self._sources):
                text = self._read(index, source, filename)
                if text is not None:
                    return text, written_in
        raise NotFound(f"no template {name}.en.txt in the override or shipped templates")

    def _read(self, index: int, source: Traversable, filename: str) -> str | None:
        key = (index, filename)
        if key not in self._cache:
            path = source / filename
            self._cache[key] = path.read_text(encoding="utf-8").strip() if path.is_file() else None
        return self._cache[key]


def humanize_duration(delta: timedelta, language: str | None) -> str:
    """In the largest unit that states it exactly ("90 minutes", not "1.5
    hours"), rounded up to a whole minute so we never promise sooner."""
    minutes = max(1, math.ceil(delta.total_seconds() / 60))
    names = _UNIT_NAMES.get(_language(language), _UNIT_NAMES["en"])
    size, (one, many) = next((s, n) for s, n in zip(_UNIT_MINUTES, names, strict=True) if minutes % s == 0)
    count = minutes // size
    return f"{count} {one if count == 1 else many}"


def ack_block_reason(message: Message) -> str | None:
    """Why this message must not be acked because a machine sent it (SPEC
    6.3, no loops), or None. Acking a robot starts a mail loop; the
    conversation still reaches the inbox, only the ack is held. The
    per-sender cap, which keeps a flood from spamming a real person, is
    counted by the store as it queues the ack (`Store.enqueue_ack`)."""
    if message.auto_generated:
        return "auto-generated"
    for value in (message.sender.address, message.sender.id):
        local_part = (value or "").rpartition("@")[0] or value or ""
        if _NO_REPLY.search(local_part):
            return f"no-reply sender {value}"
    return None
