"""Coded meaning of segmentation labels: SNOMED CT category, type and laterality for DICOM SEG.

A DICOM Segmentation describes each segment by a Segmented Property Category (CID 7150) and a
Segmented Property Type (CID 7151), optionally refined by a laterality modifier (CID 244), so that
a PACS or viewer knows that segment 4 is the liver without reading its free-text label.
:func:`segment_coding` maps a label name (``liver``, ``kidney_left``, ``vertebrae_L3``) to those
codes; the label name itself stays the segment's label.

The table covers the labels of the umit phantoms (:data:`umit.data.phantoms.CT_LABELS`,
:data:`~umit.data.phantoms.MR_LABELS`) and the common TotalSegmentator organs. Every code was
checked against pydicom's tables of the DICOM standard (``pydicom.sr.codedict.codes.SCT`` and the
context groups CID 7191 tissue, 7192 anatomical structure, 7194 morphologically abnormal
structure types, CID 244 laterality); ``tests/inference/test_seg_codes.py`` repeats the check for
every entry, so a wrong code fails the tests.

Conventions:

* Paired organs are post-coordinated, as DICOM prefers: ``kidney_left`` is type Kidney
  (64033007) with the modifier Left (7771000), not the pre-coordinated "Left kidney". A
  ``_left``/``_right`` suffix or ``left_``/``right_`` prefix is read as laterality.
* Category "Anatomical Structure" is coded SCT 123037004, the code that dcmqi, 3D Slicer and the
  TotalSegmentator mapping use. pydicom's copy of CID 7150 (pydicom 3.0) still lists the older
  91723000 for that meaning; both are SNOMED body-structure concepts and CID 7150 is extensible.
* Fallback: a label not in the table is coded category Tissue (85756007) / type Tissue
  (85756007), the most generic pair of CID 7150/7166, and keeps its name as the segment label;
  :attr:`SegmentCoding.known` is False for it (``umit predict`` logs which labels fell back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.coding import Code


@dataclass(frozen=True)
class Concept:
    """A coded concept: ``(value, scheme, meaning)``, e.g. ``("10200004", "SCT", "Liver")``."""

    value: str
    scheme: str
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


def _sct(value: str, meaning: str) -> Concept:
    return Concept(value, "SCT", meaning)


# Segmented Property Categories (CID 7150)
ANATOMICAL_STRUCTURE = _sct("123037004", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = _sct("49755003", "Morphologically Abnormal Structure")
TISSUE = _sct("85756007", "Tissue")
# Laterality (CID 244)
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")

# Anatomical structures (CID 7192): normalized label name -> type
_ANATOMY: dict[str, Concept] = {
    "adrenal_gland": _sct("23451007", "Adrenal gland"),
    "aorta": _sct("15825003", "Aorta"),
    "body": _sct("38266002", "Entire body"),
    "brain": _sct("12738006", "Brain"),
    "brainstem": _sct("119238007", "Brain Stem"),
    "cerebellum": _sct("113305005", "Cerebellum"),
    "clavicle": _sct("51299004", "Clavicle"),
    "colon": _sct("71854001", "Colon"),
    "csf": _sct("65216001", "Cerebrospinal Fluid"),
    "duodenum": _sct("38848004", "Duodenum"),
    "esophagus": _sct("32849002", "Esophagus"),
    "femur": _sct("71341001", "Femur"),
    "gallbladder": _sct("28231008", "Gallbladder"),
    "grey_matter": _sct("389081007", "Gray Matter"),
    "head": _sct("69536005", "Head"),
    "heart": _sct("80891009", "Heart"),
    "hip": _sct("29836001", "Hip"),
    "humerus": _sct("85050009", "Humerus"),
    "inferior_vena_cava": _sct("64131007", "Inferior vena cava"),
    "kidney": _sct("64033007", "Kidney"),
    "liver": _sct("10200004", "Liver"),
    "lung": _sct("39607008", "Lung"),
    "lung_lower_lobe": _sct("90572001", "Lower lobe of lung"),
    "lung_middle_lobe": _sct("72481006", "Middle lobe of right lung"),
    "lung_upper_lobe": _sct("45653009", "Upper lobe of lung"),
    "pancreas": _sct("15776009", "Pancreas"),
    "prostate": _sct("41216001", "Prostate"),
    "pulmonary_artery": _sct("81040000", "Pulmonary artery"),
    "rib": _sct("113197003", "Rib"),
    "sacrum": _sct("54735007", "Sacrum"),
    "scapula": _sct("79601000", "Scapula"),
    "skull": _sct("89546000", "Skull"),
    "small_bowel": _sct("30315005", "Small intestine"),
    "spinal_cord": _sct("2748008", "Spinal cord"),
    "spine": _sct("421060004", "Spine"),
    "spleen": _sct("78961009", "Spleen"),
    "sternum": _sct("56873002", "Sternum"),
    "stomach": _sct("69695003", "Stomach"),
    "superior_vena_cava": _sct("48345005", "Superior vena cava"),
    "trachea": _sct("44567001", "Trachea"),
    "urinary_bladder": _sct("89837001", "Bladder"),
    "vertebra": _sct("51282000", "Vertebra"),
    "white_matter": _sct("389080008", "White Matter"),
}
_VERTEBRAE = {
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001", "T1": "64864005", "T2": "53733008", "T3": "1626008",
    "T4": "73071006", "T5": "56401006", "T6": "45296009", "T7": "62487009", "T8": "11068009",
    "T9": "82687006", "T10": "7610001", "T11": "12989004", "T12": "23215003", "L1": "66794005",
    "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
}  # fmt: skip
for _level, _value in _VERTEBRAE.items():
    _ANATOMY[f"vertebra_{_level.lower()}"] = _sct(_value, f"{_level} vertebra")

# Morphologically abnormal structures (CID 7194)
_ABNORMAL: dict[str, Concept] = {
    "cyst": _sct("367643001", "Cyst"),
    "edema": _sct("79654002", "Edema"),
    "hemorrhage": _sct("50960005", "Hemorrhage"),
    "lesion": _sct("52988006", "Lesion"),
    "mass": _sct("4147007", "Mass"),
    "necrosis": _sct("6574001", "Necrosis"),
    "nodule": _sct("27925004", "Nodule"),
    "tumor": _sct("108369006", "Neoplasm"),
}

# Tissues (CID 7191)
_TISSUES: dict[str, Concept] = {
    "bone": _sct("3138006", "Bone"),
    "fat": _sct("55603005", "Fat"),
    "muscle": _sct("91727004", "Muscle"),
    "skin": _sct("39937001", "Skin"),
    "soft_tissue": _sct("87784001", "Soft tissue"),
}

# Other spellings -> the table's key (after normalization)
_ALIASES = {
    "adrenal": "adrenal_gland",
    "brain_stem": "brainstem",
    "cerebrospinal_fluid": "csf",
    "clavicula": "clavicle",
    "gray_matter": "grey_matter",
    "haemorrhage": "hemorrhage",
    "ivc": "inferior_vena_cava",
    "bladder": "urinary_bladder",
    "oedema": "edema",
    "oesophagus": "esophagus",
    "ribs": "rib",
    "small_intestine": "small_bowel",
    "spinal_column": "spine",
    "vertebrae": "vertebra",
    "vertebral_column": "spine",
    "tumour": "tumor",
    "neoplasm": "tumor",
    "adipose_tissue": "fat",
}

TABLE: dict[str, tuple[Concept, Concept]] = {
    **{k: (ANATOMICAL_STRUCTURE, v) for k, v in _ANATOMY.items()},
    **{k: (MORPHOLOGICALLY_ABNORMAL, v) for k, v in _ABNORMAL.items()},
    **{k: (TISSUE, v) for k, v in _TISSUES.items()},
}
"""Normalized label name -> (category, type), before laterality."""

FALLBACK = (TISSUE, TISSUE)
"""(category, type) of a label that is not in :data:`TABLE`."""


@dataclass(frozen=True)
class SegmentCoding:
    """The coded description of one label.

    Attributes:
        label: The label name as given (the segment's label).
        category: Segmented Property Category.
        type: Segmented Property Type.
        modifier: Laterality (Left / Right), or None.
        known: False when the label is not in :data:`TABLE` and got :data:`FALLBACK`.
    """

    label: str
    category: Concept
    type: Concept
    modifier: Concept | None
    known: bool


def normalize(name: str) -> str:
    """``"Kidney Left"`` / ``"kidney-left"`` -> ``"kidney_left"``; ``vertebrae_L3`` ->
    ``vertebra_l3``."""
    key = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    key = re.sub(r"^vertebrae_", "vertebra_", key)
    return _ALIASES.get(key, key)


def _split_laterality(key: str) -> tuple[str, Concept | None]:
    for side, concept in (("left", LEFT), ("right", RIGHT)):
        if key.endswith(f"_{side}"):
            return key[: -len(side) - 1], concept
        if key.startswith(f"{side}_"):
            return key[len(side) + 1 :], concept
    return key, None


def segment_coding(name: str) -> SegmentCoding:
    """Category, type and laterality of the label ``name`` (the fallback when unknown)."""
    key = normalize(name)
    if key in TABLE:
        return SegmentCoding(name, *TABLE[key], modifier=None, known=True)
    base, side = _split_laterality(key)
    base = _ALIASES.get(base, base)
    if side is not None and base in TABLE:
        return SegmentCoding(name, *TABLE[base], modifier=side, known=True)
    return SegmentCoding(name, *FALLBACK, modifier=None, known=False)
