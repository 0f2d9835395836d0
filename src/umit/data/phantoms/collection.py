"""Phantom collections on disk (nnU-Net v2 / MSD style) that ``umit ingest`` accepts.

``write_phantom_collection`` plans the cases of a collection (seeds derived per split and
index), writes them atomically and in parallel, skips cases already on disk (so a killed run
resumes), and writes ``dataset.json`` and ``attributes.csv``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from umit.data.phantoms._common import _check_modality, _check_seed, _streams
from umit.data.phantoms.ct import CT_CHANNELS, CT_LABELS, make_ct_phantom
from umit.data.phantoms.findings import (
    FINDING_LABELS,
    FINDINGS,
    draw_findings,
    report_identifiers,
    write_report,
)
from umit.data.phantoms.mr import MR_CHANNELS, MR_LABELS, make_mr_phantom
from umit.data.phantoms.scanner import check_shape
from umit.data.phantoms.sites import CT_CONTRASTS, SubjectAttributes, sample_attributes
from umit.errors import InputError
from umit.utils.fileio import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temps

ATTRIBUTES_CSV = "attributes.csv"
REPORTS_CSV = "reports.csv"
FINDINGS_CSV = "findings.csv"
ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "case_id",
    "sex",
    "age_band",
    "site",
    "manufacturer",
    "model",
    "contrast",
)
_FILE_ENDING = ".nii.gz"


def _case_seed(seed: int, split: str, index: int) -> int:
    """Phantom seed of case ``index`` of a split; independent streams for each collection seed."""
    code = 0 if split == "train" else 1
    return int(np.random.SeedSequence([seed, code, index]).generate_state(1, np.uint32)[0])


def _case_attributes(case_seed: int, modality: str, phase: str | None = None) -> SubjectAttributes:
    """The attributes ``make_*_phantom(case_seed)`` will draw, without generating voxels; with
    ``phase``, the same subject scanned in that contrast phase."""
    attrs = sample_attributes(_streams(case_seed, modality)[0], modality)
    return attrs if phase is None else replace(attrs, contrast=phase)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    hdr = img.header
    hdr.set_data_dtype(array.dtype)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


@dataclass
class _Case:
    case_id: str
    case_seed: int
    split: str  # "train" or "test"
    images: list[str] = field(default_factory=list)  # relative to the collection root
    label: str | None = None
    phase: str | None = None  # CT contrast phase of one series of a multiphase exam
    subject: str | None = None  # the exam's subject (shared by its phases)


def _plan_cases(
    n: int, n_test: int, modality: str, seed: int, phases: tuple[str, ...] | None = None
) -> list[_Case]:
    channels = CT_CHANNELS if modality == "ct" else MR_CHANNELS
    cases = []
    for split, count, folder, stem in (
        ("train", n, "imagesTr", f"phantom_{modality}_"),
        ("test", n_test, "imagesTs", f"phantom_{modality}_test_"),
    ):
        for i in range(count):
            subject = f"{stem}{i:04d}"
            # a multiphase exam: one series per phase, the same anatomy on the same grid
            for phase in phases or (None,):
                cid = subject if phase is None else f"{subject}_{phase}"
                case = _Case(cid, _case_seed(seed, split, i), split, phase=phase, subject=subject)
                case.images = [
                    f"{folder}/{cid}_{c:04d}{_FILE_ENDING}" for c in range(len(channels))
                ]
                # test cases keep their reference labels apart (labelsTs/), so the fixed test
                # split of a phantom collection can be scored; nothing trains on them
                case.label = f"{'labelsTr' if split == 'train' else 'labelsTs'}/{cid}{_FILE_ENDING}"
                cases.append(case)
    return cases


def _write_case(args: tuple[Path, _Case, str, tuple[int, int, int], bool]) -> bool:
    """Generate and write one case unless all its files exist; True if it was written."""
    root, case, modality, shape, findings = args
    paths = [root / p for p in case.images] + ([root / case.label] if case.label else [])
    if all(p.is_file() for p in paths):
        return False
    if findings:
        ph = make_ct_phantom(case.case_seed, shape, findings=True)
    elif case.phase is not None:
        attrs = _case_attributes(case.case_seed, modality, case.phase)
        ph = make_ct_phantom(case.case_seed, shape, attributes=attrs)
    else:
        make = make_ct_phantom if modality == "ct" else make_mr_phantom
        ph = make(case.case_seed, shape)
    for rel, name in zip(case.images, ph.meta.channel_names or (), strict=True):
        arr = ph.images[name]
        if arr.dtype != np.int16:  # MR: integer-valued float32 in int16 range, see make_mr_phantom
            arr = arr.astype(np.int16)
        _write_nifti(root / rel, arr, ph.meta.affine)
    if case.label:
        _write_nifti(root / case.label, ph.label, ph.meta.affine)
    return True


def write_phantom_collection(
    out_dir: str | Path,
    n: int,
    modality: str = "ct",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    n_test: int = 0,
    workers: int = 1,
    findings: bool = False,
    phases: Sequence[str] | None = None,
) -> Path:
    """Write an nnU-Net v2-style collection of phantoms that ``umit ingest`` accepts.

    Layout::

        out_dir/dataset.json        channel_names, labels (name -> int), numTraining, file_ending,
                                    "training" / "test" file lists (MSD style), "phantom" settings
        out_dir/attributes.csv      case_id,sex,age_band,site,manufacturer,model,contrast
        out_dir/imagesTr/<case>_<channel:04d>.nii.gz
        out_dir/labelsTr/<case>.nii.gz
        out_dir/imagesTs/<case>_<channel:04d>.nii.gz   (n_test held-out test cases)
        out_dir/labelsTs/<case>.nii.gz                 (their reference labels, for scoring only)

    Training cases are ``phantom_<modality>_0000``..., test cases ``phantom_<modality>_test_0000``;
    each case's phantom seed is derived from ``(seed, split, index)``, so collections with
    different seeds do not share subjects. Every file is written atomically and cases whose files
    exist are skipped, so a killed run resumes where it stopped (and ``n`` can be raised later).

    Args:
        out_dir: Collection folder (created).
        n: Number of labelled training cases (>= 1).
        modality: "ct" or "mr".
        seed: Collection seed (>= 0).
        shape: Reference grid passed to the generator; the generator default if None.
        n_test: Number of held-out test cases written to imagesTs (labels in labelsTs).
        workers: Processes generating cases in parallel.
        findings: CT only: each subject draws findings (liver lesion, pleural effusion,
            splenomegaly, kidney cyst; :mod:`umit.data.phantoms.findings`) painted into image
            and labels (10-12), and the collection gains ``reports.csv`` (patient_id, accession,
            text: one free-text report per study, with planted identifiers), ``findings.csv``
            (the truth per case) and a ``subject_id`` (an MRN) column in ``attributes.csv``.
            False: the collection is exactly what it was before findings existed.
        phases: CT only: write each subject as a multiphase exam, one series per listed
            contrast phase (``CT_CONTRASTS``: none, arterial, portal), with the same anatomy,
            site and grid; case ids ``<subject>_<phase>``, and ``attributes.csv`` gains a
            ``subject_id`` column that links the phases of one exam (``umit pretrain
            method=cross_phase`` pairs them). None: one series per subject, phase drawn.

    Returns:
        ``out_dir`` as a Path.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    modality = _check_modality(modality)
    seed = _check_seed(seed)
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if shape is None:
        shape = (96, 96, 64) if modality == "ct" else (80, 96, 80)
    shape = check_shape(shape)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder")
    if findings and modality != "ct":
        raise ValueError(f"findings are drawn for CT phantoms only, got modality {modality!r}")
    if phases is not None:
        phases = tuple(phases)
        if modality != "ct":
            raise ValueError(f"multiphase exams are CT only, got modality {modality!r}")
        if findings:
            raise ValueError("phases and findings cannot be combined (one report per study)")
        bad = [p for p in phases if p not in CT_CONTRASTS]
        if bad or len(set(phases)) < 2 or len(set(phases)) != len(phases):
            raise ValueError(
                f"phases must be at least two distinct CT contrast phases of {CT_CONTRASTS}, "
                f"got {list(phases)}"
            )
    settings = {"modality": modality, "seed": int(seed), "shape": list(shape)}
    if findings:  # only when on: a collection without findings keeps its old dataset.json
        settings["findings"] = True
    if phases is not None:  # likewise
        settings["phases"] = list(phases)
    _check_existing(root, settings)
    for sub in ("", "imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        remove_stale_temps(root / sub, recursive=False)

    cases = _plan_cases(int(n), int(n_test), modality, seed, phases)
    jobs = [(root, c, modality, shape, bool(findings)) for c in cases]
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _write_case(job)
    else:
        # fork where available: workers need no re-import of the caller's __main__ (a script
        # without a main guard, stdin, a notebook) and start instantly; they only run
        # numpy/scipy/nibabel, never torch, so fork's threads caveat does not bite here.
        method = "fork" if "fork" in get_all_start_methods() else None
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context(method)) as pool:
            list(pool.map(_write_case, jobs, chunksize=max(1, len(jobs) // (4 * workers))))

    attrs = {c.case_id: _case_attributes(c.case_seed, modality, c.phase) for c in cases}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ATTRIBUTE_COLUMNS + (("subject_id",) if findings or phases else ()))
    for c in cases:
        a = attrs[c.case_id]
        row = [c.case_id, a.sex, a.age_band, a.site, a.manufacturer, a.model, a.contrast]
        if findings:
            row.append(report_identifiers(c.case_seed)["mrn"])
        elif phases:
            row.append(c.subject)
        writer.writerow(row)
    atomic_write_text(root / ATTRIBUTES_CSV, buf.getvalue())
    if findings:
        _write_reports(root, cases)

    channels = CT_CHANNELS if modality == "ct" else MR_CHANNELS
    labels = CT_LABELS if modality == "ct" else MR_LABELS
    if findings:
        labels = {**labels, **FINDING_LABELS}
    channel_map = {str(i): name for i, name in enumerate(channels)}
    train = [c for c in cases if c.split == "train"]
    test = [c for c in cases if c.split == "test"]
    dataset = {
        "name": f"UmitPhantom{modality.upper()}",
        "description": (
            "Procedural synthetic "
            + ("CT torso" if modality == "ct" else "MRI head (T1, T2, FLAIR)")
            + " phantoms generated by umit.data.phantoms; subject attributes in "
            + ATTRIBUTES_CSV
        ),
        "reference": "synthetic (umit.data.phantoms)",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "channel_names": channel_map,
        "modality": channel_map,
        "labels": {name: value for value, name in labels.items()},
        "numTraining": len(train),
        "numTest": len(test),
        "file_ending": _FILE_ENDING,
        "training": [
            {"image": [f"./{p}" for p in c.images], "label": f"./{c.label}"} for c in train
        ],
        "test": [{"image": [f"./{p}" for p in c.images], "label": f"./{c.label}"} for c in test],
        "phantom": {
            **settings,
            "generator": "umit.data.phantoms",
            "case_seeds": {c.case_id: c.case_seed for c in cases},
        },
    }
    atomic_write_json(root / "dataset.json", dataset)
    return root


def _write_reports(root: Path, cases: list[_Case]) -> None:
    """``reports.csv`` (patient_id = the MRN of attributes.csv, accession, report text) and
    ``findings.csv`` (case_id + 0/1 per finding: the truth the reports describe)."""
    reports, truth = io.StringIO(), io.StringIO()
    rw = csv.writer(reports, lineterminator="\n")
    tw = csv.writer(truth, lineterminator="\n")
    rw.writerow(("patient_id", "accession", "text"))
    tw.writerow(("case_id", *FINDINGS))
    for c in cases:
        ids = report_identifiers(c.case_seed)
        drawn = draw_findings(c.case_seed)
        rw.writerow((ids["mrn"], ids["accession"], write_report(c.case_seed, drawn)))
        tw.writerow((c.case_id, *(int(v) for v in drawn.present().values())))
    atomic_write_text(root / REPORTS_CSV, reports.getvalue())
    atomic_write_text(root / FINDINGS_CSV, truth.getvalue())


def _check_existing(root: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into a collection written with other settings (cases would mix)."""
    path = root / "dataset.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("phantom")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(path, f"cannot read the existing dataset.json ({exc})") from exc
    if not isinstance(old, dict):
        raise InputError(root, "holds a dataset.json that is not a phantom collection")
    old_settings = {k: old.get(k) for k in settings}
    if (
        old_settings != settings
        or bool(old.get("findings")) != bool(settings.get("findings"))
        or old.get("phases") != settings.get("phases")
    ):
        raise InputError(
            root,
            f"holds a phantom collection written with {old_settings}, not {settings}; "
            "use another folder",
        )
