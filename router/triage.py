"""Triage: urgency, category and a human reason for one customer message.

Rules are data (config/rules/*.toml, format at the top of default.toml) so a
support lead extends them without Python. Ingest calls `classify` for every
message, so matching avoids per-character Python work: the message's words
and CJK characters pick the few phrases that could match, and only those are
confirmed by a substring test or a precompiled regex.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from router.errors import ConfigError
from router.language import detect_language
from router.model import Category, Urgency

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(r"[a-z0-9]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
_PHRASE_UNIT = re.compile(rf"[a-z0-9]+\*?|[{_CJK}]|\.\.\.")
_BAD_STAR = re.compile(r"(?<![a-z0-9])\*|\*(?=[a-z0-9])")
_SEP = rf"[^a-z0-9{_CJK}]*"
_GAP = rf"(?:{_SEP}(?:[a-z0-9]+|[{_CJK}])){{0,3}}"  # "..." in a phrase: up to 3 words or CJK characters
_FULLWIDTH = {chr(c): chr(c - 0xFEE0) for c in [*range(0xFF10, 0xFF1A), *range(0xFF41, 0xFF5B)]}
_ALWAYS = {**_FULLWIDTH, **dict.fromkeys("'\u2018\u2019`\u00b4", ""), "\u2026": "..."}
_PRECEDENCE = {category: i for i, category in enumerate(Category)}
_RULE_KEYS = frozenset({"name", "category", "urgency", "any", "all", "unless", "pattern", "weight"})
_CACHE_LIMIT = 50_000

# How a phrase filed under a key is confirmed: it is the key alone; its CJK
# text is in the message; its words, space-separated, are in the message's
# words joined by spaces; or (stems, gaps, mixed scripts) a regex matches.
_ALONE, _IN_TEXT, _IN_WORDS, _REGEX = range(4)
Entry = tuple[int, frozenset[str], int, Any]  # (atom id, latin words it needs, how, str or regex)


@dataclass(frozen=True, slots=True)
class Verdict:
    urgency: Urgency
    category: Category
    reason: str
    language: str


@dataclass(frozen=True, slots=True)
class Rule:
    """Every group needs one phrase present, no `unless` phrase may be, and
    `pattern` (if any) must match; then `weight` counts for the rule's
    (category, urgency), which fires at a total of 1."""

    name: str
    category: Category
    urgency: Urgency
    groups: tuple[frozenset[int], ...]
    unless: frozenset[int]
    pattern: re.Pattern[str] | None
    weight: float


class RuleSet:
    """Rules compiled into one phrase index. Each phrase is filed under its
    rarest word or CJK character, so common words ("not", "没") open small
    buckets, and its other words are checked before any regex runs."""

    def __init__(self, rules: list[Rule], atoms: list[tuple[str, ...]], normalize: Callable[[str], str]):
        self.rules = tuple(rules)
        self.normalize = normalize
        self._words: dict[str, list[Entry]] = {}
        self._stems: list[tuple[str, Entry]] = []
        self._chars: dict[str, list[Entry]] = {}
        uses = Counter(unit for units in atoms for unit in set(units))
        for atom, units in enumerate(atoms):
            plain = [unit for unit in units if not unit.endswith("*") and unit != "..."]
            key = min(plain, key=lambda unit: (uses[unit], -len(unit))) if plain else units[0]
            needs = frozenset(unit for unit in plain if _WORD.fullmatch(unit))
            if len(units) == 1:
                entry: Entry = (atom, needs, _ALONE, None)
            elif all(_CJK_CHAR.fullmatch(unit) for unit in units):
                entry = (atom, needs, _IN_TEXT, "".join(units))
            elif len(needs) == len(units):
                entry = (atom, needs, _IN_WORDS, f" {' '.join(units)} ")
            else:
                entry = (atom, needs, _REGEX, re.compile(_regex(units)))
            if key.endswith("*"):
                self._stems.append((key[:-1], entry))
            else:
                (self._words if _WORD.fullmatch(key) else self._chars).setdefault(key, []).append(entry)
        self._heads = frozenset(self._chars)
        self._by_first_group: dict[int, list[int]] = {}
        for i, rule in enumerate(self.rules):
            for atom in rule.groups[0] if rule.groups else ():
                self._by_first_group.setdefault(atom, []).append(i)
        self._pattern_only = [i for i, rule in enumerate(self.rules) if not rule.groups]
        self._cache: dict[str, tuple[Entry, ...]] = {}

    def _file_word(self, word: str) -> tuple[Entry, ...]:
        """Phrases filed under `word`, stems included; memoized in `_cache`
        because a desk's vocabulary is small while stems are tried per word."""
        stems = [entry for stem, entry in self._stems if word.startswith(stem)]
        entries = self._cache[word] = (*self._words.get(word, ()), *stems)
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        return entries

    def scan(self, norm: str) -> dict[int, str]:
        """Atom id -> the text it matched, for every phrase present."""
        found: dict[int, str] = {}
        word_list = _WORD.findall(norm)
        words = dict.fromkeys(word_list)
        spaced = f" {' '.join(word_list)} "
        buckets = []
        for word in words:
            entries = self._cache.get(word)
            if entries is None:
                entries = self._file_word(word)
            if entries:
                buckets.append((word, entries))
        if _CJK_CHAR.search(norm):
            buckets += [(char, self._chars[char]) for char in self._heads.intersection(norm)]
        present = words.keys()
        for key, entries in buckets:
            for atom, needs, how, matcher in entries:
                if atom in found or not needs <= present:
                    continue
                if how == _ALONE:
                    found[atom] = key
                elif how == _REGEX:
                    if match := matcher.search(norm):
                        found[atom] = match.group(0)
                elif matcher in (spaced if how == _IN_WORDS else norm):
                    found[atom] = matcher.strip()
        return found

    def matches(self, text: str) -> list[tuple[Rule, list[str]]]:
        """Rules that hold for `text`, in load order, each with what matched."""
        norm = self.normalize(text)
        found = self.scan(norm)
        candidates = {i for atom in found for i in self._by_first_group.get(atom, ())}
        hits = []
        for i in sorted(candidates.union(self._pattern_only)):
            rule = self.rules[i]
            if not rule.unless.isdisjoint(found) or (shown := _evidence(rule.groups, found)) is None:
                continue
            if rule.pattern:
                if not (match := rule.pattern.search(norm)):
                    continue
                shown.append(match.group(0))
            hits.append((rule, shown))
        return hits


