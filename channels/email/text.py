"""Bytes, header words and HTML turned into readable text, never raising.

Real mail lies about its charsets: GB2312 labels on GBK bytes, "X-GBK",
"ISO-8859-8-I", UTF-8 bodies labelled GB2312, raw 8-bit headers. So a label
is a hint: a superset codec is tried first (GB18030 for every Chinese
simplified label, Big5-HKSCS for Big5, CP1252 for Latin-1), bytes that are
valid UTF-8 are taken as UTF-8 (legacy text almost never is), and the last
resort replaces what cannot be decoded instead of failing the message.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from html.parser import HTMLParser

_SUPERSETS = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "gb_2312-80": "gb18030",
    "euc-cn": "gb18030",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "cn-big5": "big5hkscs",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "x-mac-cyrillic": "mac-cyrillic",
    "shift_jis": "cp932",
    "x-sjis": "cp932",
    "iso-2022-jp": "iso2022_jp_2",
}
_FALLBACKS = {"iso2022_jp_2": ("iso2022_jp_ext",), "big5hkscs": ("cp950",)}

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=)\s+(?==\?)")


def codec(label: str | None) -> str | None:
    """The Python codec for a MIME charset label, or None when unknown."""
    if not label:
        return None
    name = label.strip().strip("\"'").lower()
    name = _SUPERSETS.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes, label: str | None = None) -> str:
    """Best reading of `data` labelled `label`; never raises."""
    if not data.isascii():
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    declared = codec(label)
    candidates = [declared, *_FALLBACKS.get(declared or "", ())] if declared else []
    for name in candidates:
        try:
            return data.decode(name)
        except (UnicodeError, LookupError):  # "undefined", "idna": codecs, not charsets
            continue
    if b"\x1b$" in data or (declared or "").startswith("iso2022_jp"):
        return _jis_via_cp932(data)
    if data.isascii():
        return data.decode("ascii")
    loose = data.decode("utf-8", errors="replace")
    if loose.count("\ufffd") * 10 <= sum(byte >= 0x80 for byte in data):
        return loose  # UTF-8 with a stray bad byte, not a legacy charset
    # Latin-1 text labelled UTF-8 (or not labelled) is the common lie.
    fallback = declared if declared and declared != "utf-8" else "cp1252"
    try:
        return data.decode(fallback, errors="replace")
    except (UnicodeError, LookupError):
        return data.decode("cp1252", errors="replace")


def _jis_via_cp932(data: bytes) -> str:
    """ISO-2022-JP as Microsoft writes it (CP50220: NEC and IBM extensions
    that Python's codecs reject), by shifting JIS X 0208 pairs to CP932."""
    out = bytearray()
    mode, index = "ascii", 0
    while index < len(data):
        escape = data[index + 1 : index + 3] if data[index] == 0x1B else b""
        if escape in (b"$B", b"$@", b"(B", b"(J", b"(I"):
            mode = {b"$B": "jis", b"$@": "jis", b"(I": "kana"}.get(escape, "ascii")
            index += 3
            continue
        byte = data[index]
        if mode == "jis" and byte > 0x20 and index + 1 < len(data):
            first, second = byte, data[index + 1]
            lead = (first + 1) // 2 + 0x70
            out.append(lead + 0x40 if lead >= 0xA0 else lead)
            if first % 2:
                out.append(second + 0x1F + (1 if second >= 0x60 else 0))
            else:
                out.append(second + 0x7E)
            index += 2
            continue
        out.append(byte | 0x80 if mode == "kana" and 0x21 <= byte <= 0x5F else byte)
        index += 1
    return out.decode("cp932", errors="replace")


def unescape_raw(value: str, hint: str | None = None) -> str:
    """A raw header value: 8-bit bytes the parser kept as surrogates, or
    unencoded ISO-2022-JP escapes."""
    if "\x1b$" in value:
        return decode_bytes(value.encode("utf-8", "surrogateescape"), "iso-2022-jp")
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return decode_bytes(value.encode("utf-8", "surrogateescape"), hint)


def decode_words(value: str, hint: str | None = None) -> str:
    """RFC 2047 encoded words in a header value, leniently: unknown
    charsets, bad base64 padding, raw 8-bit bytes, and adjacent words that
    split one character (or one ISO-2022-JP escape run) between them."""
    value = unescape_raw(value, hint)
    if "=?" not in value:
        return value
    value = _BETWEEN_WORDS.sub(r"\1", value)
    out: list[str] = []
    run, run_charset, position = bytearray(), "", 0

    def flush() -> None:
        if run:
            out.append(decode_bytes(bytes(run), run_charset if codec(run_charset) else hint))
            run.clear()

    for word in _ENCODED_WORD.finditer(value):
        if word.start() > position:
            flush()
            out.append(value[position : word.start()])
        charset = word[1].split("*", 1)[0].lower()  # RFC 2231 language suffix
        data = _word_bytes(word[2], word[3])
        if data is None:
            flush()
            out.append(word[0])
        else:
            if charset != run_charset:
                flush()
            run_charset = charset
            run.extend(data)
        position = word.end()
    flush()
    out.append(value[position:])
    return "".join(out)


def _word_bytes(encoding: str, payload: str) -> bytes | None:
    try:
        if encoding in "bB":
            payload = payload.rstrip("=")
            return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        return quopri.decodestring(payload.replace("_", " ").encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return None


_BLOCKS = frozenset(
    {"p", "div", "br", "tr", "li", "ul", "ol", "table", "pre", "hr", "section", "article", "header", "footer"}
    | {"address", "h1", "h2", "h3", "h4", "h5", "h6"}
)
_SKIP = frozenset({"script", "style", "head", "title", "template"})


class _TextWriter(HTMLParser):
    """Block elements become line breaks, links keep their target, and a
    blockquote's lines get "> " so the quote splitter sees them as quoted."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skip = 0
        self.quote_depth = 0
        self.pre = 0
        self.href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag == "blockquote":
            self.newline()
            self.quote_depth += 1
        elif tag == "pre":
            self.newline()
            self.pre += 1
        elif tag in _BLOCKS:
            self.newline()
        elif tag == "a":
            self.href = dict(attrs).get("href")
        elif tag == "img" and (alt := dict(attrs).get("alt")):
            self.current.append(f"[{alt}]")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "blockquote":
            self.newline()
            self.quote_depth = max(0, self.quote_depth - 1)
        elif tag == "pre":
            self.newline()
            self.pre = max(0, self.pre - 1)
        elif tag in _BLOCKS:
            self.newline()
        elif tag == "a":
            self.href = None

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            first, *rest = data.split("\n")
            self.current.append(first)
            for line in rest:
                self.newline(force=True)
                self.current.append(line)
            return
        text = " ".join(data.split())
        if data[:1].isspace() and text:
            text = " " + text
        if data[-1:].isspace() and text:
            text += " "
        if self.href and self.href.startswith(("http://", "https://")) and text.strip() != self.href:
            text = f"{text.rstrip()} ({self.href}) " if text.strip() else ""
            self.href = None
        self.current.append(text)

    def newline(self, force: bool = False) -> None:
        joined = "".join(self.current)
        line = joined.rstrip() if self.pre else joined.strip()
        self.current = []
        if line or force:
            self.lines.append("> " * self.quote_depth + line)
        elif self.lines and self.lines[-1]:
            self.lines.append("")


def html_to_text(html: str) -> str:
    """Readable plain text of an HTML body: what triage and the inbox read
    for HTML-only mail."""
    writer = _TextWriter()
    try:
        writer.feed(html)
        writer.close()
    except (AssertionError, ValueError):  # html.parser gives up on some broken markup
        pass
    writer.newline()
    text = "\n".join(writer.lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
