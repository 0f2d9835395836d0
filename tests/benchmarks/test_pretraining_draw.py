"""benchmarks/pretraining_draw.py: the seed x run variance decomposition against its known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.pretraining_draw import crossed_tables, two_way_components  # noqa: E402


def test_an_additive_table_has_no_residual_and_its_exact_effects():
    seed = np.array([0.0, 0.1, -0.1, 0.2])
    run = np.array([0.03, -0.03, 0.0])
    c = two_way_components(0.7 + seed[:, None] + run[None, :])
    assert c["mean"] == pytest.approx(0.7 + seed.mean() + run.mean())
    assert c["var_res"] == pytest.approx(0.0, abs=1e-15)
    assert c["var_seed"] == pytest.approx(seed.var(ddof=1))
    assert c["var_run"] == pytest.approx(run.var(ddof=1))


def test_mean_squares_have_their_textbook_expectations():
    # E[MS_res] = s2_res, E[MS_seed] = s2_res + R s2_seed, E[MS_run] = s2_res + S s2_run
    rng = np.random.default_rng(0)
    n_seed, n_run, s_seed, s_run, s_res = 5, 4, 0.05, 0.03, 0.02
    ms = {"ms_seed": [], "ms_run": [], "ms_res": []}
    for _ in range(4000):
        t = (rng.normal(0, s_seed, (n_seed, 1)) + rng.normal(0, s_run, (1, n_run))
             + rng.normal(0, s_res, (n_seed, n_run)))  # fmt: skip
        c = two_way_components(t)
        for k in ms:
            ms[k].append(c[k])
    assert np.mean(ms["ms_res"]) == pytest.approx(s_res**2, rel=0.04)
    assert np.mean(ms["ms_seed"]) == pytest.approx(s_res**2 + n_run * s_seed**2, rel=0.06)
    assert np.mean(ms["ms_run"]) == pytest.approx(s_res**2 + n_seed * s_run**2, rel=0.06)


def test_a_table_with_a_missing_cell_or_one_run_is_refused():
    with pytest.raises(ValueError, match="missing cells"):
        two_way_components(np.array([[0.7, np.nan], [0.6, 0.65]]))
    with pytest.raises(ValueError, match="at least 2"):
        two_way_components(np.array([[0.7], [0.6]]))


def test_arms_named_run_k_become_one_crossed_table_per_prefix_and_budget():
    scores = {("probe_run0", "n24", 5): 0.7, ("probe_run1", "n24", 5): 0.8,
              ("probe_run0", "n24", 6): 0.6, ("probe_run1", "n24", 6): 0.5,
              ("cnn_scratch", "n24", 5): 0.1}  # fmt: skip
    tables = crossed_tables(scores)
    assert list(tables) == [("probe", "n24")]
    seeds, runs, table = tables[("probe", "n24")]
    assert (seeds, runs) == ([5, 6], [0, 1])
    np.testing.assert_array_equal(table, [[0.7, 0.8], [0.6, 0.5]])


def test_a_malformed_reference_or_a_study_without_run_arms_is_refused(tmp_path, monkeypatch):
    import json

    from benchmarks import pretraining_draw

    results = tmp_path / "results.json"
    cells = [{"arm": f"probe_run{r}", "budget": "n24", "seed": s, "test": {"auc": 0.7 + s / 100}}
             for s in (5, 6) for r in (0, 1)]  # fmt: skip
    results.write_text(json.dumps({"cells": cells}))
    monkeypatch.setattr(sys, "argv", ["x", str(results), "--reference", "scratch_only"])
    with pytest.raises(SystemExit, match="expected RESULTS.json:ARM:FACTOR"):
        pretraining_draw.main()
    results.write_text(json.dumps({"cells": [{**cells[0], "arm": "cnn_scratch"}]}))
    monkeypatch.setattr(sys, "argv", ["x", str(results)])
    with pytest.raises(SystemExit, match="no arms named"):
        pretraining_draw.main()