def _normalizer(fold: dict[str, str]) -> Callable[[str], str]:
    """Lowercase, then per character: the rule files' `fold` pairs, full-width
    letters and digits to ASCII, apostrophes dropped. Not NFKC: the
    full-width punctuation of every Chinese message makes NFKC the slowest
    step of triage, and only letters and digits matter for matching."""
    table = {**_ALWAYS, **fold}
    chars = re.compile("[" + re.escape("".join(table)) + "]")
    return lambda text: chars.sub(lambda m: table[m.group()], text.lower())


def _regex(units: tuple[str, ...]) -> str:
    """A phrase as a regex meaning the same as word matching. Each Latin word
    is its literal first, then a look back for the boundary before it, so
    the regex keeps a literal prefix and the search stays fast."""
    out = []
    for prev, unit in zip((None, *units), units, strict=False):
        cjk = bool(_CJK_CHAR.fullmatch(unit))
        if prev is not None and unit != "..." and not (cjk and _CJK_CHAR.fullmatch(prev)):
            out.append(_SEP)
        word = unit.rstrip("*")
        if unit == "..." or cjk:
            out.append(_GAP if unit == "..." else re.escape(unit))
        else:
            out.append(f"{word}(?<![a-z0-9]{word})" + ("[a-z0-9]*" if unit.endswith("*") else "(?![a-z0-9])"))
    return "".join(out)


