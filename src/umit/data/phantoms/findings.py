"""Findings of the CT torso phantom and the free-text report of each study.

With ``findings=True`` a CT phantom draws, from its own random stream (so the anatomy and the
acquisition of the same seed are untouched), which of four findings the subject has:

- ``liver_lesion``: a hypodense (-50..-80 HU vs liver) ellipsoid inside the liver, label 10;
- ``pleural_effusion``: fluid (0..20 HU) layering in the dependent (posterior) part of one or
  both lungs, label 11;
- ``splenomegaly``: the spleen drawn 1.4-1.7x larger (label 5, as the spleen);
- ``kidney_cyst``: a water-density (0..15 HU) sphere on one kidney, label 12.

Each is present in the image and in the label map. :func:`write_report` writes a radiology
report for the study from templates: section headers, negations ("No pleural effusion."),
normal statements ("The spleen is normal in size."), hedged positives ("possible small cyst"),
history and family-history distractors, pseudo-negations, typos, and a header with planted
identifiers (name, MRN, date of birth, accession) that must never reach the catalog.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FINDINGS: tuple[str, ...] = ("liver_lesion", "pleural_effusion", "splenomegaly", "kidney_cyst")
FINDING_PREVALENCE: dict[str, float] = {
    "liver_lesion": 0.35,
    "pleural_effusion": 0.35,
    "splenomegaly": 0.3,
    "kidney_cyst": 0.35,
}
FINDING_LABELS: dict[int, str] = {10: "liver_lesion", 11: "pleural_effusion", 12: "kidney_cyst"}
"""Label values the findings add to ``CT_LABELS`` (splenomegaly is a larger spleen, label 5)."""

_FINDINGS_STREAM = 7  # SeedSequence([seed, 1, 7]): apart from the three phantom streams


@dataclass
class CTFindings:
    """What one subject has, and how it is drawn (anatomy units)."""

    liver_lesion: bool = False
    pleural_effusion: bool = False
    splenomegaly: bool = False
    kidney_cyst: bool = False
    lesion_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    lesion_radius: float = 0.0
    lesion_contrast: float = 0.0
    effusion_sides: tuple[str, ...] = ()
    effusion_depth: float = 0.0
    effusion_hu: float = 0.0
    spleen_scale: float = 1.0
    cyst_side: str = "left"
    cyst_radius: float = 0.0
    cyst_hu: float = 0.0

    def present(self) -> dict[str, bool]:
        return {f: bool(getattr(self, f)) for f in FINDINGS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_findings(seed: int) -> CTFindings:
    """The findings of phantom ``seed`` (a fixed number of draws, whatever is present)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, _FINDINGS_STREAM]))
    has = {f: bool(rng.uniform() < FINDING_PREVALENCE[f]) for f in FINDINGS}
    side = rng.integers(3)  # 0 right, 1 left, 2 both
    return CTFindings(
        **has,
        lesion_offset=tuple(float(v) for v in rng.uniform(-0.35, 0.35, size=3)),
        lesion_radius=float(rng.uniform(0.09, 0.13)),
        lesion_contrast=float(rng.uniform(-80.0, -50.0)),
        effusion_sides=(("right",), ("left",), ("right", "left"))[int(side)],
        effusion_depth=float(rng.uniform(0.25, 0.45)),
        effusion_hu=float(rng.uniform(0.0, 20.0)),
        spleen_scale=float(rng.uniform(1.4, 1.7)),
        cyst_side=("left", "right")[int(rng.integers(2))],
        cyst_radius=float(rng.uniform(0.05, 0.075)),
        cyst_hu=float(rng.uniform(0.0, 15.0)),
    )


def enlarge_spleen(p: dict[str, Any], f: CTFindings) -> None:
    """Splenomegaly: scale the drawn spleen before painting."""
    if f.splenomegaly:
        center, axes, angle = p["spleen"]
        p["spleen"] = (center, tuple(a * f.spleen_scale for a in axes), angle)


