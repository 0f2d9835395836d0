"""``umit labels from-reports``: the join by keyed pseudonym, the labels table, what is counted,
that no identifier reaches the catalog, and the errors naming the file."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from umit.cli.main import main as cli_main
from umit.data.phantoms.findings import FINDINGS, draw_findings, report_identifiers, write_report
from umit.errors import InputError
from umit.labels.run import FromReportsConfig, run
from umit.labels.table import LabelsTableConfig, read_labels, table_targets

from _shared import write_ct_series


def _truth(src: Path) -> dict[str, dict[str, int]]:
    with (src / "findings.csv").open() as f:
        return {r["case_id"]: {k: int(r[k]) for k in FINDINGS} for r in csv.DictReader(f)}


def test_cli_labels_phantom_reports_joined_by_patient_pseudonym(raw_copy, capsys):
    src = raw_copy.parent / "src"
    assert (
        cli_main(["labels", "from-reports", str(src / "reports.csv"), "--catalog", str(raw_copy)])
        == 0
    )
    out = capsys.readouterr().out
    assert "12 of 12 report(s) labeled 12 case(s) (key patient_id" in out
    rows = read_labels(raw_copy)
    assert len(rows) == 12 * 11  # every case x every finding of the default vocabulary
    assert {r["source"] for r in rows} == {"reports"}
    assert all(r["labeler"].startswith("umit-context/1 ct_default@v1:") for r in rows)
    # the labels agree with the drawn truth (uncertain counts as present: hedged positives)
    truth = _truth(src)
    agree = [
        (r["value"] in ("present", "uncertain")) == bool(truth[r["case_id"]][r["finding"]])
        for r in rows
        if r["finding"] in FINDINGS
    ]
    assert np.mean(agree) >= 0.9, np.mean(agree)
    # the deciding sentence's span points at a sentence that names the finding
    text = {  # report text per case, regenerated from the phantom seeds
        c: write_report(s, draw_findings(s))
        for c, s in json.loads((src / "dataset.json").read_text())["phantom"]["case_seeds"].items()
    }
    for r in rows:
        if r["value"] == "present" and r["finding"] == "splenomegaly":
            sentence = text[r["case_id"]][r["sentence_start"] : r["sentence_end"]].lower()
            assert "splen" in sentence or "spleen" in sentence


def test_no_identifier_of_the_reports_reaches_the_catalog(raw_copy):
    src = raw_copy.parent / "src"
    run(FromReportsConfig(reports=src / "reports.csv", catalog=raw_copy))
    seeds = json.loads((src / "dataset.json").read_text())["phantom"]["case_seeds"]
    planted = []
    for seed in seeds.values():
        ids = report_identifiers(seed)
        planted += [ids["name"], ids["mrn"], ids["birth_date"], ids["accession"]]
    planted += ["Dictated by", "CLINICAL HISTORY", "pleural effusion"]  # no report text either
    blob = b"".join(p.read_bytes() for p in raw_copy.glob("catalog.db*"))
    assert len(blob) > 10_000
    for value in planted:
        assert value.encode() not in blob, value
    # the join really used the MRN: the catalog's subject id is its keyed hash, not the MRN
    con = sqlite3.connect(raw_copy / "catalog.db")
    subjects = {r[0] for r in con.execute("SELECT subject_id FROM series")}
    con.close()
    assert len(subjects) == 12 and not subjects & {
        report_identifiers(s)["mrn"] for s in seeds.values()
    }


def test_unmatched_empty_and_repeated_reports_are_counted_and_listed(raw_copy, capsys):
    src = raw_copy.parent / "src"
    with (src / "reports.csv").open() as f:
        rows = list(csv.DictReader(f))
    rows.insert(1, {"patient_id": "0000000", "accession": "x", "text": "No pleural effusion."})
    rows.append({"patient_id": rows[0]["patient_id"], "accession": "y", "text": "Ascites."})
    rows.append({"patient_id": rows[2]["patient_id"], "accession": "z", "text": "  "})
    path = raw_copy.parent / "more.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["labels", "from-reports", str(path), "--catalog", str(raw_copy)]) == 1
    out = capsys.readouterr().out
    assert "1 report(s) matched no case: rows 2" in out
    assert "1 report(s) had no text: rows 15" in out
    assert "1 report(s) repeated a case: rows 14" in out
    res = run(FromReportsConfig(reports=path, catalog=raw_copy))
    assert (res.unmatched_rows, res.empty_rows, res.duplicate_rows) == ([2], [15], [14])
    assert res.labeled_cases == 12
    con = sqlite3.connect(raw_copy / "catalog.db")
    info = json.loads(
        con.execute("SELECT value FROM info WHERE key='labels:reports'").fetchone()[0]
    )
    con.close()
    assert info["unmatched_rows"] == [2] and info["reports"] == 15


def test_rerun_replaces_labels_atomically(raw_copy, monkeypatch):
    src = raw_copy.parent / "src"
    run(FromReportsConfig(reports=src / "reports.csv", catalog=raw_copy))
    before = read_labels(raw_copy)
    one = raw_copy.parent / "one.csv"
    with (src / "reports.csv").open() as f:
        first = next(csv.DictReader(f))
    with one.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["patient_id", "text"])
        w.writeheader()
        w.writerow({"patient_id": first["patient_id"], "text": "Splenomegaly."})
    # a failure while inserting leaves the previous labels untouched
    import umit.labels.table as table

    monkeypatch.setattr(table, "LABEL_COLUMNS", (*table.LABEL_COLUMNS, "no_such_column"))
    with pytest.raises(KeyError):
        run(FromReportsConfig(reports=one, catalog=raw_copy, findings=["splenomegaly"]))
    assert read_labels(raw_copy) == before
    monkeypatch.undo()
    run(FromReportsConfig(reports=one, catalog=raw_copy, findings=["splenomegaly"]))
    after = read_labels(raw_copy)
    assert len(after) == 1 and after[0]["value"] == "present" and after[0]["report_row"] == 1
    cfg = LabelsTableConfig(catalog=raw_copy)
    assert table_targets(cfg, "splenomegaly") == {after[0]["case_id"]: 1}


def test_join_by_study_uid_or_accession_of_ingested_dicom(tmp_path):
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest

    rng = np.random.default_rng(0)
    for i, study in enumerate(("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")):
        stored = rng.integers(900, 1200, size=(8, 8, 4)).astype(np.int16)
        extra = {"AccessionNumber": f"ACC-77{i}"}
        write_ct_series(tmp_path / "dicom" / f"s{i}", stored, study_uid=study, rng=rng, extra=extra)
    ingest(IngestConfig(src=tmp_path / "dicom", out=tmp_path / "raw"), progress=False)
    reports = tmp_path / "reports.csv"
    reports.write_text(
        "study_uid,report\n"
        "1.2.826.0.1.3680043.8.498.1,No pleural effusion. Possible liver lesion.\n"
        "1.2.826.0.1.3680043.8.498.2,Small right pleural effusion.\n"
        "1.2.826.0.1.3680043.8.498.3,Splenomegaly.\n"
    )
    res = run(FromReportsConfig(reports=reports, catalog=tmp_path / "raw"))
    assert res.key == "study_uid" and res.labeled_cases == 2 and res.unmatched_rows == [3]
    got = {(r["report_row"], r["finding"]): r["value"] for r in read_labels(tmp_path / "raw")}
    assert got[(1, "pleural_effusion")] == "absent" and got[(1, "liver_lesion")] == "uncertain"
    assert got[(2, "pleural_effusion")] == "present"
    # the same reports keyed by AccessionNumber (ingest keeps only its keyed pseudonym)
    by_acc = tmp_path / "by_accession.jsonl"
    by_acc.write_text(
        '{"accession": "ACC-771", "text": "No splenomegaly."}\n'
        '{"accession": "ACC-999", "text": "Splenomegaly."}\n'
    )
    res = run(
        FromReportsConfig(reports=by_acc, catalog=tmp_path / "raw", findings=["splenomegaly"])
    )
    assert res.key == "accession" and res.labeled_cases == 1 and res.unmatched_rows == [2]
    (row,) = read_labels(tmp_path / "raw")
    assert row["value"] == "absent"
    blob = b"".join(p.read_bytes() for p in (tmp_path / "raw").glob("catalog.db*"))
    assert b"1.2.826.0.1.3680043.8.498.1" not in blob  # only the keyed replacement UID
    assert b"ACC-77" not in blob  # only the accession's keyed pseudonym


def test_errors_name_the_file(raw_copy, tmp_path):
    src = raw_copy.parent / "src"
    bad = tmp_path / "bad.csv"
    bad.write_text("mrn,text\n1,No effusion.\n")
    with pytest.raises(InputError, match=rf"{bad}: no key column"):
        run(FromReportsConfig(reports=bad, catalog=raw_copy))
    bad.write_text("patient_id,body\n1,No effusion.\n")
    with pytest.raises(InputError, match=rf"{bad}: no text column"):
        run(FromReportsConfig(reports=bad, catalog=raw_copy))
    with pytest.raises(InputError, match=rf"{bad}: missing column 'study_uid'"):
        run(FromReportsConfig(reports=bad, catalog=raw_copy, key="study_uid", text_column="body"))
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"patient_id": "1", "text": "x"}\n{not json\n')
    with pytest.raises(InputError, match=rf"{jl}: line 2 is not valid JSON"):
        run(FromReportsConfig(reports=jl, catalog=raw_copy))
    vocab = tmp_path / "vocab.yaml"
    vocab.write_text("findings:\n  effusion: {synonyms: [effusion]\n")
    with pytest.raises(InputError, match=rf"{vocab}: vocabulary is not valid YAML"):
        run(FromReportsConfig(reports=src / "reports.csv", catalog=raw_copy, vocab=vocab))
    vocab.write_text("findings:\n  effusion: {synonyms: [effusion]}\n")
    with pytest.raises(InputError, match=rf"{vocab}: .*\['nodule'\] are not in the vocabulary"):
        run(
            FromReportsConfig(
                reports=src / "reports.csv", catalog=raw_copy, vocab=vocab, findings=["nodule"]
            )
        )
    with pytest.raises(InputError, match="no catalog.db here"):
        run(FromReportsConfig(reports=src / "reports.csv", catalog=tmp_path))
    (raw_copy / ".umit_secret").unlink()
    with pytest.raises(InputError, match=r"\.umit_secret: pseudonymization secret not found"):
        run(FromReportsConfig(reports=src / "reports.csv", catalog=raw_copy))
    acc = tmp_path / "acc.csv"
    acc.write_text("accession,text\nA1,No effusion.\n")
    with pytest.raises(InputError, match="keeps no accession pseudonyms"):
        run(FromReportsConfig(reports=acc, catalog=raw_copy))
    acc.write_text("patient_id,text\nA1,No effusion.\n")
    with pytest.raises(InputError, match=r"dataset.json: secret file must hold a hex key"):
        run(FromReportsConfig(reports=acc, catalog=raw_copy, secret=src / "dataset.json"))


def test_cli_errors_exit_2_naming_the_file(raw_copy, tmp_path, capsys):
    bad = tmp_path / "r.csv"
    bad.write_text("who,text\n1,x\n")
    assert cli_main(["labels", "from-reports", str(bad), "--catalog", str(raw_copy)]) == 2
    assert f"umit labels: error: {bad}: no key column" in capsys.readouterr().err
    with pytest.raises(InputError, match="has no labels yet"):
        read_labels(raw_copy)
