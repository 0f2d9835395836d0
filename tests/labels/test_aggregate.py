"""``umit labels aggregate``: majority vote and agreement by hand, STAPLE against a numpy EM
written from Warfield et al. (2004), a rater pool with an adversary, the catalog hand-over and
every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umit.cli.main import main as cli_main
from umit.data.io import read_image, write_image
from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.ingest.catalog import Catalog, SeriesRecord
from umit.labels.aggregate import AggregateConfig, agreement_map, majority_vote, run, staple

AFF = np.diag([1.2, 1.2, 2.0, 1.0])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_majority_and_agreement_by_hand():
    r1 = np.array([[[0, 1, 2, 2]]] * 3)
    r2 = np.array([[[0, 1, 1, 0]]] * 3)
    r3 = np.array([[[1, 0, 2, 1]]] * 3)
    r4 = np.array([[[0, 0, 1, 1]]] * 3)
    mv = majority_vote([r1, r2, r3, r4])
    # votes per column: {0:3,1:1} -> 0; {1:2,0:2} tie -> 0; {2:2,1:2} tie -> 1; {2:1,0:1,1:2} -> 1
    np.testing.assert_array_equal(mv[0, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(agreement_map([r1, r2, r3, r4])[0, 0], [0.75, 0.5, 0.5, 0.5])


def _noisy_raters(seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.zeros((12, 12, 12), int)
    truth[3:9, 2:10, 4:8] = 1
    raters = []
    for fn, fp in [(0.1, 0.02), (0.3, 0.05), (0.05, 0.2), (0.2, 0.1)]:
        r = truth.copy()
        u = rng.random(truth.shape)
        r[(truth == 1) & (u < fn)] = 0
        r[(truth == 0) & (u < fp)] = 1
        raters.append(r)
    return truth, raters


def _staple_em(raters, iters=200):
    """Binary STAPLE, Warfield 2004 eqs. (from the paper, not from ITK): global prior, p = q =
    0.99 at the start."""
    D = np.stack([r.ravel() for r in raters]).T.astype(float)  # (voxels, raters)
    f = D.mean()
    p = np.full(D.shape[1], 0.99)
    q = np.full(D.shape[1], 0.99)
    for _ in range(iters):
        a = f * np.prod(np.where(D == 1, p, 1 - p), 1)
        b = (1 - f) * np.prod(np.where(D == 0, q, 1 - q), 1)
        W = a / (a + b)
        p = (W[:, None] * D).sum(0) / W.sum()
        q = ((1 - W)[:, None] * (1 - D)).sum(0) / (1 - W).sum()
    return W.reshape(raters[0].shape), p, q


def test_staple_matches_the_papers_em():
    truth, raters = _noisy_raters()
    s = staple(raters)
    W, p, q = _staple_em(raters)
    np.testing.assert_allclose(s["sensitivity"][1], p, atol=1e-5)
    np.testing.assert_allclose(s["specificity"][1], q, atol=1e-5)
    np.testing.assert_allclose(s["prob"][1], W, atol=1e-5)
    np.testing.assert_array_equal(s["consensus"], (W >= 0.5).astype(np.uint8))
    assert dice(s["consensus"] == 1, truth == 1) > max(dice(r == 1, truth == 1) for r in raters)


def test_staple_finds_the_adversary_in_a_multilabel_pool():
    truth = np.zeros((16, 16, 10), int)
    truth[2:8, 2:14, 2:8] = 1
    truth[9:14, 4:12, 3:7] = 2
    rng = np.random.default_rng(1)
    raters = []
    for _ in range(4):  # honest but noisy: 10% of voxels get a random label
        r = truth.copy()
        flip = rng.random(truth.shape) < 0.1
        r[flip] = rng.integers(0, 3, flip.sum())
        raters.append(r)
    adversary = np.where(truth == 1, 2, np.where(truth == 2, 1, 0))  # swaps the structures
    raters.append(adversary)
    s = staple(raters)
    for lab in (1, 2):
        best_rater = max(dice(r == lab, truth == lab) for r in raters)
        assert dice(s["consensus"] == lab, truth == lab) > max(0.95, best_rater + 0.03)
        assert s["sensitivity"][lab][4] < 0.05 < 0.8 < min(s["sensitivity"][lab][:4])
    assert dice(majority_vote(raters) == 1, truth == 1) > 0.95


def _raw_with_case(tmp_path, case="case_a"):
    raw = tmp_path / "raw"
    (raw / "labels").mkdir(parents=True)
    rec = SeriesRecord(
        series_id="s1", source_key="k1", case_id=case, image_path="images/x.nii.gz",
        source="x", source_format="nifti", shape=(8, 8, 6), spacing=(1.2, 1.2, 2.0),
        orientation="RAS", label_path=f"labels/{case}.nii.gz",
    )  # fmt: skip
    with Catalog(raw / "catalog.db") as cat:
        cat.add_series([rec])
    return raw


def _write_raters(folder, truth, n=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        r = truth.copy()
        flip = rng.random(truth.shape) < 0.05
        r[flip] = 1 - r[flip]
        paths.append(write_image(folder / f"rater{k}.nii.gz", r.astype(np.uint8), ImageMeta(AFF)))
    return paths


def test_cli_folder_of_cases_into_the_catalog(tmp_path):
    truth = np.zeros((8, 8, 6), int)
    truth[2:6, 2:6, 1:5] = 1
    _write_raters(tmp_path / "raters" / "case_a", truth, n=5)
    raw = _raw_with_case(tmp_path)
    out = tmp_path / "cons"
    rc = cli_main(["labels", "aggregate", str(tmp_path / "raters"), "activate=true",
                   "--out", str(out), "--raw", str(raw)])  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "raters.json").read_text())
    assert rows[0]["case_id"] == "case_a" and len(rows[0]["raters"]) == 5
    cons, meta = read_image(out / "case_a_staple.nii.gz")
    np.testing.assert_allclose(meta.affine, AFF)
    assert dice(cons == 1, truth == 1) > 0.95
    agree, _ = read_image(out / "case_a_agreement.nii.gz")
    assert agree.min() >= 0.6 - 1e-6 and agree.max() == 1.0  # 5 raters: majority >= 3/5
    with Catalog.open_raw(raw) as cat:
        src = {r["source"]: r for r in cat.label_sources("case_a")}
        (series,) = cat.series()
    assert set(src) == {"original", "consensus_staple"}
    assert src["original"]["label_path"] == "labels/case_a.nii.gz"
    assert series.label_path == src["consensus_staple"]["label_path"]
    copied, _ = read_image(raw / series.label_path)
    np.testing.assert_array_equal(copied, cons)


def test_bad_inputs_are_named(tmp_path):
    truth = np.zeros((8, 8, 6), int)
    truth[2:6, 2:6, 1:5] = 1
    paths = _write_raters(tmp_path / "r", truth, n=2)
    other = write_image(tmp_path / "other.nii.gz", np.zeros((8, 8, 5), np.uint8), ImageMeta(AFF))
    s = run(AggregateConfig(inputs=[*paths, other], out=tmp_path / "o"))
    (why,) = s["failures"].values()
    assert "other.nii.gz" in why and "grid differs" in why
    frac = write_image(
        tmp_path / "frac.nii.gz", np.full((8, 8, 6), 0.5, np.float32), ImageMeta(AFF)
    )
    s = run(AggregateConfig(inputs=[paths[0], frac], out=tmp_path / "o"))
    assert "frac.nii.gz" in next(iter(s["failures"].values()))
    s = run(AggregateConfig(inputs=[paths[0]], out=tmp_path / "o"))
    assert "at least 2 rater" in next(iter(s["failures"].values()))
    with pytest.raises(InputError, match="nope.nii.gz.*no such file"):
        run(AggregateConfig(inputs=[paths[0], tmp_path / "nope.nii.gz"], out=tmp_path / "o"))
    with pytest.raises(InputError, match="no catalog here"):
        run(AggregateConfig(inputs=paths, out=tmp_path / "o", raw=tmp_path / "r"))
    raw = _raw_with_case(tmp_path, case="case_b")
    with pytest.raises(InputError, match="'rater0' is not in the catalog"):
        run(AggregateConfig(inputs=paths, out=tmp_path / "o", raw=raw))
    with pytest.raises(ValueError, match="at least 2 raters"):
        majority_vote([truth])