def paint_findings(g: Any, p: dict[str, Any], f: CTFindings, hu: np.ndarray, label: np.ndarray):
    """Paint lesion, effusion and cyst into the canonical HU and label maps (in place)."""
    if f.liver_lesion:
        (cx, cy, cz), axes, _ = p["liver"]
        c = tuple(c0 + o * a for c0, o, a in zip((cx, cy, cz), f.lesion_offset, axes, strict=True))
        r = f.lesion_radius
        sl, q = g.ellipsoid(c, (r, r, 1.3 * r))
        m = (q < 1.0) & (label[sl] == 4)
        if not m.any():  # the drawn spot fell outside the liver: use the liver's centre
            sl, q = g.ellipsoid((cx, cy, cz), (r, r, 1.3 * r))
            m = (q < 1.0) & (label[sl] == 4)
        hu[sl][m] += np.float32(f.lesion_contrast)
        label[sl][m] = 10
    if f.pleural_effusion:
        for side in f.effusion_sides:
            key, lab = ("lung_right", 3) if side == "right" else ("lung_left", 2)
            (cx, cy, cz), axes, angle = p[key]
            sl, q = g.ellipsoid((cx, cy, cz), axes, angle)
            _, y, _ = g.coords(sl)
            posterior = y < cy - axes[1] * (1.0 - 2.0 * f.effusion_depth)
            m = (q < 1.0) & posterior & (label[sl] == lab)
            hu[sl][m] = np.float32(f.effusion_hu)
            label[sl][m] = 11
    if f.kidney_cyst:
        key = "kidney_left" if f.cyst_side == "left" else "kidney_right"
        (cx, cy, cz), axes, _ = p[key]
        out = math.copysign(1.0, cx)  # lateral pole of the kidney
        c = (cx + out * 0.8 * axes[0], cy, cz + 0.3 * axes[2])
        r = f.cyst_radius
        sl, q = g.ellipsoid(c, (r, r, r))
        m = (q < 1.0) & (label[sl] > 0)
        hu[sl][m] = np.float32(f.cyst_hu)
        label[sl][m] = 12


# -- reports -------------------------------------------------------------------------------------
_NAMES = ("John Smith", "Maria Garcia", "Wei Chen", "Fatima Khan", "Olga Petrova", "Ahmed Ali")
_POSITIVE = {
    "liver_lesion": [
        "There is a {size} hypodense lesion in the {lobe} hepatic lobe.",
        "A {size} focal liver lesion is seen in the {lobe} lobe.",
        "{Size} hypoattenuating lesion in the liver, likely a metastasis or cyst.",
        "Liver: {size} hepatic lesion in the {lobe} lobe.",
    ],
    "pleural_effusion": [
        "{Side} pleural effusion with adjacent atelectasis.",
        "There is a {size} {side} pleural effusion.",
        "Small {side} pleural fluid layering dependently.",
    ],
    "splenomegaly": [
        "Splenomegaly.",
        "The spleen is enlarged, measuring {cm} cm.",
        "Enlarged spleen without focal lesion.",
    ],
    "kidney_cyst": [
        "Simple cyst in the {side} kidney.",
        "{Size} {side} renal cortical cyst.",
        "There is a {size} cyst arising from the {side} kidney.",
    ],
}
_HEDGED = {
    "liver_lesion": [
        "A {size} hypodense focus in the {lobe} lobe may represent a liver lesion.",
        "Possible small liver lesion in the {lobe} lobe, too small to characterize.",
    ],
    "pleural_effusion": [
        "Possible trace {side} pleural effusion.",
        "A small {side} pleural effusion cannot be excluded.",
    ],
    "splenomegaly": ["Borderline splenomegaly.", "Questionable mild splenomegaly."],
    "kidney_cyst": [
        "Possible small cyst in the {side} kidney.",
        "Tiny hypodensity of the {side} kidney, possibly a renal cyst.",
    ],
}
_NEGATIVE = {
    "liver_lesion": [
        "No focal liver lesion.",
        "The liver is unremarkable.",
        "No suspicious hepatic lesion is identified.",
        "Liver: no focal lesion.",
    ],
    "pleural_effusion": [
        "No pleural effusion.",
        "There is no pleural effusion or pneumothorax.",
        "No pleural effusions.",
        "The pleural spaces are clear.",
    ],
    "splenomegaly": [
        "The spleen is normal in size.",
        "No splenomegaly.",
        "Spleen is not enlarged.",
    ],
    "kidney_cyst": [
        "No renal cyst or hydronephrosis.",
        "The kidneys are unremarkable.",
        "No kidney cyst is seen.",
    ],
}
_DISTRACTORS = {
    "liver_lesion": [
        "History of liver lesion, resected in the past.",
        "Family history of liver metastases.",
    ],
    "pleural_effusion": [
        "History of pleural effusion, previously drained.",
        "Prior pleural effusion has resolved.",
    ],
    "splenomegaly": ["Mother had splenomegaly.", "History of splenomegaly."],
    "kidney_cyst": ["Family history of renal cysts.", "Father has kidney cysts."],
}
_PSEUDO = {
    "pleural_effusion": "No increase in the {side} pleural effusion compared with the prior study.",
    "liver_lesion": "No change in the size of the liver lesion.",
}
_FILLER = [
    "The lungs are clear apart from dependent changes.",
    "The aorta is normal in caliber.",
    "No free air.",
    "The adrenal glands are unremarkable.",
    "Degenerative changes of the spine.",
    "The pancreas is unremarkable.",
]


