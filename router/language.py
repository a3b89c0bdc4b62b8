"""Guess a message's language from its script, for acks and routing.

Script counting instead of a statistical model: it runs on every inbound
message, needs no data files, and the languages our desks answer in that do
not use Latin script are told apart by script alone. Latin-script text falls
back to the channel's hint (an email's Content-Language, a Telegram user's
language_code) and then to English.
"""

from __future__ import annotations

import re

_KANA_HANGUL_CYRILLIC = r"\u0400-\u04ff\u1100-\u11ff\u3040-\u30ff\uac00-\ud7af"
_NON_LATIN = re.compile(rf"[{_KANA_HANGUL_CYRILLIC}\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# One pass tells whether any of the three is there at all: most non-Latin
# messages are Chinese, and counting each script separately scans each time.
_OTHER_SCRIPT = re.compile(f"[{_KANA_HANGUL_CYRILLIC}]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_KANA = re.compile(r"[\u3040-\u30ff]+")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]+")
_CYRILLIC_WORD = re.compile(r"[\u0400-\u04ff]+")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_HINT = re.compile(r"([A-Za-z]{2})(?:[-_][A-Za-z0-9]+)*")


def detect_language(text: str, hint: str | None = None) -> str:
    """ISO 639-1 code of `text`.

    One CJK character carries about as much as one Latin word, so characters
    are weighed against Latin words: "我的API key被盗了" is Chinese, while an
    English message that quotes a Chinese name stays English. Kana marks
    Japanese even though Japanese also writes Han characters.
    """
    if _NON_LATIN.search(text):
        latin = len(_LATIN_WORD.findall(text))
        han = _characters(_HAN, text)
        if not _OTHER_SCRIPT.search(text):
            return "zh" if han and han >= latin else _hinted(hint)
        if (kana := _characters(_KANA, text)) and kana + han >= latin:
            return "ja"
        if (hangul := _characters(_HANGUL, text)) and hangul >= latin:
            return "ko"
        if han and han >= latin:
            return "zh"
        if len(_CYRILLIC_WORD.findall(text)) > latin:
            return "ru"
    return _hinted(hint)


def _hinted(hint: str | None) -> str:
    """Latin script: the channel's hint when it is a language code, else English."""
    if hint and (match := _HINT.fullmatch(hint.strip())):
        return match.group(1).lower()
    return "en"


def _characters(script: re.Pattern[str], text: str) -> int:
    return sum(map(len, script.findall(text)))
