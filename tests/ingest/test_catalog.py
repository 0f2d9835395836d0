"""The SQLite catalog: one transaction per series, resumable keys, failures, summary."""

from __future__ import annotations

import pytest

from umit.errors import InputError
from umit.ingest.catalog import SCHEMA_VERSION, Catalog, SeriesRecord


def _rec(case: str, ch: int = 0, **kw) -> SeriesRecord:
    base = dict(
        series_id=f"{case}_{ch:04d}",
        source_key=f"key-{case}",
        case_id=case,
        channel=ch,
        image_path=f"images/{case}_{ch:04d}.nii.gz",
        source=f"src/{case}",
        source_format="nifti",
        shape=(4, 5, 6),
        spacing=(1.0, 1.0, 2.5),
        orientation="RAS",
    )
    base.update(kw)
    return SeriesRecord(**base)


def test_add_and_read_back(tmp_path):
    with Catalog(tmp_path / "catalog.db") as cat:
        cat.add_series(
            [
                _rec("a", 0, sex="F", site="s1", target=1, extra={"kvp": 120}),
                _rec("a", 1, sex="F", site="s1"),
            ]
        )
        cat.add_series([_rec("b", label_path="labels/b.nii.gz", sex="M", site="s1")])
        rows = cat.series()
        assert [r.series_id for r in rows] == ["a_0000", "a_0001", "b_0000"]
        assert rows[0].shape == (4, 5, 6) and rows[0].spacing == (1.0, 1.0, 2.5)
        assert rows[0].target == 1 and rows[0].extra == {"kvp": 120}
        assert set(cat.cases()) == {"a", "b"}
        s = cat.summary()
        assert s["cases"] == 2 and s["series"] == 3 and s["labeled_cases"] == 1
        assert s["by_sex"] == {"F": 1, "M": 1} and s["by_site"] == {"s1": 2}


def test_failure_then_success_clears_failure(tmp_path):
    with Catalog(tmp_path / "catalog.db") as cat:
        cat.add_failure("key-a", "src/a", "src/a: truncated")
        assert cat.done_keys() == {"key-a"}
        assert cat.failures()[0]["reason"] == "src/a: truncated"
        cat.add_series([_rec("a")])
        assert cat.failures() == [] and cat.done_keys() == {"key-a"}


def test_rewrite_is_idempotent(tmp_path):
    with Catalog(tmp_path / "catalog.db") as cat:
        cat.add_series([_rec("a")])
        cat.add_series([_rec("a")])  # a resumed run re-committing the same case
        assert len(cat.series()) == 1


def test_case_id_clash_between_sources_is_refused_atomically(tmp_path):
    with Catalog(tmp_path / "catalog.db") as cat:
        cat.add_series([_rec("a")])
        with pytest.raises(InputError, match="already ingested from another source"):
            # a second source claiming case "a": nothing of it is committed, "a" is untouched
            cat.add_series([_rec("b"), _rec("a", source_key="key-other", source="elsewhere")])
        assert [r.case_id for r in cat.series()] == ["a"]
        assert cat.series()[0].source == "src/a"


def test_open_raw_requires_catalog(tmp_path):
    with pytest.raises(InputError, match="catalog.db"):
        Catalog.open_raw(tmp_path)


def test_transform_column_and_migration_of_a_schema_1_catalog(tmp_path):
    import sqlite3

    path = tmp_path / "catalog.db"
    with Catalog(path) as cat:
        cat.add_series([_rec("a")])
    con = sqlite3.connect(path)  # what an older UMIT wrote: no transform column, schema 1
    con.execute("ALTER TABLE series DROP COLUMN transform")
    con.execute("UPDATE info SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with Catalog(path) as cat:
        assert cat.info()["schema_version"] == SCHEMA_VERSION == 6
        assert cat.series()[0].transform is None
        text = "resampled nonuniform slices 4.2/7.4 mm -> 4.2 mm (26 -> 35 slices)"
        cat.add_series([_rec("b", transform=text)])
        assert [r.transform for r in cat.series()] == [None, text]
    with Catalog(path) as cat:  # reopening a current catalog changes nothing
        assert [r.transform for r in cat.series()] == [None, text]