def _typo(word: str, rng: np.random.Generator) -> str:
    """One edit of ``word``: drop, double or swap a letter."""
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:i] + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _add_typos(sentence: str, rng: np.random.Generator, p: float) -> str:
    words = sentence.split(" ")
    for i, w in enumerate(words):
        if w.isalpha() and len(w) >= 6 and rng.uniform() < p:
            words[i] = _typo(w, rng)
    return " ".join(words)


def report_identifiers(seed: int) -> dict[str, str]:
    """The planted identifiers of phantom ``seed``'s report (name, MRN, birth date, accession)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, _FINDINGS_STREAM, 1]))
    return {
        "name": _NAMES[int(rng.integers(len(_NAMES)))],
        "mrn": f"{int(rng.integers(10**6, 10**7))}",
        "birth_date": f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/"
        f"{int(rng.integers(1935, 2000))}",
        "accession": f"ACC{int(rng.integers(10**7, 10**8))}",
    }


def write_report(seed: int, f: CTFindings, typo_rate: float = 0.04) -> str:
    """The free-text CT report of phantom ``seed`` with findings ``f`` (deterministic)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, _FINDINGS_STREAM, 2]))
    ids = report_identifiers(seed)

    def pick(options: list[str], **extra: str) -> str:
        size = str(rng.choice(["small", "1.2 cm", "moderate", "8 mm", "subcentimeter"]))
        side = extra.get("side", str(rng.choice(["left", "right"])))
        text = options[int(rng.integers(len(options)))].format(
            size=size,
            Size=size[0].upper() + size[1:],
            lobe=str(rng.choice(["right", "left"])),
            side=side,
            Side=side[0].upper() + side[1:],
            cm=f"{rng.uniform(13.5, 17.5):.1f}",
        )
        return text

    findings, impression = [], []
    for name in FINDINGS:
        present = getattr(f, name)
        side = None
        if name == "pleural_effusion" and f.effusion_sides:
            side = "bilateral" if len(f.effusion_sides) == 2 else f.effusion_sides[0]
        elif name == "kidney_cyst":
            side = f.cyst_side
        kw = {"side": side} if side else {}
        if present:
            hedged = rng.uniform() < 0.2
            sentence = pick(_HEDGED[name] if hedged else _POSITIVE[name], **kw)
            findings.append(sentence)
            if rng.uniform() < 0.5:
                impression.append(sentence)
            if name in _PSEUDO and rng.uniform() < 0.15:
                findings.append(pick([_PSEUDO[name]], **kw))
        else:
            if rng.uniform() < 0.75:
                findings.append(pick(_NEGATIVE[name]))
            if rng.uniform() < 0.15:
                findings.append(pick(_DISTRACTORS[name]))
    for _ in range(int(rng.integers(1, 4))):
        findings.insert(int(rng.integers(len(findings) + 1)), pick(_FILLER))
    findings = [_add_typos(s, rng, typo_rate) for s in findings]
    if not impression:
        impression = ["No acute abnormality."]
    lines = [
        f"Patient: {ids['name']}    MRN: {ids['mrn']}    DOB: {ids['birth_date']}",
        f"Accession: {ids['accession']}",
        "",
        "EXAM: CT chest abdomen pelvis with contrast.",
        "CLINICAL HISTORY: Abdominal pain.",
        "COMPARISON: None.",
        "",
        "FINDINGS:",
        " ".join(findings),
        "",
        "IMPRESSION:",
        "\n".join(f"{i + 1}. {s}" for i, s in enumerate(impression)),
        "",
        f"Dictated by Dr. {_NAMES[int(rng.integers(len(_NAMES)))]}.",
    ]
    return "\n".join(lines)
