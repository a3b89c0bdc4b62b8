"""Files uuencoded into a text body, taken out of the customer's text.

Old clients, ticketing systems and fax gateways do not attach files the
MIME way: they paste them into the text/plain body as

    begin 644 invoice.pdf
    M<60 encoded characters>
    `
    end

(or `begin-base64 644 name` ... `====`, GNU uuencode -m). Left in the text,
that is kilobytes of noise for triage and agents. Each such block becomes an
`Attachment` like a MIME one: name, type guessed from the name, decoded size,
content dropped (the queue carries messages, not files).

A block is taken out only when every line of it decodes and looks like an
encoder wrote it; anything else (a customer writing "begin 644 foo" and
then prose) stays in the text exactly as it came. Losing customer words is
worse than showing some noise, so the checks lean towards leaving text be.
Nothing here raises: this runs on every inbound mail.
"""

from __future__ import annotations

import binascii
import mimetypes
import re
from dataclasses import dataclass

from router.model import Attachment

_BEGIN = re.compile(r"begin(-base64)? +[0-7]{3,4} +(\S.*?)\s*")
_UU_LINE = re.compile(r"[ -`]*")
"""The alphabet of a uuencoded line: ' ' (0x20) to '`' (0x60), nothing else."""
_BASE64_LINE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

_Line = tuple[int, int, bool]
"""One decoded line: (width, decoded bytes, exact). `width` is the
encoder's line length marker (the declared length of a uuencoded line, the
length of a base64 line); `exact` says the line is as long as an encoder
writes it (a uuencoded one has every character its declared length needs,
none stripped as trailing spaces)."""


def split_uuencoded(text: str) -> tuple[str, list[Attachment]]:
    """(the text without its uuencoded blocks, one attachment per block).

    The text is returned unchanged, line endings included, when it holds
    no block that decodes."""
    if "begin" not in text:  # nearly every mail: no line-by-line work at all
        return text, []
    lines = text.split("\n")
    kept: list[str] = []
    found: list[Attachment] = []
    index = 0
    while index < len(lines):
        block = _block(lines, index) if lines[index].startswith("begin") else None
        if block is None:
            kept.append(lines[index])
            index += 1
            continue
        index, attachment = block
        found.append(attachment)
        # The blank lines that set the block apart would otherwise leave a gap of two.
        if kept and not kept[-1].strip() and index < len(lines) and not lines[index].strip():
            index += 1
    return ("\n".join(kept), found) if found else (text, [])


def _block(lines: list[str], start: int) -> tuple[int, Attachment] | None:
    """(index of the line after the block, its attachment) for a block
    whose `begin` line is `lines[start]`, or None when it is not one."""
    head = _BEGIN.fullmatch(lines[start].rstrip("\r"))
    if head is None:
        return None
    decode, terminator = (_base64_line, "====") if head[1] else (_uu_line, "end")
    data = _Data()
    for index in range(start + 1, len(lines)):
        line = lines[index].rstrip("\r")
        if line.strip() == terminator:
            return (index + 1, data.attachment(head[2])) if data.written_by_encoder() else None
        decoded = decode(line)
        if decoded is None or not data.add(*decoded):
            return None
    return (len(lines), data.attachment(head[2])) if data.cut_off_file() else None


@dataclass(slots=True)
class _Data:
    """The data lines of a block so far, as running totals (a 25 MB mail is
    half a million lines), and whether they look like an encoder's."""

    size: int = 0
    count: int = 0
    width: int = 0  # of the first line: every line but the last has it
    last_width: int = 0
    last_exact: bool = True
    any_exact: bool = False
    exact_but_last: bool = True
    closed: bool = False  # after the zero-length line only the terminator may come

    def add(self, width: int, size: int, exact: bool) -> bool:
        """Count a line in; False when it cannot follow the lines before it."""
        if size == 0:
            self.closed = True
            return True
        if self.closed or (self.count and (width > self.width or self.last_width < self.width)):
            # Data after a shorter line: not what an encoder writes, and
            # the check capitals-only prose does not pass.
            return False
        if not self.count:
            self.width = width
        self.exact_but_last = self.exact_but_last and self.last_exact
        self.last_width, self.last_exact = width, exact
        self.any_exact = self.any_exact or exact
        self.size += size
        self.count += 1
        return True

    def written_by_encoder(self) -> bool:
        """An empty file is its zero-length line alone; any other has a line
        that is not short of its declared length (a mailer may strip
        trailing spaces, i.e. zero bits, from some lines; prose between a
        "begin" and an "end" line is short of what its first letter declares)."""
        return self.any_exact if self.count else self.closed

    def cut_off_file(self) -> bool:
        """A block without its terminator at the end of the body is still a
        file when the fetch stopped mid-file (it stops at
        `max_message_bytes`, and a large mail is large because of its
        files): what arrived is listed. With no terminator to confirm it,
        the lines must be unmistakable: at least two, and all but the last
        exactly as long as the encoder wrote them."""
        return self.count >= 2 and self.exact_but_last

    def attachment(self, name: str) -> Attachment:
        return Attachment(name, _content_type(name), self.size)


def _uu_line(line: str) -> _Line | None:
    """One uuencoded line, or None when it is not one.

    `binascii.a2b_uu` rejects lines whose padding is not blank ("Trailing
    garbage"), which several encoders write; the retry cut to the declared
    length is the workaround of the standard library's `uu` module (removed
    in Python 3.13), so what `uu` decoded decodes here too. Lines whose
    trailing spaces a mailer stripped decode as well: a2b_uu pads them."""
    if not line:  # " " (the zero-length line) with its space stripped
        return 0, 0, True
    if not " " <= line[0] <= "`":  # a2b_uu masks the length character instead of checking it
        return None
    declared = (ord(line[0]) - 32) & 63
    if len(line) - 1 > (declared + 2) // 3 * 4 + 2:  # longer than padding and a checksum: not uuencode
        return None
    try:  # a2b_uu itself rejects characters outside " " to "`" (and non-ASCII, as ValueError)
        data = binascii.a2b_uu(line)
    except ValueError:
        cut = (declared * 4 + 5) // 3
        if not _UU_LINE.fullmatch(line):  # the retry reads only `line[:cut]`: check the rest too
            return None
        try:
            data = binascii.a2b_uu(line[:cut])
        except ValueError:
            return None
    return declared, len(data), len(line) - 1 >= (declared * 4 + 2) // 3


def _base64_line(line: str) -> _Line | None:
    """One line of a `begin-base64` block, or None when it is not one."""
    if not line:
        return 0, 0, True
    if not _BASE64_LINE.fullmatch(line):
        return None
    try:
        # Encoders write lines of 60 or 76 characters, so only the last is
        # short; four-letter words in a row are base64 too, but never that long.
        return len(line), len(binascii.a2b_base64(line)), len(line) >= 40
    except ValueError:
        return None


def _content_type(name: str) -> str:
    """The type the name suggests; a compressed file (".tar.gz") is not of
    its inner type, so it is octet-stream like anything unknown."""
    kind, encoding = mimetypes.guess_type(name)
    return kind if kind and encoding is None else "application/octet-stream"
