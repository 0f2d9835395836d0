"""Data for the cross-sequence evidence (docs/pretraining.md): BRATS folds and MR lesion phantoms.

    python benchmarks/cross_sequence_evidence.py brats --out runs/xseq/brats
    python benchmarks/cross_sequence_evidence.py phantoms --out runs/xseq/phantoms

``brats``: the 6 subjects of ``../shared/data/brats_deepmedic`` (FLAIR + T1c, already mean/std
normalised) as an nnU-Net collection with the whole tumour (labels 1-4) as one label; ingest;
preprocess at 4 mm; then one PREP folder per fold of a 3-fold subject CV (``fold<k>/``: the
fold's plan and store, its index with the fold's two subjects as split ``test``).

``phantoms``: MR head phantoms (T1, T2, FLAIR) with the lesion (tumour core, rim, necrosis) as
the only label; subjects without a lesion stay in the store as unlabeled images (pretraining
uses them, fine-tuning cannot); six lesion subjects form the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from umit.data.phantoms.collection import write_phantom_collection
from umit.ingest.run import IngestConfig
from umit.ingest.run import run as ingest
from umit.preprocess.run import PreprocessConfig
from umit.preprocess.run import run as preprocess

BRATS = Path(os.environ.get("UMIT_SHARED_DATA", "../shared/data")) / "brats_deepmedic"
CHANNELS = {"Flair_subtrMeanDivStd.nii.gz": "FLAIR", "T1c_subtrMeanDivStd.nii.gz": "T1c"}


def brats_collection(src: Path, out: Path) -> list[str]:
    """nnU-Net collection of the BRATS subjects (images linked, labels binarised)."""
    subjects = sorted(src.glob("*/brats_*"))
    if not subjects:
        raise SystemExit(f"no BRATS subjects under {src}")
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for folder in subjects:
        case = folder.name
        names.append(case)
        for i, fname in enumerate(CHANNELS):
            link = out / "imagesTr" / f"{case}_{i:04d}.nii.gz"
            if not link.exists():
                link.symlink_to((folder / fname).resolve())
        lab = nib.load(folder / "OTMultiClass.nii.gz")
        tumour = (np.asarray(lab.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(tumour, lab.affine), out / "labelsTr" / f"{case}.nii.gz")
    spec = {
        "channel_names": {str(i): n for i, n in enumerate(CHANNELS.values())},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": len(names),
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(spec, indent=1))
    return names


def fold_store(prep: Path, out: Path, test: list[str]) -> Path:
    """A PREP folder sharing ``prep``'s store with ``test`` as the test split, the rest train."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("plan.json", "config.yaml", "fingerprint.json"):
        if (prep / name).is_file():
            shutil.copy(prep / name, out / name)
    link = out / "store.zarr"
    if not link.exists():
        link.symlink_to((prep / "store.zarr").resolve())
    index = json.loads((prep / "index.json").read_text())
    for case, row in index["cases"].items():
        row["split"] = "test" if case in test else "train"
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return out


def brats(out: Path, spacing: float) -> None:
    names = brats_collection(BRATS, out / "src")
    ingest(IngestConfig(src=out / "src", out=out / "raw"), progress=False)
    prep = out / "prep"
    if not (prep / "index.json").is_file():
        preprocess(
            PreprocessConfig(raw=out / "raw", out=prep, target_spacing=(spacing,) * 3, workers=1)
        )
    folds = [names[i::3] for i in range(3)]
    for k, test in enumerate(folds):
        fold_store(prep, out / f"fold{k}", test)
        print(f"fold{k}: test {test}")


def phantoms(out: Path, n: int, spacing: float) -> None:
    src = out / "src"
    write_phantom_collection(src, n=n, modality="mr", seed=16, shape=(64, 72, 64), workers=1)
    spec = json.loads((src / "dataset.json").read_text())
    lesion_cases = []
    for path in sorted((src / "labelsTr").glob("*.nii.gz")):
        lab = nib.load(path)
        arr = np.asarray(lab.dataobj)
        lesion = 5 if arr.max() > 1 else 1  # 1: binarised by an earlier run
        if (arr == lesion).any() and not path.name.startswith("."):
            lesion_cases.append(path.name[: -len(".nii.gz")])
        if lesion != 1:
            nib.save(nib.Nifti1Image((arr == lesion).astype(np.uint8), lab.affine), path)
    spec["labels"] = {"background": 0, "lesion": 1}
    (src / "dataset.json").write_text(json.dumps(spec, indent=1))
    ingest(IngestConfig(src=src, out=out / "raw"), progress=False)
    prep = out / "prep"
    if not (prep / "index.json").is_file():
        preprocess(
            PreprocessConfig(raw=out / "raw", out=prep, target_spacing=(spacing,) * 3, workers=1)
        )
    index = json.loads((prep / "index.json").read_text())
    test = lesion_cases[:6]
    for case, row in index["cases"].items():
        row["split"] = "test" if case in test else "train"
        if case not in lesion_cases:
            row["has_label"] = False  # images for pretraining only
    (prep / "index.json").write_text(json.dumps(index, indent=1))
    print(f"{len(index['cases'])} phantoms, {len(lesion_cases)} with a lesion, test {test}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", choices=["brats", "phantoms"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=32, help="phantoms")
    ap.add_argument("--spacing", type=float, default=None, help="target spacing in mm")
    a = ap.parse_args()
    if a.what == "brats":
        brats(a.out, a.spacing or 4.0)
    else:
        phantoms(a.out, a.n, a.spacing or 3.0)


if __name__ == "__main__":
    main()
