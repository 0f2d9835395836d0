"""Labels from free-text radiology reports: mentions of vocabulary findings, in context.

A report is split into sentences (section headers split too, and give section context: a
mention under "Past medical history" is historical, under "Family history" a relative's). Every
mention of a finding (a synonym or pattern of the vocabulary, typos tolerated when the
vocabulary says ``fuzzy``) is assessed by the ConText engine; a "normal" statement of the
vocabulary ("the spleen is normal in size") is an absent mention. Per finding the report then
says, in this order of precedence:

- ``present``: some mention is affirmed, current and the patient's;
- ``uncertain``: else some mention is possible ("possible", "cannot be excluded");
- ``absent``: else some mention is negated ("no pleural effusion") or normal;
- ``not_mentioned``: no current mention of the patient (none at all, or only historical,
  hypothetical or family ones).

Each label keeps the character span of the sentence that decided it (never its text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from umit.labels.context import ConText, apply_section, section_at, split_sentences
from umit.labels.vocabulary import Finding, Vocabulary

LABELER_VERSION = "umit-context/1"
"""Stored with every label; bump when rules or precedence change what a report yields."""

VALUES = ("present", "uncertain", "absent", "not_mentioned")
_PRECEDENCE = {"present": 0, "uncertain": 1, "absent": 2}


@dataclass
class Mention:
    """One mention of a finding in a report (character offsets into the report)."""

    finding: str
    start: int
    end: int
    sentence_start: int
    sentence_end: int
    value: str  # present | uncertain | absent | not_current
    triggers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ReportLabel:
    """What one report says about one finding."""

    finding: str
    value: str
    sentence_start: int | None = None
    sentence_end: int | None = None
    n_mentions: int = 0


def _spans(patterns: list, text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    for rx in patterns:
        out.extend(m.span() for m in rx.finditer(text, lo, hi) if m.end() > m.start())
    return out


def _longest_first(spans: list[tuple[int, int]], blocked: list[tuple[int, int]]) -> list:
    taken: list[tuple[int, int]] = []
    for s in sorted(set(spans), key=lambda s: (s[0] - s[1], s[0])):
        if all(s[1] <= b[0] or s[0] >= b[1] for b in [*blocked, *taken]):
            taken.append(s)
    return sorted(taken)


def find_mentions(text: str, finding: Finding, engine: ConText) -> list[Mention]:
    """Every mention of ``finding`` in ``text`` with its value in context."""
    out = []
    for lo, hi in split_sentences(text):
        normal = _longest_first(_spans(finding.normal, text, lo, hi), [])
        excluded = _spans(finding.exclude, text, lo, hi)
        for a, b in normal:
            out.append(Mention(finding.name, a, b, lo, hi, "absent", [("NORMAL", text[a:b])]))
        for a, b in _longest_first(_spans(finding.mention, text, lo, hi), [*normal, *excluded]):
            assertion = engine.assess(text[lo:hi], a - lo, b - lo)
            assertion = apply_section(assertion, section_at(text, a))
            out.append(Mention(finding.name, a, b, lo, hi, assertion.value, assertion.triggers))
    return sorted(out, key=lambda m: m.start)


def label_report(
    text: str, vocabulary: Vocabulary, engine: ConText | None = None
) -> dict[str, ReportLabel]:
    """Finding -> :class:`ReportLabel` for every finding of the vocabulary."""
    engine = engine or ConText()
    out = {}
    for name, finding in vocabulary.findings.items():
        mentions = find_mentions(text, finding, engine)
        current = [m for m in mentions if m.value in _PRECEDENCE]
        if not current:
            out[name] = ReportLabel(name, "not_mentioned", n_mentions=len(mentions))
            continue
        best = min(current, key=lambda m: (_PRECEDENCE[m.value], m.start))
        out[name] = ReportLabel(
            name, best.value, best.sentence_start, best.sentence_end, n_mentions=len(mentions)
        )
    return out
