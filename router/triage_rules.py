"""Rule files for triage: read, validate and compile them.

Rules are data (config/rules/*.toml, format at the top of default.toml) so a
support lead extends them without Python. What does not depend on a message
is done here, once: `{a|b}` and `word~` shorthands expand to plain phrases
("atoms"), and each gets the cheapest test that confirms it in a sentence.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, NamedTuple

from router.errors import ConfigError
from router.model import Category, Urgency

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
WORD = re.compile(r"[a-z0-9]+")
CJK_CHAR = re.compile(rf"[{CJK}]")
_UNIT = re.compile(rf"[a-z0-9]+[*~]?|[{CJK}]|\.\.\.")
_BAD_MARK = re.compile(r"(?<![a-z0-9])[*~]|[*~](?=[a-z0-9])|\*~|~\*")
_ALTERNATIVES = re.compile(r"\{([^{}]*)\}")
_CJK_RUN = re.compile(rf"[{CJK}]{{2,}}")
_FULLWIDTH = {chr(c): chr(c - 0xFEE0) for c in [*range(0xFF10, 0xFF1A), *range(0xFF41, 0xFF5B)]}
_ALWAYS = {**_FULLWIDTH, **dict.fromkeys("'\u2018\u2019`\u00b4", ""), "\u2026": "..."}
_KEY_NAMES = "name category urgency weight any all pattern unless unless_in_sentence same_sentence"
_KEYS = frozenset(_KEY_NAMES.split())
_ENUMS = (("category", Category), ("urgency", Urgency))
_MAX_VARIANTS = 2000  # per phrase: a typo in `{...}` must not silently load a million atoms
_DOUBLING = re.compile(r"[^aeiou][aeiou][bdgklmnprt]")
# Separators and "..." gaps in phrase regexes: Unicode categories, not a CJK
# class, since `{a|b}` makes hundreds of regexes and each with that class
# takes milliseconds to compile. Between CJK runs a gap is 6 characters.
_SEP, _CJK_GAP, _WORD_GAP = r"[\W_]*", ".{0,6}?", "(?: [a-z0-9]+){0,3}"
_GAP = r"(?:[\W_]*(?:[a-z0-9]+|[^\W\d_a-z]{1,2})){0,3}"

# How a phrase is confirmed in a sentence holding its key: it is the key
# (ALONE); its CJK text is there (IN_TEXT), more often than inside the longer
# CJK `words` holding it (OUTSIDE_WORDS: "交易" outside "交易所"); its words
# are among the sentence's words joined by spaces (IN_WORDS); or a regex
# matches those (WORD_REGEX: Latin stems, gaps) or the sentence (REGEX: CJK
# gaps, mixed scripts).
ALONE, IN_TEXT, OUTSIDE_WORDS, IN_WORDS, WORD_REGEX, REGEX = range(6)
Units = tuple[str, ...]
Entry = tuple[int, frozenset[str], int, Any]  # (atom id, Latin words it needs, how, what confirms it)


@dataclass(frozen=True, slots=True)
class Rule:
    """Every group needs one phrase present, no `unless` phrase may be in the
    message nor an `unless_in_sentence` phrase in a sentence the match comes
    from, and `pattern` (if any) must match a sentence; with `same_sentence`
    all of it must hold in one sentence. Then `weight` counts for the rule's
    (category, urgency), which fires at a total of 1."""

    name: str
    category: Category
    urgency: Urgency
    groups: tuple[frozenset[int], ...]
    unless: frozenset[int]
    unless_in_sentence: frozenset[int]
    same_sentence: bool
    pattern: re.Pattern[str] | None
    weight: float


class Compiled(NamedTuple):
    """The rules, the text normalizer, and per atom id its units and the test
    that confirms it in a sentence."""

    rules: list[Rule]
    normalize: Callable[[str], str]
    phrases: list[tuple[Units, Entry]]


def compile_rule_files(sources: Sequence[Traversable | Path]) -> Compiled:
    """The rule files, in order (shipped ones first, then the desk's own).

    Phrase sets are merged over all files before any rule is compiled, so a
    desk's file may add synonyms to a shipped set and every rule using it
    picks them up. Every problem in every file is reported at once.
    """
    loader = _Loader()
    docs = [(str(source), doc) for source in sources if (doc := loader.read(source)) is not None]
    for where, doc in docs:
        loader.prepare(where, doc)
    loader.normalize = normalizer(loader.fold)
    for where, doc in docs:
        for i, raw in enumerate(doc.get("rules", [])):
            loader.rule(f"{where}: rules[{i}]", raw)
    if loader.problems:
        raise ConfigError(loader.problems)
    words = frozenset(loader.normalize(word) for word in loader.words)
    phrases = [(units, _entry(atom, units, words)) for units, atom in loader.atoms.items()]
    return Compiled(loader.rules, loader.normalize, phrases)


def normalizer(fold: dict[str, str]) -> Callable[[str], str]:
    """Lowercase, then per character: the rule files' `fold` pairs, full-width
    letters and digits to ASCII, apostrophes dropped. Not NFKC: the
    full-width punctuation of every Chinese message makes NFKC the slowest
    step of triage, and only letters and digits matter for matching."""
    table = {**_ALWAYS, **fold}
    chars = re.compile("[" + re.escape("".join(table)) + "]")
    return lambda text: chars.sub(lambda m: table[m.group()], text.lower())


def inflections(word: str) -> list[str]:
    """`word~`: the word and its regular English forms (-s, -es, -ed, -ing,
    with e-dropping, y-to-i and consonant doubling). Over-generating is
    harmless (a non-word matches nothing) and catches misspellings such as
    "loged" for free; irregular forms are listed by the rule author."""
    forms = [word, f"{word}s", f"{word}es", f"{word}ed", f"{word}ing"]
    if word.endswith("e"):
        forms += [f"{word}d", f"{word[:-1]}ing"]
    if len(word) > 2 and word.endswith("y") and word[-2] not in "aeiou":
        forms += [f"{word[:-1]}ied", f"{word[:-1]}ies"]
    if _DOUBLING.fullmatch(word[-3:]):
        forms += [f"{word}{word[-1]}ed", f"{word}{word[-1]}ing"]
    return forms


def _entry(atom: int, units: Units, words: frozenset[str]) -> Entry:
    """How the phrase `units` is confirmed (see ALONE ... REGEX)."""
    needs = frozenset(unit for unit in units if WORD.fullmatch(unit))
    cjk = "".join(units) if all(CJK_CHAR.fullmatch(unit) for unit in units) else ""
    if outside := tuple(word for word in words if cjk and cjk in word and cjk != word):
        return atom, needs, OUTSIDE_WORDS, (cjk, outside)
    if cjk or len(units) == 1:
        return atom, needs, IN_TEXT if cjk else ALONE, cjk
    if len(needs) == len(units):
        return atom, needs, IN_WORDS, f" {' '.join(units)} "
    if any(CJK_CHAR.fullmatch(unit) for unit in units):
        return atom, needs, REGEX, _regex(units)
    stems = (f" {re.escape(unit.rstrip('*'))}{'[a-z0-9]*' * unit.endswith('*')}" for unit in units)
    spaced = "".join(_WORD_GAP if unit == "..." else stem for unit, stem in zip(units, stems, strict=True))
    return atom, needs, WORD_REGEX, re.compile(f"{spaced} ")


def _regex(units: Units) -> re.Pattern[str]:
    """CJK gaps and mixed scripts as one regex over the sentence. Each Latin
    word is its literal first, then look-arounds for its boundaries, so the
    regex keeps a literal prefix and the search stays fast."""
    out: list[str] = []
    for prev, unit, after in zip((None, *units[:-1]), units, (*units[1:], None), strict=True):
        cjk, word = bool(CJK_CHAR.fullmatch(unit)), unit.rstrip("*")
        if unit == "...":
            out.append(_CJK_GAP if CJK_CHAR.fullmatch(str(prev)) and CJK_CHAR.fullmatch(str(after)) else _GAP)
            continue
        if prev is not None and not (cjk and (CJK_CHAR.fullmatch(prev) or out[-1] == _CJK_GAP)):
            out.append(_SEP)
        tail = "[a-z0-9]*" if unit.endswith("*") else "(?![a-z0-9])"
        out.append(re.escape(unit) if cjk else f"{word}(?<![a-z0-9]{word}){tail}")
    return re.compile("".join(out))


class _Loader:
    """Validates and compiles rule files, collecting every problem found."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.fold: dict[str, str] = {}
        self.words: list[str] = []
        self.sets: dict[str, list[tuple[str, object]]] = {}
        self.atoms: dict[Units, int] = {}
        self.rules: list[Rule] = []
        self.normalize = normalizer({})

    def read(self, source: Traversable | Path) -> dict[str, Any] | None:
        try:
            return tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            self.problems.append(f"{source}: cannot read: {exc.strerror or exc}")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            self.problems.append(f"{source}: not valid TOML: {exc}")
        return None

    def prepare(self, where: str, doc: dict[str, Any]) -> None:
        """Top-level keys: `fold` pairs, `words` and `phrases` sets, needed by every rule."""
        for key in doc.keys() - {"fold", "words", "phrases", "rules"}:
            self.problems.append(f"{where}: {key}: unknown key (expected fold, words, phrases, rules)")
        if not isinstance(doc.get("rules", []), list):
            self.problems.append(f"{where}: rules: must be an array of [[rules]] tables")
            doc["rules"] = []
        for i, pair in enumerate(_as_list(doc.get("fold", []))):
            if isinstance(pair, str) and len(pair) == 2:
                self.fold[pair[0].lower()] = pair[1].lower()
            else:
                self.problems.append(f"{where}: fold[{i}]: must be two characters, from and to")
        for i, word in enumerate(_as_list(doc.get("words", []))):
            if isinstance(word, str) and _CJK_RUN.fullmatch(word):
                self.words.append(word)
            else:
                self.problems.append(f"{where}: words[{i}]: must be two or more CJK characters")
        phrases = doc.get("phrases", {})
        if not isinstance(phrases, dict):
            self.problems.append(f"{where}: phrases: must be a table of phrase lists")
            return
        for name, items in phrases.items():
            entries = self.sets.setdefault(name, [])
            entries += [(f"{where}: phrases.{name}[{i}]", item) for i, item in enumerate(_as_list(items))]

    def rule(self, at: str, raw: object) -> None:
        if not isinstance(raw, dict):
            self.problems.append(f"{at}: must be a table")
            return
        problems = len(self.problems)
        self.problems += [f"{at}.{key}: unknown key" for key in sorted(raw.keys() - _KEYS)]
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problems.append(f"{at}.name: required, the text shown in reasons")
        category, urgency = (
            self._parse(f"{at}.{k}", e, raw.get(k), f"one of {', '.join(e)}") for k, e in _ENUMS
        )
        groups = [self._group(f"{at}.any", raw["any"])] if "any" in raw else []
        for i, item in enumerate(_as_list(raw.get("all", []))):
            groups.append(self._group(f"{at}.all[{i}]", item if isinstance(item, list) else [item]))
        unless = self._group(f"{at}.unless", raw.get("unless", []), may_be_empty=True)
        nearby = self._group(f"{at}.unless_in_sentence", raw.get("unless_in_sentence", []), may_be_empty=True)
        if not isinstance(same := raw.get("same_sentence", False), bool):
            self.problems.append(f"{at}.same_sentence: must be true or false")
        pattern = None
        if "pattern" in raw:
            pattern = self._parse(f"{at}.pattern", re.compile, raw["pattern"], "a regular expression")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            self.problems.append(f"{at}.weight: must be a number above 0")
        if not groups and "pattern" not in raw:
            self.problems.append(f"{at}: needs at least one of any, all, pattern")
        if len(self.problems) == problems and category and urgency and isinstance(name, str):
            self.rules.append(
                Rule(name, category, urgency, tuple(groups), unless, nearby, same, pattern, weight)
            )

    def _group(self, at: str, items: object, may_be_empty: bool = False) -> frozenset[int]:
        """Phrases and `@set` references -> atom ids."""
        items = _as_list(items)
        if not items and not may_be_empty:
            self.problems.append(f"{at}: must list at least one phrase")
        atoms: set[int] = set()
        for i, item in enumerate(items):
            if isinstance(item, str) and item.startswith("@"):
                if item[1:] not in self.sets:
                    self.problems.append(f"{at}[{i}]: unknown phrase set {item!r}")
                for where, phrase in self.sets.get(item[1:], []):
                    atoms.update(self._atoms(where, phrase))
            else:
                atoms.update(self._atoms(f"{at}[{i}]", item))
        return frozenset(atoms)

    def _atoms(self, at: str, phrase: object) -> set[int]:
        """One phrase, its `{...}` alternatives and `~` inflections expanded -> atom ids."""
        if not isinstance(phrase, str):
            self.problems.append(f"{at}: must be a string")
            return set()
        if phrase.lstrip().startswith("@"):
            self.problems.append(f"{at}: {phrase!r}: phrase sets cannot name other sets")
            return set()
        texts = self._alternatives(at, phrase)
        variants: list[Units] = []
        for norm in map(self.normalize, texts):
            units = tuple(_UNIT.findall(norm))
            if not units or "..." in (units[0], units[-1]):
                self.problems.append(f"{at}: {phrase!r} needs a word to match (and '...' only between words)")
                return set()
            if _BAD_MARK.search(norm):
                self.problems.append(f"{at}: {phrase!r}: '*' and '~' may only end a latin word")
                return set()
            forms = [inflections(unit[:-1]) if unit.endswith("~") else [unit] for unit in units]
            if len(variants) + math.prod(map(len, forms)) > _MAX_VARIANTS:
                self.problems.append(f"{at}: {phrase!r}: more than {_MAX_VARIANTS} variants")
                return set()
            variants += itertools.product(*forms)
        return {self.atoms.setdefault(variant, len(self.atoms)) for variant in variants}

    def _alternatives(self, at: str, phrase: str) -> list[str]:
        """`{a|b|}` picks one of a, b or nothing; `{@set}` one phrase of a set
        (whose own phrases must be plain, so sets never nest)."""
        pieces = _ALTERNATIVES.split(phrase)
        if any(c in piece for piece in pieces[::2] for c in "{}|"):
            self.problems.append(f"{at}: {phrase!r}: unbalanced '{{', '}}' or '|' outside braces")
            return []
        choices = [[piece] for piece in pieces[::2]]
        for i, piece in enumerate(pieces[1::2]):
            options: list[str] = []
            for option in piece.split("|"):
                if not option.strip().startswith("@"):
                    options.append(option)
                    continue
                name = option.strip()[1:]
                members = [text for _, text in self.sets.get(name, [])]
                if name not in self.sets or any("{" in str(text) for text in members):
                    self.problems.append(f"{at}: {phrase!r}: @{name} must be a phrase set of plain phrases")
                    return []
                options += map(str, members)
            choices.insert(2 * i + 1, options)
        if (total := math.prod(map(len, choices))) > _MAX_VARIANTS:
            self.problems.append(f"{at}: {phrase!r}: {total} variants, more than {_MAX_VARIANTS}")
            return []
        return [" ".join("".join(parts).split()) for parts in itertools.product(*choices)]

    def _parse(self, at: str, parse: Callable[[Any], Any], value: object, expected: str) -> Any:
        try:
            return parse(value)
        except (ValueError, TypeError, re.error) as exc:
            detail = f": {exc}" if isinstance(exc, re.error) else ""
            self.problems.append(f"{at}: {value!r} is not {expected}{detail}")
            return None


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]
