"""A ConText rule engine: negation, uncertainty, history, hypothesis and experiencer of a mention.

Implements the trigger / scope / termination semantics of NegEx (Chapman et al. 2001) and ConText
(Harkema et al. 2009), as medspaCy's ``ConText`` component does, without spaCy:

- a *trigger* is a phrase of one category (``NEGATED``, ``POSSIBLE``, ``HISTORICAL``,
  ``HYPOTHETICAL``, ``FAMILY``, ``OTHER``) and one direction: ``forward`` triggers ("no",
  "history of") modify what follows, ``backward`` triggers ("is ruled out", "was excluded") what
  precedes, ``bidirectional`` ones both;
- the *scope* of a trigger runs to the end of the sentence (or its start, backwards) and stops at
  a *termination* term ("but", "however", "although", "which", ...), or after ``max_scope``
  tokens when one is set;
- *pseudo-triggers* ("no increase", "not only", "no change", "gram negative") are phrases that
  contain a trigger word but are not triggers: their span can never start a trigger;
- overlapping phrases: the longest match wins, so "cannot be excluded" is uncertainty, not
  negation;
- double negation: a negation trigger inside the scope of another negation trigger cancels both
  ("the effusion is not absent" is affirmed).

Matching is on lower-cased text with flexible whitespace; all offsets are character offsets into
the text given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

NEGATED = "NEGATED"
POSSIBLE = "POSSIBLE"
HISTORICAL = "HISTORICAL"
HYPOTHETICAL = "HYPOTHETICAL"
FAMILY = "FAMILY"
OTHER = "OTHER"
PSEUDO = "PSEUDO"
TERMINATE = "TERMINATE"
CATEGORIES = (NEGATED, POSSIBLE, HISTORICAL, HYPOTHETICAL, FAMILY, OTHER, PSEUDO, TERMINATE)
DIRECTIONS = ("forward", "backward", "bidirectional", "none")


@dataclass(frozen=True)
class Rule:
    """One trigger phrase.

    Attributes:
        phrase: Literal phrase (case-insensitive, any run of whitespace matches a space) or, with
            ``regex=True``, a regular expression.
        category: One of :data:`CATEGORIES`.
        direction: "forward", "backward", "bidirectional", or "none" (pseudo and termination).
        regex: ``phrase`` is a regular expression.
    """

    phrase: str
    category: str
    direction: str = "forward"
    regex: bool = False

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"rule {self.phrase!r}: category must be one of {CATEGORIES}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"rule {self.phrase!r}: direction must be one of {DIRECTIONS}")

    def pattern(self) -> str:
        return phrase_pattern(self.phrase, self.regex)


def phrase_pattern(phrase: str, regex: bool = False) -> str:
    """The regular expression of a phrase: whole words only (where it begins or ends with a word
    character), any run of whitespace for a space."""
    if regex:
        return rf"(?<!\w)(?:{phrase})(?!\w)"
    words = phrase.split()
    body = r"\s+".join(map(re.escape, words))
    head = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
    tail = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
    return head + body + tail


def _rules(category: str, direction: str, phrases: Iterable[str]) -> list[Rule]:
    return [Rule(p, category, direction) for p in phrases]


def _merge(rules: list[Rule]) -> tuple[Rule, ...]:
    """One rule per (phrase, category): a phrase listed forward and backward is bidirectional."""
    out: dict[tuple[str, str], Rule] = {}
    for r in rules:
        key = (r.phrase, r.category)
        old = out.get(key)
        if old is not None and old.direction != r.direction:
            r = Rule(r.phrase, r.category, "bidirectional", r.regex)
        out[key] = r
    return tuple(out.values())


# The default rules: NegEx's and ConText's lexicons (Chapman's negex_triggers, pyConText's
# lexical_kb), trimmed to what clinical and radiology prose uses, plus radiology phrasings.
DEFAULT_RULES: tuple[Rule, ...] = _merge(
    _rules(
        NEGATED,
        "forward",
        [
            "no",
            "not",
            "without",
            "denies",
            "denied",
            "denying",
            "negative for",
            "-ve for",
            "free of",
            "absence of",
            "no evidence of",
            "no evidence for",
            "no signs of",
            "no sign of",
            "no suspicious",
            "no definite",
            "never",
            "neither",
            "nor",
            "non",
            "rules out",
            "ruled out",
            "rule out for",
            "resolution of",
            "resolved",
            "fails to reveal",
            "no new",
            "not demonstrate",
            "not show",
            "not see",
            "no findings of",
            "there is no",
            "there are no",
            "absent",
            "unremarkable for",
            "is not",
            "are not",
            "was not",
            "were not",
            "cannot see",
            "clear of",
            "none",
            "negative",
            "w/o",
            "doesn't",
            "don't",
            "did not",
            "does not",
            "do not",
            "no longer",
        ],
    )
    + _rules(
        NEGATED,
        "backward",
        [
            "is ruled out",
            "are ruled out",
            "have been ruled out",
            "has been ruled out",
            "was ruled out",
            "were ruled out",
            "is absent",
            "are absent",
            "not seen",
            "is not seen",
            "are not seen",
            "not identified",
            "not visualized",
            "not demonstrated",
            "not present",
            "was negative",
            "is negative",
            "are negative",
            "unlikely",
            "free",
            "has resolved",
            "have resolved",
            "is resolved",
            "not detected",
            "no longer present",
            "not appreciated",
            "resolved",
            "none",
        ],
    )
    + _rules(
        POSSIBLE,
        "forward",
        [
            "possible",
            "possibly",
            "probable",
            "probably",
            "likely",
            "questionable",
            "question of",
            "suspicious for",
            "suspicion of",
            "suspected",
            "suspect",
            "concern for",
            "concerning for",
            "cannot exclude",
            "can not exclude",
            "cannot be excluded",
            "cannot rule out",
            "can not rule out",
            "not ruled out",
            "not excluded",
            "not exclude",
            "may represent",
            "may be",
            "might be",
            "could be",
            "consistent with",
            "suggestive of",
            "suggests",
            "suggesting",
            "worrisome for",
            "differential diagnosis",
            "ddx",
            "equivocal",
            "indeterminate",
            "r/o",
            "rule out",
            "to rule out",
            "evaluate for",
            "evaluation for",
            "versus",
            "vs",
            "presumed",
            "presumably",
            "borderline",
            "apparent",
            "perhaps",
            "uncertain",
            "not certain",
            "question",
            "doubtful",
        ],
    )
    + _rules(
        POSSIBLE,
        "backward",
        [
            "is possible",
            "are possible",
            "cannot be excluded",
            "can not be excluded",
            "cannot be ruled out",
            "can not be ruled out",
            "not excluded",
            "not ruled out",
            "is suspected",
            "are suspected",
            "is not excluded",
            "is questioned",
            "is likely",
            "are likely",
            "?",
            "versus",
            "vs",
            "is not ruled out",
        ],
    )
    + _rules(
        HISTORICAL,
        "forward",
        [
            "history of",
            "h/o",
            "hx of",
            "hx",
            "past history of",
            "past medical history",
            "pmh",
            "previous",
            "previously",
            "prior",
            "status post",
            "s/p",
            "past",
            "remote",
            "history",
        ],
    )
    + _rules(
        HISTORICAL,
        "backward",
        [
            "in the past",
            "previously",
            "years ago",
            "months ago",
            "as a child",
            "in childhood",
            "removed",
            "resected",
            "since childhood",
            "history",
        ],
    )
    + _rules(
        HYPOTHETICAL,
        "forward",
        [
            "if",
            "should",
            "return for",
            "return if",
            "come back for",
            "call for",
            "call if",
            "in case",
            "as needed",
            "prn",
            "watch for",
            "monitor for",
            "any new",
            "if any",
            "in the event",
            "risk of",
            "at risk for",
        ],
    )
    + _rules(
        FAMILY,
        "bidirectional",
        [
            "family history",
            "family hx",
            "fhx",
            "fh",
            "mother",
            "mother's",
            "father",
            "father's",
            "brother",
            "brothers",
            "sister",
            "sisters",
            "sibling",
            "siblings",
            "aunt",
            "uncle",
            "grandmother",
            "grandfather",
            "grandparent",
            "cousin",
            "parent",
            "parents",
            "maternal",
            "paternal",
            "family member",
            "relatives",
            "son",
            "daughter",
            "twin",
        ],
    )
    + _rules(
        PSEUDO,
        "none",
        [
            "no increase",
            "no significant increase",
            "no change",
            "no significant change",
            "no interval change",
            "no definite change",
            "no suspicious change",
            "not only",
            "not necessarily",
            "not cause",
            "not drain",
            "not extend",
            "not certain whether",
            "not certain if",
            "without difficulty",
            "without any further",
            "no further",
            "gram negative",
            "not appear",
            "not been ruled out",
            "no interval increase",
            "no other",
            "without change",
            "no sudden",
            "not include",
            "whether or not",
            "not limited to",
            "no history of change",
            "history and physical",
            "history and examination",
            "social history",
            "past surgical history",
            "history taking",
            "clinical history",
            "prior to",
            "post op",
            "post-op",
            "postoperative",
            "post operative",
            "compared to prior",
            "compared with prior",
            "comparison with prior",
            "prior study",
            "prior exam",
            "prior examination",
            "prior ct",
            "prior studies",
            "previous study",
            "previous exam",
            "previous examination",
            "previous ct",
            "again noted",
            "informed the family",
            "likely due to",
            "if needed",
        ],
    )
    + _rules(
        TERMINATE,
        "none",
        [
            "but",
            "however",
            "although",
            "though",
            "except",
            "aside from",
            "apart from",
            "which",
            "yet",
            "still",
            "while",
            "whereas",
            "other than",
            "secondary to",
            "due to",
            "because",
            "as a result of",
            "cause of",
            "cause for",
            "origin of",
            "source of",
            "reason for",
            "etiology of",
            "presents",
            "presented",
            "presenting",
            "complains",
            "complained",
            "reports",
            "reported",
            "noted",
            "now",
            "today",
            "currently",
            "and has",
            "and is",
            "and was",
            "there is",
            "there are",
            ";",
        ],
    )
)


@dataclass(frozen=True)
class Match:
    """A rule's match in a sentence (character offsets into the sentence)."""

    rule: Rule
    start: int
    end: int


