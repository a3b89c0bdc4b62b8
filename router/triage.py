"""Triage: urgency, category and a human reason for one customer message.

Ingest calls `classify` for every message, so matching avoids per-character
Python work: a phrase is filed under a word (or CJK character) it contains,
the message's words open the few buckets that could match, and only those
phrases are confirmed. Matching is per sentence, so a guard ("what if", "not
hacked") cancels the sentence it is in, not a real report elsewhere.
"""

from __future__ import annotations

import importlib.resources
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from router import triage_rules as compiler
from router.language import detect_language
from router.model import Category, Urgency
from router.triage_rules import ALONE, CJK_CHAR, IN_TEXT, IN_WORDS, REGEX, WORD, WORD_REGEX, Rule

__all__ = ["RuleSet", "Verdict", "classify", "load_rules", "shipped_dir"]

# A sentence ends at . ! ? : before a space (not in "0.5", "site.com" or "02:14"),
# at CJK stops, colons and semicolons, and at line breaks. A class first: fast skips.
_SENTENCE_END = re.compile(r"[.!?:。！？；：;\n](?:(?<=[.!?:])(?=\s|$)|(?<![.!?:]))\s*")
# Where quoted history starts in a reply: "On <date>, <who> wrote:" (maybe
# wrapped onto a second line), its Chinese form, Outlook's separators.
_QUOTE_HEADER = re.compile(
    r"^[ \t]*(?:on\b[^\n]{0,300}(?:\n[^\n]{0,200})?\bwrote:[ \t]*$|在[^\n]{0,100}写道[:：]"
    r"|-{3,}[ \t]*(?:original message|原始邮件)[ \t]*-{3,}|from:[^\n]*\n(?:sent|date|发送时间):)",
    re.IGNORECASE | re.MULTILINE,
)
_QUOTED_LINE = re.compile(r"^[ \t]*>[^\n]*\n?", re.MULTILINE)
# In nearly every message, so never a phrase's key while it has another word.
_FUNCTION_WORD_LIST = """a an the to of in on at for from by with and or but if is are was were be been am
    i im me my you your ur it its this that these those he she they them his her their we our us not no never
    dont didnt did do does have has had havent hasnt cant cannot can could would should will just so as up out
    about into what when where why how who which there all any some"""
_FUNCTION_WORDS = frozenset(_FUNCTION_WORD_LIST.split())
_PRECEDENCE = {category: i for i, category in enumerate(Category)}
_CACHE_LIMIT = 50_000

Entries = tuple[compiler.Entry, ...]
# A word key's entries by a second word they need ("" if none): `{a|b}` files dozens
# under one key, and a message holding the key holds few of their second words.
# A CJK key's plain runs carry their characters, a cheap test before scanning.
Bucket = list[tuple[str, tuple[tuple[int, ...], Entries]]]
Runs = tuple[tuple[int, str, frozenset[str]], ...]
Index = tuple[
    dict[str, Bucket], list[tuple[str, Bucket]], dict[str, tuple[Runs, Entries]]
]  # words, stems, chars
Found = dict[int, str]  # atom id -> the text it matched
Todo = tuple[Sequence[int], Entries]  # entries to confirm, in those sentences


@dataclass(frozen=True, slots=True)
class Verdict:
    urgency: Urgency
    category: Category
    reason: str
    language: str


