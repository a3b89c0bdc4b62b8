"""`support-router triage eval`: score the rules against labeled messages.

A desk that edits its rules needs to see what a change costs before it
ships: per-label precision and recall (for security, recall is the figure
that matters) and the confusion matrices that show where misses go.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from router.errors import ConfigError
from router.model import Category, Urgency
from router.triage import RuleSet, classify

Example = tuple[str, str | None, Urgency, Category]


def evaluate(path: Path, rules: RuleSet) -> dict[str, Any]:
    """The SPEC 5 `--json` object, exactly its keys. Figures are rounded to
    4 places; a precision with no predictions of that label, or a recall with
    no gold examples of it, is 0.0 (scikit-learn's zero_division=0), so
    every figure is a number a script can compare."""
    examples = _read(path)
    verdicts = [classify(text, subject, rules) for text, subject, _, _ in examples]
    gold_u = [urgency for _, _, urgency, _ in examples]
    gold_c = [category for _, _, _, category in examples]
    pred_u = [v.urgency for v in verdicts]
    pred_c = [v.category for v in verdicts]
    return {
        "n": len(examples),
        "urgency_accuracy": _accuracy(gold_u, pred_u),
        "category_accuracy": _accuracy(gold_c, pred_c),
        "per_urgency": _per_label(list(Urgency), gold_u, pred_u),
        "per_category": _per_label(list(Category), gold_c, pred_c),
        "confusion": _confusion(list(Urgency), gold_u, pred_u),
        "predictions": [
            {"urgency": v.urgency.value, "category": v.category.value, "reason": v.reason} for v in verdicts
        ],
    }


def _read(path: Path) -> list[Example]:
    """Every bad line is reported, so one run shows all the fixes needed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from exc
    examples: list[Example] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}: line {number}: not valid JSON: {exc.msg}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}: line {number}: must be a JSON object")
            continue
        before = len(problems)
        text, subject = row.get("text"), row.get("subject")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path}: line {number}: text: required, a non-empty string")
        if subject is not None and not isinstance(subject, str):
            problems.append(f"{path}: line {number}: subject: must be a string")
        urgency = _label(row, "urgency", Urgency, f"{path}: line {number}", problems)
        category = _label(row, "category", Category, f"{path}: line {number}", problems)
        if len(problems) == before:
            examples.append((text, subject, urgency, category))
    if problems:
        raise ConfigError(problems)
    if not examples:
        raise ConfigError([f"{path}: no labeled lines"])
    return examples


def _label(row: dict[str, Any], key: str, enum: type[StrEnum], where: str, problems: list[str]) -> Any:
    try:
        return enum(row.get(key))
    except ValueError:
        shown = "missing" if key not in row else f"{row[key]!r} is not one of {', '.join(enum)}"
        problems.append(f"{where}: {key}: {shown}")
        return None


def _accuracy(gold: list[Any], predicted: list[Any]) -> float:
    return round(sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold), 4)


def _ratio(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 0.0


def _per_label(labels: list[Any], gold: list[Any], predicted: list[Any]) -> dict[str, dict[str, Any]]:
    pairs = list(zip(gold, predicted, strict=True))
    out = {}
    for label in labels:
        hits = sum(g == p == label for g, p in pairs)
        support = gold.count(label)
        out[label.value] = {
            "precision": _ratio(hits, predicted.count(label)),
            "recall": _ratio(hits, support),
            "support": support,
        }
    return out


def _confusion(labels: list[Any], gold: list[Any], predicted: list[Any]) -> dict[str, dict[str, int]]:
    matrix = {g.value: {p.value: 0 for p in labels} for g in labels}
    for g, p in zip(gold, predicted, strict=True):
        matrix[g.value][p.value] += 1
    return matrix


def format_report(result: dict[str, Any]) -> str:
    """Plain-text tables for a terminal: figures first, then where misses went."""
    lines = [
        f"{result['n']} messages   urgency accuracy {result['urgency_accuracy']:.3f}"
        f"   category accuracy {result['category_accuracy']:.3f}",
    ]
    for title, key in (("urgency", "per_urgency"), ("category", "per_category")):
        lines += ["", f"{title:<16}{'precision':>10}{'recall':>10}{'support':>10}"]
        for label, row in result[key].items():
            lines.append(f"{label:<16}{_cell(row['precision'])}{_cell(row['recall'])}{row['support']:>10}")
    matrix = result["confusion"]
    labels = list(matrix)
    width = max(8, *(len(label) + 2 for label in labels))
    lines += ["", "urgency confusion (rows: expected, columns: predicted)"]
    lines.append(" " * 16 + "".join(f"{label:>{width}}" for label in labels))
    for gold in labels:
        lines.append(f"{gold:<16}" + "".join(f"{matrix[gold][p]:>{width}}" for p in labels))
    return "\n".join(lines)


def _cell(value: float) -> str:
    return f"{value:>10.3f}"
