"""The ConText rules on hand-written sentences: one test per rule, each a sentence a broken rule
would get wrong."""

from __future__ import annotations

import pytest

from umit.labels.context import ConText, Rule, section_at, split_sentences
from umit.labels.reports import label_report
from umit.labels.vocabulary import load_vocabulary

ENGINE = ConText()
VOCAB = load_vocabulary()


def assess(sentence: str, target: str, engine: ConText = ENGINE):
    start = sentence.lower().index(target.lower())
    return engine.assess(sentence, start, start + len(target))


def labels(text: str) -> dict[str, str]:
    return {k: v.value for k, v in label_report(text, VOCAB).items() if v.value != "not_mentioned"}


@pytest.mark.parametrize(
    ("sentence", "target", "negated"),
    [
        ("No pleural effusion.", "pleural effusion", True),  # pre-trigger
        ("There is no evidence of ascites.", "ascites", True),
        ("The patient denies chest pain.", "chest pain", True),
        ("Pneumothorax is ruled out.", "pneumothorax", True),  # post-trigger
        ("Hydronephrosis is not seen.", "hydronephrosis", True),
        ("Pleural effusion.", "pleural effusion", False),
        ("Small pleural effusion, no pneumothorax.", "pleural effusion", False),  # before "no"
    ],
)
def test_negation_triggers_forward_and_backward(sentence, target, negated):
    assert assess(sentence, target).negated is negated


def test_negation_scope_ends_at_but_however_and_the_sentence():
    s = "No pleural effusion but a small liver lesion."
    assert assess(s, "pleural effusion").negated
    assert not assess(s, "liver lesion").negated
    s = "No ascites; however, a pleural effusion is present."
    assert not assess(s, "pleural effusion").negated
    s = "No ascites, although a pleural effusion is present."
    assert not assess(s, "pleural effusion").negated
    # sentence end: the next sentence is out of scope
    assert labels("No ascites. Pleural effusion.") == {
        "ascites": "absent",
        "pleural_effusion": "present",
    }


def test_pseudo_negations_do_not_negate():
    assert not assess("No increase in the pleural effusion.", "pleural effusion").negated
    assert not assess("No change in the liver lesion.", "liver lesion").negated
    assert not assess("Not only a pleural effusion but ascites.", "pleural effusion").negated
    assert labels("No interval change of the splenomegaly.") == {"splenomegaly": "present"}


def test_double_negation_cancels_but_a_list_of_negations_does_not():
    assert assess("Pleural effusion is unlikely.", "pleural effusion").negated
    assert not assess("Pleural effusion is not unlikely.", "pleural effusion").negated
    s = "No cough, no fever, no pleural effusion."
    assert all(assess(s, t).negated for t in ("cough", "fever", "pleural effusion"))


@pytest.mark.parametrize(
    "sentence",
    [
        "Possible liver lesion.",
        "A liver lesion cannot be excluded.",
        "Cannot rule out a liver lesion.",
        "Findings suspicious for a liver lesion.",
        "A liver lesion is not excluded.",  # negated negation -> uncertainty, not absence
        "Hypodensity, which may represent a liver lesion.",
    ],
)
def test_uncertainty(sentence):
    a = assess(sentence, "liver lesion")
    assert a.possible and not a.negated and a.value == "uncertain"


def test_history_hypothesis_and_experiencer():
    a = assess("History of kidney cyst.", "kidney cyst")
    assert a.historical and a.value == "not_current"
    a = assess("Status post splenectomy for splenomegaly.", "splenomegaly")
    assert a.historical
    a = assess("Prior pleural effusion has resolved.", "pleural effusion")
    assert a.historical and a.negated and a.value == "absent"
    a = assess("If a fracture is suspected, obtain radiographs.", "fracture")
    assert a.hypothetical and a.value == "not_current"
    a = assess("Her mother had a renal cyst.", "renal cyst")
    assert a.experiencer == "family" and a.value == "not_current"
    a = assess("Family history of liver metastases.", "liver metastases")
    assert a.experiencer == "family"
    assert assess("Renal cyst.", "renal cyst").value == "present"


def test_sections_give_context():
    text = "PAST MEDICAL HISTORY: hepatic metastases.\nFINDINGS: No ascites."
    assert labels(text) == {"ascites": "absent"}  # the history mention is not current
    assert section_at(text, text.index("ascites")) == "FINDINGS"
    assert labels("FAMILY HISTORY: renal cysts.\nFINDINGS: Splenomegaly.") == {
        "splenomegaly": "present"
    }


def test_max_scope_limits_a_trigger():
    s = "No acute osseous abnormality in the region of the pleural effusion."
    assert assess(s, "pleural effusion").negated
    assert not assess(s, "pleural effusion", ConText(max_scope=4)).negated


def test_report_precedence_typos_normals_and_exclusions():
    text = (
        "FINDINGS: Spleen is normal in size. Smal left pleural efusion. "
        "Moderate pericardial effusion.\nIMPRESSION: Possible small cyst in the left kidney. "
        "No kidney cyst on the right. Splenomegally is not present."
    )
    got = labels(text)
    assert got == {
        "pleural_effusion": "present",  # typo'd, and the pericardial effusion is excluded
        "splenomegaly": "absent",  # a normal statement and a negation
        "kidney_cyst": "uncertain",  # uncertain beats absent
    }
    assert labels("Moderate pericardial effusion.") == {}
    lab = label_report("No ascites. Ascites in the pelvis.", VOCAB)["ascites"]
    assert lab.value == "present" and (lab.sentence_start, lab.sentence_end) == (12, 34)


def test_split_sentences_keeps_decimals_and_splits_headers():
    text = "FINDINGS:\nA 1.5 cm lesion. No effusion!\nIMPRESSION: Stable."
    spans = [text[a:b] for a, b in split_sentences(text)]
    assert spans == ["FINDINGS:", "A 1.5 cm lesion.", "No effusion!", "IMPRESSION: Stable."]


def test_rule_checks_its_arguments():
    with pytest.raises(ValueError, match="category"):
        Rule("no", "NEGATION")
    with pytest.raises(ValueError, match="direction"):
        Rule("no", "NEGATED", "left")
    with pytest.raises(ValueError, match="max_scope"):
        ConText(max_scope=0)
    with pytest.raises(ValueError, match="outside the sentence"):
        ENGINE.assess("No effusion.", 5, 50)
