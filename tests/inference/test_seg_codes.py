"""Every SNOMED CT code of the DICOM SEG label table is the one pydicom's copy of the DICOM
standard gives: the type is in the context group of its category (CID 7191 tissue, 7192
anatomical structure, 7194 morphologically abnormal structure), the meaning matches, and
laterality comes from CID 244. The umit phantoms' labels are all coded; unknown labels fall back."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import Collection, codes

from umit.data.phantoms import CT_LABELS, MR_LABELS
from umit.inference.seg_codes import (
    ANATOMICAL_STRUCTURE,
    FALLBACK,
    LEFT,
    MORPHOLOGICALLY_ABNORMAL,
    RIGHT,
    TABLE,
    TISSUE,
    segment_coding,
)


def cid(number: int) -> dict[str, str]:
    """Code value -> meaning of a DICOM context group, from pydicom's tables."""
    c = Collection(f"CID{number}")
    return {getattr(c, k).value: getattr(c, k).meaning for k in c.dir()}


def sct_meanings(value: str) -> set[str]:
    """Every meaning pydicom's SNOMED CT dictionary gives the code ``value``."""
    sct = codes.SCT
    return {getattr(sct, k).meaning.lower() for k in sct.dir() if getattr(sct, k).value == value}


TYPE_GROUP = {
    ANATOMICAL_STRUCTURE.value: 7192,
    MORPHOLOGICALLY_ABNORMAL.value: 7194,
    TISSUE.value: 7191,
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_table_codes_are_those_of_the_dicom_context_groups(name):
    category, type_ = TABLE[name]
    assert category.scheme == type_.scheme == "SCT"
    group = cid(TYPE_GROUP[category.value])
    assert type_.value in group, f"{name}: {type_} not in CID {TYPE_GROUP[category.value]}"
    assert type_.meaning.lower() in sct_meanings(type_.value) | {group[type_.value].lower()}


def test_categories_and_laterality():
    categories = cid(7150)
    for c in (MORPHOLOGICALLY_ABNORMAL, TISSUE):
        assert categories[c.value] == c.meaning
    # "Anatomical Structure": 123037004 (dcmqi, Slicer, TotalSegmentator); pydicom's CID 7150
    # still has the older 91723000 for it. Both are SNOMED CT body-structure concepts.
    assert categories["91723000"] == ANATOMICAL_STRUCTURE.meaning
    assert "body structure (body structure)" in sct_meanings(ANATOMICAL_STRUCTURE.value)
    laterality = cid(244)
    assert laterality[LEFT.value] == "Left" and laterality[RIGHT.value] == "Right"
    assert FALLBACK == (TISSUE, TISSUE) and cid(7166)[TISSUE.value] == "Tissue"


def test_every_phantom_label_is_coded():
    for name in [*CT_LABELS.values(), *MR_LABELS.values()]:
        if name != "background":
            assert segment_coding(name).known, name


@pytest.mark.parametrize(
    ("name", "type_value", "modifier"),
    [
        ("liver", "10200004", None),
        ("Kidney Left", "64033007", LEFT),
        ("kidney_right", "64033007", RIGHT),
        ("left_lung", "39607008", LEFT),
        ("lung_upper_lobe_left", "45653009", LEFT),
        ("vertebrae_L3", "36470004", None),
        ("vertebrae", "51282000", None),
        ("adrenal_gland_right", "23451007", RIGHT),
        ("clavicula_left", "51299004", LEFT),
        ("spine", "421060004", None),
        ("body", "38266002", None),
        ("tumour", "108369006", None),
        ("lesion", "52988006", None),
        ("grey_matter", "389081007", None),
        ("csf", "65216001", None),
    ],
)
def test_names_laterality_and_aliases(name, type_value, modifier):
    c = segment_coding(name)
    assert (c.type.value, c.modifier, c.known, c.label) == (type_value, modifier, True, name)


def test_unknown_labels_fall_back_to_tissue_and_keep_their_name():
    for name in ("heart_ventricle_left", "label_7", "left", "gizmo_right"):
        c = segment_coding(name)
        assert (c.category, c.type, c.modifier, c.known) == (TISSUE, TISSUE, None, False)
        assert c.label == name
