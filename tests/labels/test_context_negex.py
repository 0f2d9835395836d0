"""The labeler on real clinical sentences: the ConText/NegEx annotated set (1,600 sentences)."""

from __future__ import annotations

import pytest

from umit.labels.evaluate import evaluate_context

from _shared import require_shared


@pytest.mark.realdata
def test_context_rules_beat_keywords_on_the_context_set():
    path = require_shared("context_negex", "context_annotations_dev.tsv")
    r = evaluate_context(path)
    ctx, kw = r["context"], r["keyword"]
    assert ctx["n"] == 1592 and len(r["skipped_rows"]) == 8  # concepts missing from their sentence
    # measured 2026-12-05: negation F1 0.987 (P 0.991, R 0.982), temporality 0.924,
    # experiencer 0.997; keyword baseline F1 0.865, temporality 0.906
    assert ctx["negated"]["f1"] >= 0.97
    assert ctx["negated"]["precision"] >= 0.97 and ctx["negated"]["recall"] >= 0.96
    assert ctx["temporality_accuracy"] >= 0.91
    assert ctx["experiencer_accuracy"] >= 0.99
    assert ctx["negated"]["f1"] >= kw["negated"]["f1"] + 0.08
    assert ctx["temporality_accuracy"] > kw["temporality_accuracy"]
