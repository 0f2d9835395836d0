"""Findings vocabularies: the shipped CT set, typo tolerance, and errors naming the file."""

from __future__ import annotations

import pytest

from umit.errors import InputError
from umit.labels.vocabulary import DEFAULT_VOCABULARY, _typo_variants, load_vocabulary


def test_default_ct_vocabulary_ships_inside_the_package():
    import umit

    v = load_vocabulary()
    assert (
        DEFAULT_VOCABULARY.parent.parent.parent == __import__("pathlib").Path(umit.__file__).parent
    )
    for name in ("pleural_effusion", "liver_lesion", "splenomegaly", "kidney_cyst", "fracture"):
        assert name in v.findings
    assert v.tag.startswith("ct_default@v1:") and len(v.sha256) == 64


def test_typo_variants_are_one_edit_away():
    variants = _typo_variants("effusion")
    assert {"efusion", "efffusion", "effsuion"} <= set(variants)
    assert "effusion" not in variants and "effusoin" in variants
    v = load_vocabulary()
    f = v.findings["splenomegaly"]
    assert any(rx.search("marked splenomegally") for rx in f.mention)
    assert not any(rx.search("spleen") for rx in f.mention)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("findings: [a, b]\n", "must be a mapping with a 'findings' mapping"),
        ("findings:\n  x: {synonyms: [a]}\nextra: 1\n", r"unknown vocabulary key\(s\) \['extra'\]"),
        ("findings:\n  x: {patterns: ['(unclosed']}\n", "is not a valid regular expression"),
        ("findings:\n  x: {normal: [fine]}\n", "has no synonyms and no patterns"),
        ("findings:\n  x: {synonyms: [a], colour: red}\n", r"unknown key\(s\) \['colour'\]"),
        ("findings:\n  'bad name': {synonyms: [a]}\n", "must be an identifier"),
        ("findings:\n  x: {synonyms: [1]}\n", "must be a list of non-empty strings"),
        ("findings: {x: {synonyms: [a]}}\nversion: two\n", "version must be an integer"),
        ("findings: {x: [a, b\n", "not valid YAML"),
    ],
)
def test_malformed_vocabularies_name_the_file(tmp_path, text, problem):
    path = tmp_path / "v.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"^{path}: .*{problem}"):
        load_vocabulary(path)


def test_missing_vocabulary_and_unknown_finding(tmp_path):
    with pytest.raises(InputError, match="vocabulary file not found"):
        load_vocabulary(tmp_path / "none.yaml")
    with pytest.raises(InputError, match=r"\['nodules'\] are not in the vocabulary"):
        load_vocabulary().check_findings(["pleural_effusion", "nodules"])