@dataclass
class Assertion:
    """The context of one target mention.

    Attributes:
        negated: Asserted absent.
        possible: Asserted as uncertain.
        historical: Asserted in the past (history of, prior, s/p).
        hypothetical: Asserted conditionally (if, should, return for).
        experiencer: "patient", "family" or "other".
        triggers: The phrases that modified the mention, as ``(category, phrase)``.
    """

    negated: bool = False
    possible: bool = False
    historical: bool = False
    hypothetical: bool = False
    experiencer: str = "patient"
    triggers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def value(self) -> str:
        """What the mention says about the patient now: present / absent / uncertain, or
        "not_current" (history, hypothesis, or someone else's)."""
        if self.experiencer != "patient" or self.hypothetical:
            return "not_current"
        if self.negated:
            return "absent"
        if self.historical:
            return "not_current"
        if self.possible:
            return "uncertain"
        return "present"


class ConText:
    """The rule engine. ``assess(sentence, start, end)`` gives the :class:`Assertion` of the
    mention ``sentence[start:end]``.

    Args:
        rules: Trigger, pseudo-trigger and termination rules (default :data:`DEFAULT_RULES`).
        max_scope: Longest scope in tokens (None: to the sentence boundary or a terminator).
    """

    def __init__(self, rules: Iterable[Rule] = DEFAULT_RULES, max_scope: int | None = None):
        self.rules = tuple(rules)
        if max_scope is not None and max_scope < 1:
            raise ValueError(f"max_scope must be >= 1 or None, got {max_scope!r}")
        self.max_scope = max_scope
        # one alternation per rule; longest-match resolution happens in _matches
        self._compiled = [(r, re.compile(r.pattern(), re.IGNORECASE)) for r in self.rules]

    def matches(self, sentence: str) -> list[Match]:
        """Non-overlapping rule matches: at each position the longest phrase wins, so a pseudo
        or a longer trigger hides the shorter triggers inside it."""
        found = []
        for rule, rx in self._compiled:
            for m in rx.finditer(sentence):
                if m.end() > m.start():
                    found.append(Match(rule, m.start(), m.end()))
        found.sort(key=lambda m: (-(m.end - m.start), m.start))
        taken: list[Match] = []
        for m in found:
            if all(m.end <= t.start or m.start >= t.end for t in taken):
                taken.append(m)
        return sorted(taken, key=lambda m: m.start)

    def _scope(
        self, sentence: str, m: Match, terms: list[Match], backward: bool
    ) -> tuple[int, int]:
        """Character span the trigger ``m`` modifies in one direction."""
        if backward:
            lo = max([t.end for t in terms if t.end <= m.start], default=0)
            span = (lo, m.start)
        else:
            hi = min([t.start for t in terms if t.start >= m.end], default=len(sentence))
            span = (m.end, hi)
        if self.max_scope is not None:
            toks = [t.span() for t in re.finditer(r"\w+|[^\w\s]", sentence[span[0] : span[1]])]
            if len(toks) > self.max_scope:
                if backward:
                    span = (span[0] + toks[-self.max_scope][0], span[1])
                else:
                    span = (span[0], span[0] + toks[self.max_scope - 1][1])
        return span

    def assess(self, sentence: str, start: int, end: int) -> Assertion:
        """The context of the target ``sentence[start:end]`` within its sentence."""
        if not 0 <= start < end <= len(sentence):
            raise ValueError(f"target span ({start}, {end}) is outside the sentence")
        ms = [m for m in self.matches(sentence) if m.end <= start or m.start >= end]
        terms = [m for m in ms if m.rule.category == TERMINATE]
        triggers = [m for m in ms if m.rule.category not in (TERMINATE, PSEUDO)]
        scopes: dict[Match, list[tuple[int, int]]] = {}
        for m in triggers:
            spans = []
            if m.rule.direction in ("forward", "bidirectional"):
                spans.append(self._scope(sentence, m, terms, backward=False))
            if m.rule.direction in ("backward", "bidirectional"):
                spans.append(self._scope(sentence, m, terms, backward=True))
            scopes[m] = spans

        def covers(m: Match, lo: int, hi: int) -> bool:
            return any(a <= lo and hi <= b for a, b in scopes[m])

        # double negation: a negation inside another negation's scope cancels both
        negs = [m for m in triggers if m.rule.category == NEGATED]
        cancelled = set()
        for a in negs:
            for b in negs:
                if (
                    a.end <= b.start
                    and covers(a, b.start, b.end)
                    and not a.end <= start < b.start
                    and _ADJACENT.match(sentence[a.end : b.start])
                ):
                    cancelled.update((a, b))
        out = Assertion()
        for m in triggers:
            if m in cancelled or not covers(m, start, end):
                continue
            cat = m.rule.category
            out.triggers.append((cat, sentence[m.start : m.end]))
            if cat == NEGATED:
                out.negated = True
            elif cat == POSSIBLE:
                out.possible = True
            elif cat == HISTORICAL:
                out.historical = True
            elif cat == HYPOTHETICAL:
                out.hypothetical = True
            elif cat == FAMILY:
                out.experiencer = "family"
            elif cat == OTHER and out.experiencer == "patient":
                out.experiencer = "other"
        return out


