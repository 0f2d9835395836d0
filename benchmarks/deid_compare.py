"""Side by side: ``umit deid`` and dicognito on the same DICOM files, judged two ways.

Inputs: a planted-identifier series (every Table E.1-1 attribute filled, 3 files that reference
each other, see :mod:`umit.deid.synth`), a burned-in secondary capture, and the real
series ``head_mr_dicom_sag_anon`` and ``monai_testing_data/CT_DICOM`` from ../shared/data.

For each tool and input it reports:

* **survivors** (ground truth): original identifying values (planted ones, or the real series'
  placeholders) still found in the output bytes, by category;
* **--check**: files our residual-identifier scanner flags in the output, and its categories;
* **UIDs**: one new series UID per series, references resolve, a rerun gives the same UIDs;
* **dates**: what happened to StudyDate (removed / dummy / shifted by N days / kept);
* **private**: private attributes left; **burned-in**: what happened to the flagged file;
* **time** per file.

Run: ``.venv/bin/python benchmarks/deid_compare.py [--mr-slices N] [--json OUT.json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pydicom

from umit.deid.check import check_folder
from umit.deid.engine import DeidConfig, _sniff
from umit.deid.engine import run as umit_run
from umit.deid.profile import basic_profile, identifying_keywords
from umit.deid.synth import IDENTITY_TOKENS, write_burned_in, write_planted_series

warnings.filterwarnings("ignore")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_IDENTIFYING = tuple(
    sorted(
        kw
        for kw in identifying_keywords()
        if pydicom.datadict.dictionary_VR(kw) not in ("DA", "DT", "TM", "SQ")
    )
)
"""What the Basic Profile removes or replaces (Table E.1-1); dates are judged separately and
values an option keeps on purpose are not counted as survivors (see :func:`survivors`)."""


def category(keyword: str) -> str:
    """Coarse category of an identifying attribute (the checker's vocabulary)."""
    from umit.deid.check import _category

    entry = next((e for e in basic_profile().entries.values() if e.keyword == keyword), None)
    if keyword in ("private", "curve", "overlay"):
        return "private/graphics"
    if keyword.endswith((".item", ".uid")):
        return "sequence items"
    if entry is None:
        return "other"
    vr = pydicom.datadict.dictionary_VR(entry.tag).split(" or ")[0]
    return _category(entry, vr)


def dicom_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json" and p.name != "DICOMDIR"
    )


# --------------------------------------------------------------------------------------------
# The tools: each takes (src folder, out folder, key/seed) and returns (written, rejected)


def run_umit(options: list[str]) -> Callable[[Path, Path, Path], tuple[int, int]]:
    def _run(src: Path, out: Path, key: Path) -> tuple[int, int]:
        r = umit_run(DeidConfig(src=src, out=out, options=options, secret=key), progress=False)
        return r.written, r.failed

    _run.options = frozenset(options)  # type: ignore[attr-defined]
    return _run


def run_dicognito(src: Path, out: Path, key: Path) -> tuple[int, int]:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed=key.name)  # same seed: the same replacements on a rerun
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, p in enumerate(dicom_files(src)):
        ds = pydicom.dcmread(p)
        anonymizer.anonymize(ds)
        ds.save_as(out / f"{i:05d}.dcm")
        written += 1
    return written, 0


TOOLS = {
    "umit basic": run_umit([]),
    "umit dates+chars+desc": run_umit(
        ["retain-modified-dates", "retain-patient-characteristics", "clean-descriptors"]
    ),
    "dicognito 0.19": run_dicognito,
}


# --------------------------------------------------------------------------------------------
# Inputs


def planted_input(root: Path) -> tuple[Path, dict[str, str]]:
    _, planted = write_planted_series(root / "planted", n=3)
    planted = {k: v for k, v in planted.items() if len(v) >= 4}
    for i, tok in enumerate(IDENTITY_TOKENS):
        planted[f"identity:{i}"] = tok
    return root / "planted", planted


