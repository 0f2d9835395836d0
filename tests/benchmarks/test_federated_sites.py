"""The federated site study's pieces: the derived site stores, the atlas floor, the table.

The training arms are ``umit finetune`` / ``umit federated`` runs tested in tests/federated; here
the study's own code: which cases each site trains and tests on, the floor, and the summary's
numbers against a hand computation.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ lives beside src/, not inside the package
    sys.path.insert(0, str(ROOT))

from benchmarks.federated_sites import (  # noqa: E402
    SHARED,
    SitesStudyConfig,
    atlas_rows,
    derive_stores,
    finetune_section,
    markdown,
    markdown_shared,
    site_test_cases,
    summarize,
    summarize_shared,
)

from umit.data.store import Store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def study(store: Path, out: Path, **values) -> dict:
    sites = Counter(v["site"] for v in Store(store).index.values())
    site = sites.most_common(1)[0][0]  # the site with most cases (>= 2 of 10)
    cfg = {"data": store, "out": out, "n_train": {site: 1}, "n_test": 1, "finetune": {}}
    return SitesStudyConfig.model_validate(cfg | values).model_dump(mode="json")


def test_site_stores_split_each_site_and_share_the_voxels(tiny_ct_store, tmp_path):
    cfg = study(tiny_ct_store, tmp_path)
    (site,) = cfg["n_train"]
    folders = derive_stores(cfg, tmp_path)
    assert sorted(folders) == sorted(["pooled", site])
    pooled, own = Store(folders["pooled"]), Store(folders[site])
    assert (folders["pooled"] / "store.zarr").resolve() == (tiny_ct_store / "store.zarr").resolve()
    assert pooled.plan.processing_hash() == Store(tiny_ct_store).plan.processing_hash()
    splits = Counter((v["site"], v["split"]) for v in pooled.index.values())
    assert splits[(site, "train")] == 1 and splits[(site, "test")] == 1
    assert set(pooled.index) == set(Store(tiny_ct_store).index)  # the others: split "unused"
    assert sum(n for (s, sp), n in splits.items() if sp == "unused") == len(pooled.index) - 2
    assert {v["site"] for v in own.index.values()} == {site}
    assert {c: v["split"] for c, v in own.index.items()} == {
        c: v["split"] for c, v in pooled.index.items() if v["site"] == site
    }
    assert site_test_cases(folders["pooled"]) == {
        site: [c for c, v in own.index.items() if v["split"] == "test"]
    }
    assert own.case(next(iter(own.index))).read().size > 0  # the voxels read through the link
    assert derive_stores(cfg, tmp_path) == folders  # a rerun finds the same split

    with pytest.raises(
        ValueError,
        match=rf"{tiny_ct_store.resolve()}: site {site} has \d+ labeled cases, 99 needed",
    ):
        derive_stores(study(tiny_ct_store, tmp_path / "x", n_test=98), tmp_path / "x")
    with pytest.raises(ValueError, match=r"n_bogus\n  Extra inputs are not permitted"):
        study(tiny_ct_store, tmp_path, n_bogus=1)


def test_atlas_of_one_training_case_scores_that_case_perfectly(tiny_ct_store, tmp_path):
    cfg = study(tiny_ct_store, tmp_path)
    folders = derive_stores(cfg, tmp_path)
    index = Store(folders["pooled"]).index
    (train,) = [c for c, v in index.items() if v["split"] == "train"]
    (test,) = [c for c, v in index.items() if v["split"] == "test"]
    rows = {r["case_id"]: r for r in atlas_rows(folders["pooled"], {"x": [train, test]})}
    assert rows[train]["dice_mean"] == 1.0  # the majority label of one map is that map
    assert 0.0 < rows[test]["dice_mean"] < 1.0  # another phantom: overlap, not identity


def test_summary_means_and_paired_difference_by_hand(tmp_path):
    """Two sites x two seeds; fedavg = local + 0.1 on every case, so the difference and both
    ends of its CI are 0.1; means and sds over seeds are checked by hand."""
    cfg = {"n_train": {"a": 4, "b": 1}, "n_boot": 200}
    pooled = tmp_path / "prep" / "pooled"
    pooled.mkdir(parents=True)
    cases = {f"{s}{i}": {"site": s, "split": "test"} for s in "ab" for i in range(3)}
    (pooled / "index.json").write_text(json.dumps({"cases": cases}))
    dice = {f"{s}{i}": 0.5 + 0.1 * i + (0.2 if s == "b" else 0.0) for s in "ab" for i in range(3)}
    (tmp_path / "per_case").mkdir()

    def write(name, arm, seed, site, shift):
        rows = [
            {"case_id": c, "site": v["site"], "dice_mean": dice[c] + shift + 0.01 * seed}
            for c, v in cases.items()
            if site is None or v["site"] == site
        ]
        rec = {"arm": arm, "seed": seed, "site": site, "train_s": 1.0, "rows": rows}
        (tmp_path / "per_case" / f"{name}.json").write_text(json.dumps(rec))

    for seed in (0, 1):
        for site in "ab":
            write(f"local_{site}_s{seed}", "local", seed, site, 0.0)
        write(f"fedavg_s{seed}", "fedavg", seed, None, 0.1)
    atlas = [{"case_id": c, "dice_mean": 0.3} for c in cases]
    (tmp_path / "per_case" / "atlas.json").write_text(json.dumps({"arm": "atlas", "rows": atlas}))
    result = summarize(cfg, tmp_path, {"pooled": pooled})
    a = result["sites"]["a"]
    assert a["n_test"] == 3 and a["atlas"] == pytest.approx(0.3)
    assert a["local"]["mean"] == pytest.approx(0.6 + 0.005)  # cases 0.5, 0.6, 0.7; seeds +0, +0.01
    assert a["local"]["sd"] == pytest.approx(0.01 / 2**0.5)
    assert result["sites"]["b"]["fedavg"]["mean"] == pytest.approx(0.9 + 0.005)
    d = result["sites"]["all"]["fedavg"]["minus_local"]
    assert d["diff"] == pytest.approx(0.1)
    assert d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)
    assert d["n_cases"] == 6 and d["n_seeds"] == 2
    table = markdown(cfg, result)
    assert "| a (4 / 3) | 0.300 | 0.605 ± 0.007 (2) | 0.705 ± 0.007 (2) | - | - |" in table
    assert "| all | fedavg - local | +0.100 [+0.100, +0.100] | True | 2 |" in table


def test_arms_train_only_the_study_cases():
    """The derived index marks the cases no site uses ``unused``; every arm excludes them (a
    first run of the study trained on them: umit finetune excludes only ``test`` by default)."""
    section = finetune_section({"finetune": {"exclude_splits": ["holdout"], "train": {}}}, 3)
    assert section["exclude_splits"] == ["holdout", "test", "unused"]
    assert section["train"] == {"seed": 3, "progress": False}


def class_store(folder: Path) -> Path:
    """An index-only store: 30 negative and 10 positive train cases, 3 val, 5 test (no voxels:
    deriving the sites reads the index alone)."""
    cases = {
        f"tr{i:02d}": {"split": "train", "target": int(i < 10), "site": None} for i in range(40)
    }
    cases |= {f"va{i}": {"split": "val", "target": 0, "site": None} for i in range(3)}
    cases |= {f"te{i}": {"split": "test", "target": int(i < 2), "site": None} for i in range(5)}
    folder.mkdir(parents=True)
    (folder / "index.json").write_text(json.dumps({"cases": cases}))
    return folder


def class_study(store: Path, out: Path, **values) -> dict:
    cfg = {
        "data": store,
        "out": out,
        "task": "classification",
        "n_train": {"a": 10, "b": 4},
        "positive_fraction": {"a": 0.2, "b": 0.5},
        "finetune": {"label_key": "target"},
    }
    return SitesStudyConfig.model_validate(cfg | values).model_dump(mode="json")


def test_sites_by_class_ratio_draw_disjoint_train_cases_and_share_the_test_split(tmp_path):
    store = class_store(tmp_path / "src")
    folders = derive_stores(class_study(store, tmp_path / "s"), tmp_path / "s")
    pooled = json.loads((folders["pooled"] / "index.json").read_text())["cases"]
    counts = Counter((v["site"], v["split"], v["target"]) for v in pooled.values())
    assert counts[("a", "train", 1)] == 2 and counts[("a", "train", 0)] == 8
    assert counts[("b", "train", 1)] == 2 and counts[("b", "train", 0)] == 2
    assert counts[(None, "test", 1)] == 2 and counts[(None, "test", 0)] == 3  # no site: shared
    assert {v["split"] for c, v in pooled.items() if c.startswith("va")} == {"unused"}
    assert sum(n for (_, sp, _), n in counts.items() if sp == "unused") == 48 - 14 - 5
    own = json.loads((folders["b"] / "index.json").read_text())["cases"]
    assert {c for c, v in pooled.items() if v["site"] == "b"} == set(own)
    assert site_test_cases(folders["pooled"]) == {SHARED: [f"te{i}" for i in range(5)]}
    assert derive_stores(class_study(store, tmp_path / "s"), tmp_path / "s") == folders

    greedy = class_study(store, tmp_path / "x", positive_fraction={"a": 0.9, "b": 0.5})
    with pytest.raises(
        ValueError, match=r"site b needs 2 training cases with target = 1, 1 are left"
    ):
        derive_stores(greedy, tmp_path / "x")
    odd = class_study(store, tmp_path / "y", positive_fraction={"a": 0.2})
    with pytest.raises(ValueError, match=r"positive_fraction sites \['a'\] differ from n_train's"):
        derive_stores(odd, tmp_path / "y")


def test_shared_test_summary_auc_and_paired_difference_by_hand(tmp_path):
    """AUCs by hand on 4 test cases (labels 0 0 1 1): local scores 0.1 0.6 0.4 0.9 rank 3 of
    the 4 (positive, negative) pairs right (AUC 0.75); fedavg scores the labels (AUC 1)."""
    cfg = {"n_train": {"a": 10, "b": 4}, "positive_fraction": {"a": 0.2, "b": 0.5}, "n_boot": 200}
    labels, local = [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]
    (tmp_path / "per_case").mkdir()

    def write(name, arm, seed, site, scores):
        rows = [
            {"case_id": f"te{i}", "site": SHARED, "label": y, "score": s}
            for i, (y, s) in enumerate(zip(labels, scores, strict=True))
        ]
        rec = {"arm": arm, "seed": seed, "site": site, "train_s": 1.0, "rows": rows}
        (tmp_path / "per_case" / f"{name}.json").write_text(json.dumps(rec))

    for seed in (0, 1):
        write(f"local_a_s{seed}", "local", seed, "a", local)
        write(f"local_b_s{seed}", "local", seed, "b", local[::-1])  # AUC 0.25
        write(f"fedavg_s{seed}", "fedavg", seed, None, [float(y) for y in labels])
    floor = [{"case_id": f"te{i}", "label": y, "score": 0.5} for i, y in enumerate(labels)]
    rec = {"arm": "floors", "rows": {"floor_voxel_count": floor}}
    (tmp_path / "per_case" / "floors.json").write_text(json.dumps(rec))
    result = summarize_shared(cfg, tmp_path)
    arms = result["arms"]
    assert list(arms) == ["local_a", "local_b", "fedavg"]
    assert arms["local_a"]["mean"] == pytest.approx(0.75) and arms["local_a"]["sd"] == 0.0
    assert arms["local_b"]["mean"] == pytest.approx(0.25)
    assert arms["fedavg"]["mean"] == pytest.approx(1.0) and arms["local_a"]["minus"] == {}
    d = arms["fedavg"]["minus"]["local_a"]
    assert d["diff"] == pytest.approx(0.25) and d["n_seeds"] == 2 and d["n_cases"] == 4
    assert arms["fedavg"]["minus"]["local_b"]["diff"] == pytest.approx(0.75)
    assert result["floors"] == {"floor_voxel_count": pytest.approx(0.5)}  # all ties
    table = markdown_shared(cfg, result)
    assert "| local_b | 4 cases, 50% positive | 0.250 ± 0.000 (2) |" in table
    assert "| floor_voxel_count (floor) | all sites' training cases | 0.500 |" in table
    assert "| fedavg - local_b | +0.750 [" in table
