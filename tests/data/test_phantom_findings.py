"""CT phantom findings: in the image and in the labels, off by default with the old arrays bit
for bit, and a report per study that describes them."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from umit.data.phantoms import make_ct_phantom, write_phantom_collection
from umit.data.phantoms.findings import FINDINGS, draw_findings, report_identifiers, write_report

# sha256 of image + label + affine of make_ct_phantom(seed, (32, 32, 24)), computed with the
# generator before findings existed (commit 612c255): findings off must not change a bit.
BEFORE = {
    0: "a74428778e6a5569d85bf75bb3970f72ce9289a4966899468a673c232b54feef",
    5: "a3c7b2cd11645c39faea57de93fff5bf46daa45435fb0ade6505c68a513bb248",
}


def _digest(ph) -> str:
    return hashlib.sha256(
        ph.images["CT"].tobytes() + ph.label.tobytes() + ph.meta.affine.tobytes()
    ).hexdigest()


@pytest.mark.parametrize("seed", sorted(BEFORE))
def test_findings_off_gives_the_phantoms_of_before_bit_for_bit(seed):
    assert _digest(make_ct_phantom(seed, (32, 32, 24))) == BEFORE[seed]
    assert _digest(make_ct_phantom(seed, (32, 32, 24), findings=False)) == BEFORE[seed]


def test_findings_are_in_the_image_and_the_labels():
    seen = {f: 0 for f in FINDINGS}
    for seed in range(12):
        plain = make_ct_phantom(seed, (48, 48, 32))
        ph = make_ct_phantom(seed, (48, 48, 32), findings=True)
        f = draw_findings(seed)
        assert ph.meta.extra["findings"] == f.present()
        ct, lab = ph.images["CT"].astype(float), ph.label
        for name, value in (("liver_lesion", 10), ("pleural_effusion", 11), ("kidney_cyst", 12)):
            assert (lab == value).any() == getattr(f, name), (seed, name)
            seen[name] += getattr(f, name)
        if f.liver_lesion:  # hypodense against the liver around it
            assert ct[lab == 10].mean() < ct[lab == 4].mean() - 20
        if f.pleural_effusion:  # fluid, not air, where lung was
            assert ct[lab == 11].mean() > -100 and (plain.label[lab == 11] != 0).all()
        spleen_ratio = (lab == 5).sum() / (plain.label == 5).sum()
        assert (spleen_ratio > 1.8) == f.splenomegaly, (seed, spleen_ratio)
        seen["splenomegaly"] += f.splenomegaly
        if not any(f.present().values()):
            assert np.array_equal(ct, plain.images["CT"].astype(float))
    assert all(n >= 2 for n in seen.values()), seen  # every finding occurs in 12 subjects


def test_report_describes_the_findings_with_planted_identifiers():
    f = draw_findings(4)
    text = write_report(4, f)
    assert text == write_report(4, f)  # deterministic
    ids = report_identifiers(4)
    for value in ids.values():
        assert value in text
    assert "FINDINGS:" in text and "IMPRESSION:" in text
    assert ("splen" in text.lower()) or ("spleen" in text.lower())


def test_collection_with_findings_writes_reports_and_truth(tmp_path):
    root = write_phantom_collection(
        tmp_path / "c", n=3, n_test=1, shape=(32, 32, 24), findings=True
    )
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["labels"]["liver_lesion"] == 10 and ds["phantom"]["findings"] is True
    with (root / "findings.csv").open() as f:
        truth = list(csv.DictReader(f))
    with (root / "reports.csv").open() as f:
        reports = list(csv.DictReader(f))
    with (root / "attributes.csv").open() as f:
        attrs = list(csv.DictReader(f))
    assert len(truth) == len(reports) == len(attrs) == 4
    assert [r["patient_id"] for r in reports] == [a["subject_id"] for a in attrs]
    seeds = ds["phantom"]["case_seeds"]
    for t in truth:
        assert {k: int(t[k]) for k in FINDINGS} == draw_findings(seeds[t["case_id"]]).present()
    plain = write_phantom_collection(tmp_path / "p", n=2, shape=(32, 32, 24))
    assert (
        not (plain / "reports.csv").exists()
        and "findings" not in json.loads((plain / "dataset.json").read_text())["phantom"]
    )
    assert (plain / "attributes.csv").read_text().splitlines()[0].endswith(",contrast")
    with pytest.raises(Exception, match="written with"):
        write_phantom_collection(tmp_path / "c", n=3, n_test=1, shape=(32, 32, 24))
    with pytest.raises(ValueError, match="CT phantoms only"):
        write_phantom_collection(tmp_path / "m", n=1, modality="mr", findings=True)
