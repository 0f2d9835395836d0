"""Findings vocabularies: finding -> synonyms / regexes / normal statements, read from YAML.

The default CT set ships as ``umit/labels/vocabularies/ct_default.yaml``; a user vocabulary has
the same layout (see that file). Every problem names the file: malformed YAML, a finding without
any synonym or pattern, a regular expression that does not compile, an unknown key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from umit.errors import InputError
from umit.labels.context import phrase_pattern

VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabularies"
DEFAULT_VOCABULARY = VOCABULARY_DIR / "ct_default.yaml"
_FINDING_KEYS = {"synonyms", "patterns", "normal", "exclude"}
_TOP_KEYS = {"name", "version", "fuzzy", "findings"}
_FUZZY_MIN_LETTERS = 7


def _typo_variants(word: str) -> list[str]:
    """One-edit typos of ``word``: a letter dropped, a letter doubled, two neighbours swapped."""
    out = set()
    for i in range(len(word)):
        out.add(word[:i] + word[i + 1 :])
        out.add(word[:i] + word[i] + word[i:])
        if i + 1 < len(word):
            out.add(word[:i] + word[i + 1] + word[i] + word[i + 2 :])
    out.discard(word)
    return sorted(out)


def _fuzzy_phrase(phrase: str) -> str:
    """Regex of ``phrase`` whose long words also match their one-edit typos."""
    parts = []
    for w in phrase.split():
        if w.isalpha() and len(w) >= _FUZZY_MIN_LETTERS:
            alts = [w, *_typo_variants(w.lower())]
            parts.append("(?:" + "|".join(map(re.escape, alts)) + ")")
        else:
            parts.append(re.escape(w))
    return r"\s+".join(parts)


@dataclass
class Finding:
    """One finding's compiled matchers."""

    name: str
    mention: list[re.Pattern] = field(default_factory=list)
    normal: list[re.Pattern] = field(default_factory=list)
    exclude: list[re.Pattern] = field(default_factory=list)


@dataclass
class Vocabulary:
    """A findings vocabulary: ``findings`` in file order, with a name and a content hash."""

    name: str
    version: int
    findings: dict[str, Finding]
    source: str
    sha256: str

    @property
    def tag(self) -> str:
        """``name@v<version>:<hash8>``, stored with every label it produced."""
        return f"{self.name}@v{self.version}:{self.sha256[:8]}"

    def check_findings(self, names: list[str], where: str | Path | None = None) -> None:
        """Raise naming ``where`` if a requested finding is not in this vocabulary."""
        unknown = [n for n in names if n not in self.findings]
        if unknown:
            raise InputError(
                where or self.source,
                f"finding(s) {unknown} are not in the vocabulary {self.source} "
                f"(it has: {', '.join(self.findings)})",
            )


def _strings(value: object, path: Path, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(path, f"{where} must be a list of non-empty strings, got {value!r}")
    return value


def _compile(pattern: str, path: Path, where: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise InputError(
            path, f"{where}: {pattern!r} is not a valid regular expression ({exc})"
        ) from exc


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read and compile a vocabulary (default: the shipped CT set)."""
    path = Path(path) if path is not None else DEFAULT_VOCABULARY
    if not path.is_file():
        raise InputError(path, "vocabulary file not found")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise InputError(path, f"vocabulary is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict):
        raise InputError(path, "vocabulary must be a mapping with a 'findings' mapping")
    extra = set(data) - _TOP_KEYS
    if extra:
        raise InputError(
            path, f"unknown vocabulary key(s) {sorted(extra)}; allowed {sorted(_TOP_KEYS)}"
        )
    fuzzy = bool(data.get("fuzzy", False))
    findings: dict[str, Finding] = {}
    for name, spec in data["findings"].items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise InputError(
                path, f"finding name {name!r} must be an identifier (letters, digits, _)"
            )
        if not isinstance(spec, dict):
            raise InputError(path, f"finding {name!r} must be a mapping of {sorted(_FINDING_KEYS)}")
        bad = set(spec) - _FINDING_KEYS
        if bad:
            raise InputError(path, f"finding {name!r}: unknown key(s) {sorted(bad)}")
        synonyms = _strings(spec.get("synonyms"), path, f"finding {name!r} synonyms")
        patterns = _strings(spec.get("patterns"), path, f"finding {name!r} patterns")
        if not synonyms and not patterns:
            raise InputError(path, f"finding {name!r} has no synonyms and no patterns")
        f = Finding(name)
        for s in synonyms:
            body = _fuzzy_phrase(s) if fuzzy else None
            pat = phrase_pattern(body, regex=True) if body else phrase_pattern(s)
            f.mention.append(_compile(pat, path, f"finding {name!r} synonym"))
        for p in patterns:
            f.mention.append(
                _compile(phrase_pattern(p, regex=True), path, f"finding {name!r} pattern")
            )
        for p in _strings(spec.get("normal"), path, f"finding {name!r} normal"):
            f.normal.append(
                _compile(phrase_pattern(p, regex=True), path, f"finding {name!r} normal")
            )
        for p in _strings(spec.get("exclude"), path, f"finding {name!r} exclude"):
            f.exclude.append(_compile(phrase_pattern(p), path, f"finding {name!r} exclude"))
        findings[name] = f
    if not findings:
        raise InputError(path, "vocabulary lists no findings")
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(path, f"version must be an integer, got {version!r}")
    return Vocabulary(
        name=str(data.get("name") or path.stem),
        version=version,
        findings=findings,
        source=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
    )
