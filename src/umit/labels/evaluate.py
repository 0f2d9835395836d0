"""Scores of the labeler on an annotated sentence set (the ConText/NegEx test set format).

Each row holds a sentence, the concept annotated in it (written in upper case inside the
sentence), and its negation (Affirmed / Negated), temporality (Recent / Historical / Not
particular) and experiencer (Patient / Family member / Other). The rule engine
(:class:`~umit.labels.context.ConText`) is scored against a plain keyword baseline: "negated"
when a negation word occurs anywhere in the sentence, "historical" when a history word does,
"family" when a relative is named.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umit.errors import InputError
from umit.labels.context import ConText, apply_section, section_at, split_sentences

REQUIRED_COLUMNS = ("concept", "sentence", "negation", "temporality", "experiencer")

_KEYWORD_NEG = re.compile(r"\b(no|not|denies|denied|without|negative|never|absent|none)\b", re.I)
_KEYWORD_HIST = re.compile(r"\b(history|previous|previously|prior|past|ago|s/p)\b", re.I)
_KEYWORD_HYPO = re.compile(r"\b(if|should)\b", re.I)
_KEYWORD_FAM = re.compile(r"\b(mother|father|sister|brother|family|aunt|uncle|grand\w+)\b", re.I)


@dataclass
class AnnotatedSentence:
    row: int
    sentence: str
    start: int
    end: int
    negated: bool
    temporality: str  # "recent" | "historical" | "hypothetical"
    experiencer: str  # "patient" | "family" | "other"


def _find_concept(sentence: str, concept: str) -> tuple[int, int] | None:
    """Span of the annotated concept: the occurrence written in upper case where there is one."""
    words = concept.split()
    if not words:
        return None
    rx = re.compile(r"\s+".join(map(re.escape, words)), re.IGNORECASE)
    hits = list(rx.finditer(sentence))
    if not hits:
        return None
    upper = [m for m in hits if m.group(0) == m.group(0).upper()]
    m = (upper or hits)[0]
    return m.start(), m.end()


def read_annotations(path: str | Path, skipped: list[int] | None = None) -> list[AnnotatedSentence]:
    """Rows of a ConText-style TSV (header row with :data:`REQUIRED_COLUMNS`).

    A row whose concept does not occur in its sentence (the set has a few: "phrase is longer
    than sentence") cannot be scored; its row number is appended to ``skipped``."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the annotations ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise InputError(
            path, f"needs a header row with columns {REQUIRED_COLUMNS}; missing {missing}"
        )
    temporal = {"recent": "recent", "historical": "historical", "not particular": "hypothetical"}
    people = {"patient": "patient", "family member": "family", "other": "other"}
    out = []
    for i, r in enumerate(rows, start=2):
        span = _find_concept(r["sentence"], r["concept"])
        if span is None:
            if skipped is None:
                raise InputError(path, f"row {i}: concept {r['concept']!r} is not in its sentence")
            skipped.append(i)
            continue
        try:
            out.append(
                AnnotatedSentence(
                    row=i,
                    sentence=r["sentence"],
                    start=span[0],
                    end=span[1],
                    negated={"affirmed": False, "negated": True}[r["negation"].strip().lower()],
                    temporality=temporal[r["temporality"].strip().lower()],
                    experiencer=people[r["experiencer"].strip().lower()],
                )
            )
        except KeyError as exc:
            raise InputError(path, f"row {i}: unknown annotation value {exc}") from exc
    return out


def keyword_baseline(s: AnnotatedSentence) -> tuple[bool, str, str]:
    """Negated, temporality, experiencer from keywords anywhere in the sentence."""
    temporality = (
        "historical"
        if _KEYWORD_HIST.search(s.sentence)
        else "hypothetical"
        if _KEYWORD_HYPO.search(s.sentence)
        else "recent"
    )
    fam = "family" if _KEYWORD_FAM.search(s.sentence) else "patient"
    return bool(_KEYWORD_NEG.search(s.sentence)), temporality, fam


def context_prediction(engine: ConText, s: AnnotatedSentence) -> tuple[bool, str, str]:
    """The engine's call on the sub-sentence holding the concept (the set's "sentences" are
    sometimes whole report sections; the labeler splits reports the same way)."""
    lo, hi = next(
        ((a, b) for a, b in split_sentences(s.sentence) if a <= s.start and s.end <= b),
        (0, len(s.sentence)),
    )
    a = engine.assess(s.sentence[lo:hi], s.start - lo, s.end - lo)
    a = apply_section(a, section_at(s.sentence, s.start))
    temporality = "historical" if a.historical else "hypothetical" if a.hypothetical else "recent"
    return a.negated, temporality, a.experiencer


def _prf(truth: list[bool], pred: list[bool]) -> dict[str, float]:
    tp = sum(t and p for t, p in zip(truth, pred, strict=True))
    fp = sum(p and not t for t, p in zip(truth, pred, strict=True))
    fn = sum(t and not p for t, p in zip(truth, pred, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def score(sentences: list[AnnotatedSentence], predict: Any) -> dict[str, Any]:
    """Negation P/R/F1, temporality and experiencer accuracy of ``predict(sentence)``."""
    preds = [predict(s) for s in sentences]
    n = len(sentences)
    out: dict[str, Any] = {"n": n}
    out["negated"] = _prf([s.negated for s in sentences], [p[0] for p in preds])
    out["temporality_accuracy"] = sum(
        s.temporality == p[1] for s, p in zip(sentences, preds, strict=True)
    ) / max(n, 1)
    out["historical"] = _prf(
        [s.temporality == "historical" for s in sentences], [p[1] == "historical" for p in preds]
    )
    out["experiencer_accuracy"] = sum(
        s.experiencer == p[2] for s, p in zip(sentences, preds, strict=True)
    ) / max(n, 1)
    return out


def evaluate_context(path: str | Path, engine: ConText | None = None) -> dict[str, Any]:
    """ConText and the keyword baseline on the annotated set at ``path``."""
    skipped: list[int] = []
    sentences = read_annotations(path, skipped)
    engine = engine or ConText()
    return {
        "skipped_rows": skipped,
        "context": score(sentences, lambda s: context_prediction(engine, s)),
        "keyword": score(sentences, keyword_baseline),
        "majority": score(sentences, lambda s: (False, "recent", "patient")),
    }