class RuleSet:
    """Compiled rules and phrases, and from each phrase the (rule, group bit)
    pairs it satisfies, the rules it switches off and those it guards a
    sentence of: a message's phrases vote, and only rules they meet run."""

    def __init__(self, compiled: compiler.Compiled):
        self.rules = tuple(compiled.rules)
        self.normalize = compiled.normalize
        self._words, self._stems, self._chars = _file(compiled.phrases)
        self._heads = frozenset(self._chars)
        rules = list(enumerate(self.rules))
        groups = ((a, (i, 1 << j)) for i, rule in rules for j, group in enumerate(rule.groups) for a in group)
        self._groups_of = _invert(groups)
        self._blocks = _invert((atom, i) for i, rule in rules for atom in rule.unless)
        self._guards = _invert((atom, i) for i, rule in rules for atom in rule.unless_in_sentence)
        self._all_groups = [(1 << len(rule.groups)) - 1 for rule in self.rules]
        self._pattern_only = [i for i, rule in enumerate(self.rules) if not rule.groups]
        self._cache: dict[str, Bucket] = {}

    def _file_word(self, word: str) -> Bucket:
        """Phrases filed under `word`, stems included; memoized in `_cache`
        because a desk's vocabulary is small while stems are tried per word."""
        stems = [part for stem, bucket in self._stems if word.startswith(stem) for part in bucket]
        bucket = self._cache[word] = [*self._words.get(word, ()), *stems]
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        return bucket

    def scan(self, sentences: list[str]) -> list[Found]:
        """Every phrase present, per normalized sentence. The message's words
        and CJK characters are looked up once; a phrase filed under a word is
        confirmed only in the sentences holding that word."""
        word_lists = [WORD.findall(sentence) for sentence in sentences]
        where: dict[str, list[int]] = {}
        for i, word_list in enumerate(word_lists):
            for word in set(word_list):
                where.setdefault(word, []).append(i)
        found: list[Found] = [{} for _ in sentences]
        todo = self._scan_words(where, found)
        if CJK_CHAR.search(joined := "".join(sentences)):
            todo += self._scan_cjk(joined, sentences, found)
        spaced = [f" {' '.join(word_list)} " for word_list in word_lists]
        present = where.keys()
        for at, others in todo:
            for atom, needs, how, matcher in others:
                if needs <= present:
                    for i in at:
                        shown = None if atom in found[i] else _confirm(how, matcher, sentences[i], spaced[i])
                        if shown is not None:
                            found[i][atom] = shown
        return found

    def _scan_words(self, where: dict[str, list[int]], found: list[Found]) -> list[Todo]:
        """Record lone words; return the other entries of each bucket part
        whose second word is in the message, with the sentences to try."""
        todo: list[Todo] = []
        for word, at in where.items():
            bucket = self._cache.get(word)
            for second, (alone, others) in self._file_word(word) if bucket is None else bucket:
                if second and second not in where:
                    continue
                for i in at if alone else ():
                    for atom in alone:
                        found[i].setdefault(atom, word)
                if others:
                    todo.append((at, others))
        return todo

    def _scan_cjk(self, joined: str, sentences: list[str], found: list[Found]) -> list[Todo]:
        """Record plain CJK runs; return the other entries of the message's CJK keys."""
        chars = set(joined)
        heads = [self._chars[char] for char in self._heads.intersection(chars)]
        runs = [run for head_runs, _ in heads for run in head_runs if run[2] <= chars]
        for sentence, part in zip(sentences, found, strict=True):
            for atom, text, _ in runs:
                if text in sentence:
                    part.setdefault(atom, text)
        return [(range(len(sentences)), others) for _, others in heads if others]

    def matches(self, text: str) -> list[tuple[Rule, list[str]]]:
        """Rules that hold for `text`, in load order, each with what matched.
        Found phrases vote for the groups they satisfy and the rules they
        block or guard, so only rules with every group met are looked at."""
        # A repeated sentence (a pasted error, a re-sent line) is evidence once.
        split = _SENTENCE_END.split(self.normalize(text))
        sentences = list(dict.fromkeys(s for s in split if s and not s.isspace()))
        per_sentence = self.scan(sentences)
        found: Found = {}
        for part in reversed(per_sentence):
            found.update(part)
        met = dict.fromkeys(self._pattern_only, 0)  # rule -> a bit per group with a phrase present
        blocked: set[int] = set()
        guarded: set[int] = set()
        for atom in found:
            for i, bit in self._groups_of.get(atom, ()):
                met[i] = met.get(i, 0) | bit
            blocked.update(self._blocks.get(atom, ()))
            guarded.update(self._guards.get(atom, ()))
        hits = []
        for i in sorted(met.keys() - blocked):
            rule = self.rules[i]
            if met[i] != self._all_groups[i]:
                continue
            if len(sentences) > 1 and (rule.same_sentence or i in guarded):
                shown = _by_sentence(rule, sentences, per_sentence)
            else:
                shown = None if i in guarded else _evidence(rule, sentences, found)
            if shown is not None:
                hits.append((rule, shown))
        return hits


def _file(phrases: list[tuple[compiler.Units, compiler.Entry]]) -> Index:
    """Entries filed by key word, key stem and key CJK character, the key
    being the rarest unit. Function words, and words that are phrases on
    their own ("login"), are in most messages: a phrase goes under another
    of its words when it has one."""
    uses = Counter(unit for units, _ in phrases for unit in set(units))
    alone = {units[0] for units, _ in phrases if len(units) == 1}
    alone_stems = tuple(unit[:-1] for unit in alone if unit.endswith("*"))

    def rarity(unit: str) -> tuple[bool, bool, int, int]:
        return unit in _FUNCTION_WORDS, unit in alone or unit.startswith(alone_stems), uses[unit], -len(unit)

    filed: dict[str, dict[str, dict[str, list[compiler.Entry]]]] = {"word": {}, "stem": {}, "char": {}}
    for units, entry in phrases:
        plain = [unit for unit in units if not unit.endswith("*") and unit != "..."]
        key = min(plain, key=rarity) if plain else units[0]
        kind = "stem" if key.endswith("*") else "word" if WORD.fullmatch(key) else "char"
        second = min(entry[1] - {key}, key=rarity, default="")
        filed[kind].setdefault(key.rstrip("*"), {}).setdefault(second, []).append(entry)
    words, stems = ({key: _bucket(by) for key, by in filed[kind].items()} for kind in ("word", "stem"))
    chars = {}
    for char, by_second in filed["char"].items():
        entries = [entry for part in by_second.values() for entry in part]
        runs = tuple((atom, text, frozenset(text)) for atom, _, how, text in entries if how == IN_TEXT)
        chars[char] = runs, tuple(entry for entry in entries if entry[2] != IN_TEXT)
    return words, list(stems.items()), chars