_ADJACENT = re.compile(r"^\s*(?:\w+\s+)?$")
"""What may stand between two negations that cancel: nothing, or one word ("not entirely
absent"); a list ("no cough, no fever") has punctuation or the target between them."""

_SENTENCE_END = re.compile(
    r"(?<=[.!?;])\s+|\s{2,}(?=[A-Z][A-Z /()\-]{3,}:)|\n\s*\n|\n(?=\s*[A-Z][A-Za-z /]{2,40}:)|(?<=:)\s*\n"
)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of a report.

    A sentence ends at ``. ! ? ;`` followed by whitespace, at a blank line, and before a section
    header ("FINDINGS:", "Impression:"), which starts the next sentence (:func:`section_at`
    gives it to the sentences under it).
    Decimal points ("1.5 cm") do not end a sentence (no whitespace follows them).
    """
    spans = []
    pos = 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


_SECTION = re.compile(r"(?:^|(?<=\s))([A-Za-z][A-Za-z /()]{2,40}):")
_HISTORY_SECTION = re.compile(r"\b(past|medical|social|surgical)\b.*\bhistory\b|\bpmh\b", re.I)
_FAMILY_SECTION = re.compile(r"\bfamily\s+(history|hx)\b", re.I)


def section_at(text: str, pos: int) -> str | None:
    """The section header ("PAST MEDICAL HISTORY", "Findings") that ``text[pos]`` falls under."""
    last = None
    for m in _SECTION.finditer(text, 0, pos):
        last = m.group(1).strip()
    return last


def apply_section(assertion: Assertion, section: str | None) -> Assertion:
    """Section context (ConText's section rules): under "Past medical history" or "Social
    history" a mention is historical, under "Family history" it is a relative's."""
    if section and _FAMILY_SECTION.search(section):
        assertion.experiencer = "family"
        assertion.triggers.append((FAMILY, section))
    elif section and _HISTORY_SECTION.search(section):
        assertion.historical = True
        assertion.triggers.append((HISTORICAL, section))
    return assertion
