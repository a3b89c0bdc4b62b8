"""Split a reply into what the customer just wrote and what it carries along.

Triage must judge the new text only (SPEC 4): a calm "thanks, solved" on top
of a quoted "my account was hacked" is not critical. Everything from the
first quote header ("On … wrote:", 在…写道, Outlook's "From: … Sent: …"
block, "-----Original Message-----") or signature delimiter ("-- ") on goes
to `quoted`, and so do "> " lines interleaved with the answer.
"""

from __future__ import annotations

import re

# "On <date>, <name> wrote:" and its translations; clients wrap the header
# over two or three lines, so it is matched on a few lines joined.
_WROTE = re.compile(
    r"^\s*(?:"
    r"On\b.{0,300}\bwrote\s*:"
    r"|Le\b.{0,300}\ba écrit\s*:"
    r"|Am\b.{0,300}\bschrieb\b.{0,200}:"
    r"|El\b.{0,300}\bescribió\s*:"
    r"|Il giorno\b.{0,300}\bha scritto\s*:"
    r"|Op\b.{0,300}\bschreef\b.{0,200}:"
    r"|(?:在|于).{0,300}(?:写道|寫道)\s*[:：]?"
    r"|.{0,300}(?:に書きました|のメッセージ)\s*[:：]"
    r")\s*$",
    re.IGNORECASE | re.DOTALL,
)
_SEPARATOR = re.compile(
    r"^\s*(?:-{2,}\s*(?:Original Message|Forwarded message|原始邮件|原始郵件)\s*-{2,}"
    r"|_{20,})\s*$",
    re.IGNORECASE,
)
_FROM = re.compile(r"^\s*\*?(?:From|De|Von|Van|Da|发件人|寄件者|差出人)\s*\*?\s*[:：]", re.IGNORECASE)
_SENT = re.compile(
    r"^\s*\*?(?:Sent|Date|Envoyé|Gesendet|Verzonden|Inviato|发送时间|日期|寄件日期|送信日時)\s*\*?\s*[:：]",
    re.IGNORECASE,
)
_SIGNATURE = re.compile(
    r"^(?:-- ?|--|Sent from my \w+.*|Sent from (?:Mail|Outlook) for \w+.*|Get Outlook for \w+.*"
    r"|发自我的\w+.*|從我的 ?\w+ ?傳送)$",
    re.IGNORECASE,
)
_QUOTED_LINE = re.compile(r"^\s*>")


def split_quoted(text: str) -> tuple[str, str | None]:
    """(new text, quoted history and signature or None). When nothing new
    remains (a bare forward), the whole text stays new: it is the message."""
    lines = text.splitlines()
    cut = _cut_line(lines)
    head, tail = lines[:cut], lines[cut:]
    fresh = [line for line in head if not _QUOTED_LINE.match(line)]
    interleaved = [line for line in head if _QUOTED_LINE.match(line)]
    new = "\n".join(fresh).strip()
    if not new:
        return text.strip(), None
    quoted = "\n".join([*interleaved, *tail]).strip()
    return new, quoted or None


def _cut_line(lines: list[str]) -> int:
    """Index of the first line of history or signature; len(lines) if none."""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            continue
        if _SIGNATURE.match(line.rstrip("\r")) or _SEPARATOR.match(stripped):
            return index
        if _FROM.match(stripped) and any(
            _SENT.match(next_line) for next_line in lines[index + 1 : index + 5]
        ):
            return index
        if stripped[:1] != ">" and _wrote_header(lines, index):
            return index
    return len(lines)


def _wrote_header(lines: list[str], index: int) -> bool:
    """An attribution line, alone or wrapped over up to three lines."""
    for span in (1, 2, 3):
        joined = " ".join(line.strip() for line in lines[index : index + span])
        if len(joined) > 400:
            return False
        if _WROTE.match(joined):
            return True
    return False