def real_input(root: Path, parts: tuple[str, ...], n: int | None) -> tuple[Path, dict[str, str]]:
    src = SHARED.joinpath(*parts)
    files = sorted(p for p in src.iterdir() if p.is_file() and _sniff(p) is not None)
    if n is not None:
        files = files[:: max(1, len(files) // n)][:n]
    dst = root / parts[-1]
    dst.mkdir(parents=True)
    values: dict[str, str] = {}
    for p in files:
        shutil.copy(p, dst / p.name)
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for kw in REAL_IDENTIFYING:
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4:
                values[f"{kw}:{v}"] = v
    return dst, values


# --------------------------------------------------------------------------------------------
# Judging an output


def survivors(out: Path, planted: dict[str, str], options: frozenset[str]) -> tuple[Counter, int]:
    """Planted values found in the output, by category; and how many of them the chosen
    options keep (K) or clean (C, the value had no identifier to remove) on purpose."""
    blob = b"".join(p.read_bytes() for p in dicom_files(out))
    rows = {e.keyword: e for e in basic_profile().entries.values()}
    found: Counter = Counter()
    by_option = 0
    for label, value in planted.items():
        if value.encode() in blob:
            kw = label.split(":")[0]
            entry = rows.get(kw)
            if options and entry is not None and entry.action(options) in ("K", "C"):
                by_option += 1
                continue
            found["identity words" if kw == "identity" else category(kw)] += 1
    return found, by_option


def uid_summary(out: Path) -> dict[str, object]:
    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(out)]
    sops = {str(d.SOPInstanceUID) for d in ds}
    refs = [
        str(r.ReferencedSOPInstanceUID)
        for d in ds
        for r in d.get("ReferencedImageSequence", [])
        if "ReferencedSOPInstanceUID" in r
    ]
    return {
        "series_uids": len({str(d.SeriesInstanceUID) for d in ds}),
        "refs_resolved": f"{sum(r in sops for r in refs)}/{len(refs)}",
        "sops": sorted(sops),
    }


def date_handling(src: Path, out: Path) -> str:
    """StudyDate in the first output vs the input (files matched by InstanceNumber)."""
    before = {
        int(d.get("InstanceNumber", 0) or 0): str(d.get("StudyDate", "") or "")
        for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(src))
    }
    shifts = set()
    states = Counter()
    for p in dicom_files(out):
        d = pydicom.dcmread(p, stop_before_pixels=True)
        a = str(d.get("StudyDate", "") or "")
        b = before.get(int(d.get("InstanceNumber", 0) or 0), "")
        if "StudyDate" not in d:
            states["removed"] += 1
        elif not a:
            states["empty"] += 1
        elif a == b:
            states["kept"] += 1
        elif a.startswith("1900"):
            states["dummy"] += 1
        else:
            try:
                da = date(int(a[:4]), int(a[4:6]), int(a[6:8]))
                db = date(int(b[:4]), int(b[4:6]), int(b[6:8]))
                shifts.add((da - db).days)
                states["shifted"] += 1
            except ValueError:
                states["changed"] += 1
    if states.get("shifted"):
        return "shifted " + ("consistently" if len(shifts) == 1 else f"{len(shifts)} ways")
    return ", ".join(sorted(states)) or "-"


def private_left(out: Path) -> int:
    n = 0
    for p in dicom_files(out):
        d = pydicom.dcmread(p, stop_before_pixels=True)
        n += sum(1 for e in d.iterall() if e.tag.is_private and not e.tag.is_private_creator)
    return n


def evaluate(tool: str, name: str, src: Path, planted: dict[str, str], work: Path) -> dict:
    fn = TOOLS[tool]
    key = work / "keys" / f"{tool.split()[0]}.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    out = work / "out" / tool.replace(" ", "_") / name
    n_files = len(dicom_files(src))
    t0 = time.perf_counter()
    written, rejected = fn(src, out, key)
    seconds = time.perf_counter() - t0
    rerun = work / "rerun" / tool.replace(" ", "_") / name
    fn(src, rerun, key)
    uids, uids2 = uid_summary(out), uid_summary(rerun)
    report = check_folder(out) if written else None
    found, by_option = survivors(out, planted, getattr(fn, "options", frozenset()))
    return {
        "tool": tool,
        "input": name,
        "files": n_files,
        "written": written,
        "rejected": rejected,
        "survivors": dict(found),
        "kept_by_option": by_option,
        "n_planted": len(planted),
        "check_flagged": f"{len(report.flagged)}/{len(report.files)}" if report else "-",
        "check_categories": dict(report.by_category()) if report else {},
        "series_uids": uids["series_uids"],
        "refs_resolved": uids["refs_resolved"],
        "rerun_same_uids": uids["sops"] == uids2["sops"],
        "dates": date_handling(src, out) if written else "-",
        "private_left": private_left(out),
        "ms_per_file": 1000 * seconds / max(1, n_files),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mr-slices", type=int, default=None, help="MR slices to use (all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = [("planted", *planted_input(work / "in"))]
        sc = write_burned_in(work / "in" / "burned" / "sc.dcm", kind="sc", flag="YES")
        inputs.append(("burned-in SC", sc.parent, {"PatientName": "Doe^Jane^Q"}))
        for parts, n in (
            (("head_mr_dicom_sag_anon",), args.mr_slices),
            (("monai_testing_data", "CT_DICOM"), None),
        ):
            if SHARED.joinpath(*parts).is_dir():
                inputs.append((parts[0], *real_input(work / "in", parts, n)))
            else:
                print(f"skipping {'/'.join(parts)}: not found under {SHARED}", file=sys.stderr)
        for name, src, planted in inputs:
            for tool in TOOLS:
                rows.append(evaluate(tool, name, src, planted, work))
    header = (
        "| input | tool | files written | original identifiers surviving (of planted) "
        "[+ kept by a chosen option] | "
        "--check flags files | UIDs: series, refs resolve, rerun same | StudyDate | "
        "private left | ms/file |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        surv = sum(r["survivors"].values())
        cats = ", ".join(f"{k} {v}" for k, v in sorted(r["survivors"].items()))
        kept = f" [+{r['kept_by_option']}]" if r["kept_by_option"] else ""
        print(
            f"| {r['input']} | {r['tool']} | {r['written']}/{r['files']} | "
            f"{surv}/{r['n_planted']}{f' ({cats})' if cats else ''}"
            f"{kept} | "
            f"{r['check_flagged']} | "
            f"{r['series_uids']}, {r['refs_resolved']}, {'yes' if r['rerun_same_uids'] else 'no'} | "
            f"{r['dates']} | {r['private_left']} | {r['ms_per_file']:.1f} |"
        )
    print("\n--check categories on each output:")
    for r in rows:
        if r["check_categories"]:
            cats = ", ".join(f"{k} {v}" for k, v in sorted(r["check_categories"].items()))
            print(f"  {r['input']} / {r['tool']}: {cats}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
