"""Training data per sample: 4 random 96³ crops (image + label) of a CT volume.

MONAI: ``LoadImaged`` (.nii.gz) + ``Spacingd`` to 1.5 x 1.5 x 2 mm (bilinear image, nearest
label) + ``ScaleIntensityRanged`` (-175..250 HU -> 0..1, clipped) + ``RandCropByPosNegLabeld``
(4 crops, pos 1 : neg 1), every sample. Ours: ``StoreCropDataset`` reading 4 crops (foreground
probability 0.5) from the Zarr store that ``umit ingest`` + ``umit preprocess`` wrote once
(resampled to the same spacing and normalised with the same window). The speed-up is real but
comes from moving the decode + resample out of the training loop into a one-off preprocessing
pass (its time is reported as ``info.preprocess_s``) and from reading only the chunks a crop
touches; the volume is synthetic (ellipsoid body, organs, noise, int16 HU) with a label.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cases._common import quiet
from benchmarks.harness import Case, Side

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (96, 96, 40), "spacing": (3.0, 3.0, 4.0), "crop": 32},
    "small": {"shape": (256, 256, 100), "spacing": (1.56, 1.56, 4.0), "crop": 96},
    "full": {"shape": (512, 512, 200), "spacing": (0.78, 0.78, 2.0), "crop": 96},
}
TARGET = (1.5, 1.5, 2.0)
WINDOW = (-175.0, 250.0)
NUM_CROPS = 4


def _cache_root() -> Path:
    default = Path(__file__).resolve().parents[1] / "results" / "cache"
    return Path(os.environ.get("UMIT_BENCH_CACHE", default))


def _write_collection(root: Path, shape, spacing, seed: int = 0) -> None:
    """An MSD-style collection with one int16 CT and its label (.nii.gz)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    X, Y, Z = np.meshgrid(*axes, indexing="ij", sparse=True)
    body = (X / 0.9) ** 2 + (Y / 0.7) ** 2 < 1
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for k, (cx, cy, r, hu) in enumerate(((0.3, 0.1, 0.25, 60), (-0.35, 0.0, 0.2, 150),
                                         (0.0, -0.4, 0.15, 300)), start=1):  # fmt: skip
        organ = (X - cx) ** 2 + (Y - cy) ** 2 + (Z * 0.6) ** 2 < r**2
        ct = np.where(organ, hu, ct)
        label[np.broadcast_to(organ, shape)] = k
    ct += rng.normal(0, 20, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), root / "imagesTr" / "ct_000.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / "ct_000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({  # MSD style
        "name": "bench_ct", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "a", "2": "b", "3": "c"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/ct_000.nii.gz", "label": "./labelsTr/ct_000.nii.gz"}],
    }))  # fmt: skip


def prepare(size: str) -> dict[str, Any]:
    """Writes (once, cached) the .nii.gz collection, the RAW folder and the preprocessed store."""
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    c = SIZES[size]
    root = _cache_root() / f"data_{size}"
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    src, raw, prep = root / "src", root / "raw", root / "prep"
    t = time.perf_counter()
    _write_collection(src, c["shape"], c["spacing"])
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    ingest(IngestConfig(src=src, out=raw, workers=1), progress=False)
    t_ingest = time.perf_counter() - t
    t = time.perf_counter()
    preprocess(PreprocessConfig(raw=raw, out=prep, workers=1, target_spacing=TARGET,
                                ct_window=WINDOW, scheme="ct_window"))  # fmt: skip
    info = {
        "nifti": str(src / "imagesTr" / "ct_000.nii.gz"),
        "label": str(src / "labelsTr" / "ct_000.nii.gz"),
        "prep": str(prep),
        "write_s": round(t_write, 3),
        "ingest_s": round(t_ingest, 3),
        "preprocess_s": round(time.perf_counter() - t, 3),
    }
    done.write_text(json.dumps(info))
    return info


def make(size: str = "full", device: str = "cpu") -> Case:
    quiet()
    c = SIZES[size]
    crop = c["crop"]

    def build(side: str, reference_weights: bool = True) -> Side:
        info = prepare(size)
        if side == "monai":
            from monai.transforms import (
                Compose,
                LoadImaged,
                RandCropByPosNegLabeld,
                ScaleIntensityRanged,
                Spacingd,
            )

            keys = ["image", "label"]
            pipe = Compose([
                LoadImaged(keys, ensure_channel_first=True, image_only=True),
                Spacingd(keys, pixdim=TARGET, mode=("bilinear", "nearest")),
                ScaleIntensityRanged("image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0,
                                     b_max=1.0, clip=True),
                RandCropByPosNegLabeld(keys, "label", spatial_size=crop, pos=1, neg=1,
                                       num_samples=NUM_CROPS),
            ])  # fmt: skip
            pipe.set_random_state(0)
            item = {"image": info["nifti"], "label": info["label"]}

            def step():
                return pipe(dict(item))

            return Side(step, info={"pipeline": "LoadImaged+Spacingd+ScaleIntensityRanged+"
                                    "RandCropByPosNegLabeld"})  # fmt: skip
        if side != "ours":
            raise ValueError(f"unknown side {side!r}")
        from umit.data.dataset import StoreCropDataset

        ds = StoreCropDataset(info["prep"], crop, samples_per_case=NUM_CROPS, foreground_prob=0.5)
        ds[0]  # opens the store, as a DataLoader worker does once
        epoch = [0]

        def step():
            epoch[0] += 1
            ds.set_epoch(epoch[0])
            return [ds[i] for i in range(NUM_CROPS)]

        return Side(step, info={k: v for k, v in info.items() if k.endswith("_s")})

    return Case(
        name="data",
        title=f"training data per sample ({NUM_CROPS} crops of {crop}³ + label)",
        config={
            **c,
            "target_spacing": TARGET,
            "window": WINDOW,
            "num_crops": NUM_CROPS,
            "dtype": "int16 .nii.gz",
        },  # fmt: skip
        build=build,
        reps={"tiny": 1, "small": 5, "full": 5}[size],
        warmup=1,
        count_flops=False,
        notes=__doc__.split("\n\n", 1)[1].strip(),
    )