def _evidence(groups: tuple[frozenset[int], ...], found: dict[int, str]) -> list[str] | None:
    """What matched per group (its first-defined phrase present); None if a group has none."""
    shown = []
    for group in groups:
        present = group.intersection(found)
        if not present:
            return None
        shown.append(found[min(present)])
    return shown


def classify(text: str, subject: str | None, rules: RuleSet, *, auto_generated: bool = False) -> Verdict:
    """SPEC 4's policy: the most urgent firing rule sets the urgency, the first
    firing category in precedence order (security first) sets the category.

    Auto-generated mail is low/general whatever it says: bounces and
    auto-replies quote alarming text ("your withdrawal failed") all the time.
    """
    body = f"{subject}\n{text}" if subject else text
    language = detect_language(body)
    if auto_generated:
        return Verdict(Urgency.LOW, Category.GENERAL, "auto-generated message", language)
    scores: dict[tuple[Category, Urgency], float] = {}
    evidence: dict[tuple[Category, Urgency], list[tuple[Rule, list[str]]]] = {}
    for rule, shown in rules.matches(body):
        key = (rule.category, rule.urgency)
        scores[key] = scores.get(key, 0.0) + rule.weight
        evidence.setdefault(key, []).append((rule, shown))
    fired = [key for key, score in scores.items() if score >= 1.0 - 1e-9]
    if not fired:
        return Verdict(Urgency.LOW, Category.GENERAL, "no rule matched", language)
    by_category = min(fired, key=lambda k: (_PRECEDENCE[k[0]], k[1].rank))
    by_urgency = min(fired, key=lambda k: (k[1].rank, _PRECEDENCE[k[0]]))
    reason = f"{by_category[0]}: {_explain(evidence[by_category])}"
    if by_urgency[1] != by_category[1]:
        reason += f"; {by_urgency[1]}: {_explain(evidence[by_urgency])}"
    return Verdict(by_urgency[1], by_category[0], reason, language)


def _explain(hits: list[tuple[Rule, list[str]]]) -> str:
    """The heaviest rules that together reach the threshold, named with what matched."""
    parts, total = [], 0.0
    for rule, shown in sorted(hits, key=lambda hit: -hit[0].weight):
        quoted = " + ".join(f'"{" ".join(text.split())[:40]}"' for text in shown)
        parts.append(f"{quoted} ({rule.name})")
        total += rule.weight
        if total >= 1.0 - 1e-9:
            break
    return ", ".join(parts)


def shipped_dir() -> Traversable:
    """Where the shipped rules live: the installed `router.shipped` package,
    or the repository's config/ when running from a checkout without it."""
    try:
        return importlib.resources.files("router.shipped")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "config"


def load_rules(extra: Sequence[Path] = ()) -> RuleSet:
    """Shipped rule files (by name), then the desk's own, in the order given.

    Phrase sets are merged over all files before any rule is compiled, so a
    desk's file may add synonyms to a shipped set and every rule using it
    picks them up. Every problem in every file is reported at once.
    """
    shipped = sorted((f for f in (shipped_dir() / "rules").iterdir() if f.name.endswith(".toml")), key=str)
    loader = _Loader()
    docs = [(str(source), doc) for source in [*shipped, *extra] if (doc := loader.read(source)) is not None]
    for where, doc in docs:
        loader.prepare(where, doc)
    loader.normalize = _normalizer(loader.fold)
    for where, doc in docs:
        for i, raw in enumerate(doc.get("rules", [])):
            loader.rule(f"{where}: rules[{i}]", raw)
    if loader.problems:
        raise ConfigError(loader.problems)
    return RuleSet(loader.rules, list(loader.atoms), loader.normalize)