def _invert(pairs: Iterable[tuple[int, Any]]) -> dict[int, list[Any]]:
    inverted: dict[int, list[Any]] = {}
    for key, value in pairs:
        inverted.setdefault(key, []).append(value)
    return inverted


def _bucket(by_second: dict[str, list[compiler.Entry]]) -> Bucket:
    return [
        (second, (tuple(e[0] for e in group if e[2] == ALONE), tuple(e for e in group if e[2] != ALONE)))
        for second, group in by_second.items()
    ]


def _confirm(how: int, matcher: Any, sentence: str, spaced: str) -> str | None:
    """The text a phrase matched in a sentence, or None; the tests `scan` does not inline."""
    if how == IN_WORDS:
        return matcher.strip() if matcher in spaced else None
    if how in (WORD_REGEX, REGEX):
        match = matcher.search(spaced if how == WORD_REGEX else sentence)
        return match.group(0).strip() if match else None
    text, longer = matcher  # OUTSIDE_WORDS
    inside = sum(sentence.count(word) * word.count(text) for word in longer)
    return text if sentence.count(text) > inside else None


def _evidence(rule: Rule, sentences: list[str], found: Found) -> list[str] | None:
    """What matched per group (its first-defined phrase present) and the
    pattern's match in one of `sentences`; None if anything is missing."""
    shown = []
    for group in rule.groups:
        if not (present := group.intersection(found)):
            return None
        shown.append(found[min(present)])
    if rule.pattern is None:
        return shown
    match = next((m for sentence in sentences if (m := rule.pattern.search(sentence))), None)
    return [*shown, match.group(0)] if match else None


def _by_sentence(rule: Rule, sentences: list[str], per_sentence: list[Found]) -> list[str] | None:
    """Like `_evidence`, seeing only sentences free of the rule's sentence
    guards, and with `same_sentence` one such sentence at a time."""
    open_ = [
        (s, f) for s, f in zip(sentences, per_sentence, strict=True) if rule.unless_in_sentence.isdisjoint(f)
    ]
    if rule.same_sentence:
        views = [([sentence], found) for sentence, found in open_]
    else:
        merged: Found = {}
        for _, found in reversed(open_):
            merged.update(found)
        views = [([sentence for sentence, _ in open_], merged)]
    return next((shown for texts, found in views if (shown := _evidence(rule, texts, found))), None)


def shipped_dir() -> Traversable:
    """Where the shipped rules live: the installed `router.shipped` package,
    or the repository's config/ when running from a checkout without it."""
    try:
        return importlib.resources.files("router.shipped")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "config"


def load_rules(extra: Sequence[Path] = ()) -> RuleSet:
    """Shipped rule files (by name), then the desk's own in the order given,
    as one RuleSet; every problem in every file is raised at once as ConfigError."""
    shipped = sorted((f for f in (shipped_dir() / "rules").iterdir() if f.name.endswith(".toml")), key=str)
    return RuleSet(compiler.compile_rule_files([*shipped, *extra]))


def new_text(text: str) -> str:
    """The customer's own words: reply history ("On ... wrote:" and what
    follows, "> " lines) cut off, as SPEC 4 says to judge. Channels should
    already split it off; this catches the ones that cannot (chat pastes,
    clients that quote inline). A message that is all quote is kept whole:
    it is a forward, and the customer wants it read."""
    if header := _QUOTE_HEADER.search(text):
        text = text[: header.start()]
    own = _QUOTED_LINE.sub("", text) if ">" in text else text
    return own if own.strip() else text


def classify(text: str, subject: str | None, rules: RuleSet, *, auto_generated: bool = False) -> Verdict:
    """SPEC 4's policy: the most urgent firing rule sets the urgency, the first
    firing category in precedence order (security first) sets the category.

    Auto-generated mail is low/general whatever it says: bounces and
    auto-replies quote alarming text ("your withdrawal failed") all the time.
    """
    body = f"{subject}\n{new_text(text)}" if subject else new_text(text)
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
