"""IMAP folder names in modified UTF-7 (RFC 3501 section 5.1.3).

IMAP4rev1 mailbox names are 7-bit: a server without UTF8=ACCEPT refuses
"Обработано" sent raw, yet stores it as "&BB4EMQRABDAEMQQ+BEIEMAQ9BD4-".
Config and logs keep the human name; `imap` encodes it where it goes on
the wire. Printable ASCII stands for itself, except "&" (the shift
character, written "&-"); any other run of characters is "&", its
UTF-16BE bytes in base64 with "," for "/" and no "=" padding, then "-".
The standard library's 'utf-7' codec differs in each of those points, so
this is base64 directly.
"""

from __future__ import annotations

import base64
import re

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_SHIFTED = re.compile(r"&([A-Za-z0-9+,]*)-")


def encode(name: str) -> str:
    """The name as IMAP wants it: "已处理" -> "&XfJZBHQG-", "&" -> "&-"."""

    def shift(run: re.Match[str]) -> str:
        utf16 = base64.b64encode(run[0].encode("utf-16-be")).decode("ascii")
        return "&" + utf16.rstrip("=").replace("/", ",") + "-"

    return _UNPRINTABLE.sub(shift, name.replace("&", "&-"))


def decode(name: str) -> str:
    """The human name of a name the server sent (LIST, error text); raises
    ValueError on a shifted run that is not base64 of UTF-16BE. A stray "&"
    with no closing "-" is invalid too, but is kept as it is: a name we
    only show is better shown than lost."""

    def unshift(run: re.Match[str]) -> str:
        if not run[1]:
            return "&"
        padded = run[1].replace(",", "/") + "=" * (-len(run[1]) % 4)
        return base64.b64decode(padded, validate=True).decode("utf-16-be")

    return _SHIFTED.sub(unshift, name)