class _Loader:
    """Validates and compiles rule files, collecting every problem found."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.fold: dict[str, str] = {}
        self.sets: dict[str, list[tuple[str, object]]] = {}
        self.atoms: dict[tuple[str, ...], int] = {}
        self.rules: list[Rule] = []
        self.normalize = _normalizer({})

    def read(self, source: Traversable | Path) -> dict[str, Any] | None:
        try:
            return tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            self.problems.append(f"{source}: cannot read: {exc.strerror or exc}")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            self.problems.append(f"{source}: not valid TOML: {exc}")
        return None

    def prepare(self, where: str, doc: dict[str, Any]) -> None:
        """Top-level keys: `fold` pairs and `phrases` sets, needed by every rule."""
        for key in doc.keys() - {"fold", "phrases", "rules"}:
            self.problems.append(f"{where}: {key}: unknown key (expected fold, phrases, rules)")
        if not isinstance(doc.get("rules", []), list):
            self.problems.append(f"{where}: rules: must be an array of [[rules]] tables")
            doc["rules"] = []
        for i, pair in enumerate(_as_list(doc.get("fold", []))):
            if isinstance(pair, str) and len(pair) == 2:
                self.fold[pair[0].lower()] = pair[1].lower()
            else:
                self.problems.append(f"{where}: fold[{i}]: must be two characters, from and to")
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
        self.problems += [f"{at}.{key}: unknown key" for key in sorted(raw.keys() - _RULE_KEYS)]
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problems.append(f"{at}.name: required, the text shown in reasons")
        category = self._parse(
            f"{at}.category", Category, raw.get("category"), f"one of {', '.join(Category)}"
        )
        urgency = self._parse(f"{at}.urgency", Urgency, raw.get("urgency"), f"one of {', '.join(Urgency)}")
        groups = [self._group(f"{at}.any", raw["any"])] if "any" in raw else []
        for i, item in enumerate(_as_list(raw.get("all", []))):
            groups.append(self._group(f"{at}.all[{i}]", item if isinstance(item, list) else [item]))
        unless = self._group(f"{at}.unless", raw.get("unless", []), may_be_empty=True)
        pattern = (
            self._parse(f"{at}.pattern", re.compile, raw["pattern"], "a regular expression")
            if "pattern" in raw
            else None
        )
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            self.problems.append(f"{at}.weight: must be a number above 0")
        if not groups and "pattern" not in raw:
            self.problems.append(f"{at}: needs at least one of any, all, pattern")
        if len(self.problems) == problems and category and urgency and isinstance(name, str):
            self.rules.append(Rule(name, category, urgency, tuple(groups), unless, pattern, float(weight)))

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
                atoms.update(self._atom(where, phrase) for where, phrase in self.sets.get(item[1:], []))
            else:
                atoms.add(self._atom(f"{at}[{i}]", item))
        return frozenset(atoms - {-1})

    def _atom(self, at: str, phrase: object) -> int:
        if not isinstance(phrase, str):
            self.problems.append(f"{at}: must be a string")
            return -1
        norm = self.normalize(phrase)
        if norm.startswith("@"):
            self.problems.append(f"{at}: {phrase!r}: phrase sets cannot name other sets")
            return -1
        units = tuple(_PHRASE_UNIT.findall(norm))
        if not units or "..." in (units[0], units[-1]):
            self.problems.append(f"{at}: {phrase!r} needs a word to match (and '...' only between words)")
            return -1
        if _BAD_STAR.search(norm):
            self.problems.append(f"{at}: {phrase!r}: '*' may only end a latin word")
            return -1
        return self.atoms.setdefault(units, len(self.atoms))

    def _parse(self, at: str, parse: Callable[[Any], Any], value: object, expected: str) -> Any:
        try:
            return parse(value)
        except (ValueError, TypeError, re.error) as exc:
            detail = f": {exc}" if isinstance(exc, re.error) else ""
            self.problems.append(f"{at}: {value!r} is not {expected}{detail}")
            return None


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]
