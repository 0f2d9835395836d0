"""Source formats ``umit ingest`` accepts, each turned into a list of picklable work items.

* a MedMNIST 3D ``.npz`` (``train_images``/``train_labels``, ``val_*``, ``test_*``);
* an MSD or nnU-Net v2 style collection: a folder with ``dataset.json`` (images, labels, channel
  names; MSD keeps channels in one 4D file, nnU-Net in ``<case>_<XXXX>`` files), optionally with
  an ``attributes.csv`` (or ``participants.tsv``) of subject attributes keyed by ``case_id``;
* any other folder tree: DICOM series (grouped by SeriesInstanceUID) and loose NIfTI/NRRD/MHA
  files, a file ``X_seg``/``X_label``/``X_mask`` next to ``X`` being its label; sub-folders with
  their own ``dataset.json`` are ingested as collections.

An item's :meth:`IngestItem.load` returns a :class:`LoadedCase`; nothing is written here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umit.data.io import is_image_file, read_image
from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.ingest.dicom import SetAside, discover_series, load_series

ATTRIBUTE_COLUMNS = (
    "sex",
    "age_band",
    "age",
    "site",
    "manufacturer",
    "model",
    "contrast",
    "body_part",
)
ATTRIBUTE_FILES = ("attributes.csv", "participants.tsv", "participants.csv")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")
MR_CHANNEL_PATTERN = re.compile(
    r"^(mr|mri|t1|t1w|t1c|t1ce|t1gd|t2|t2w|flair|pd|adc|dwi|swi|dce|bold|mprage|hbv)", re.I
)
CT_CHANNEL_PATTERN = re.compile(r"^(ct|cbct|nc[ -_]?ct)", re.I)


def source_key(*parts: object) -> str:
    """Stable key of a source item (resume bookkeeping); a hash so it holds no path text."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]


def modality_from_channel(name: str | None) -> str:
    if not name:
        return "unknown"
    if CT_CHANNEL_PATTERN.match(name):
        return "CT"
    if MR_CHANNEL_PATTERN.match(name):
        return "MR"
    return "unknown"


def image_stem(path: Path) -> str:
    """``a/b/case_01.nii.gz`` -> ``case_01`` (handles double suffixes)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass
class LoadedCase:
    """Voxels and metadata of one source item, ready to validate and write.

    Attributes:
        channels: (channel name, 3D array, meta) per channel, all on one grid.
        label: (label array, meta) or None.
        attributes: Subgroup/acquisition attributes (filtered by umit.deid.allowlist.safe_attributes later).
        subject_key: Raw subject identifier (e.g. PatientID); only ever stored as a pseudonym.
        split: "train"/"val"/"test" when the source defines one.
        target: Classification target (JSON-encodable) when the source has one.
        time_last: The channels are ``(i, j, k, t)`` time series, written as 4D files (a DICOM
            4D series loaded with ``split_4d=False``).
    """

    channels: list[tuple[str, np.ndarray, ImageMeta]]
    label: tuple[np.ndarray, ImageMeta] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    subject_key: str | None = None
    split: str | None = None
    target: Any = None
    time_last: bool = False


@dataclass
class IngestItem:
    """One unit of ingest work (one case); picklable so process pools can run it.

    Attributes:
        key: Stable source key (resume bookkeeping).
        source: Human-readable source (path relative to SRC, or file#index).
        fmt: "dicom", "nifti", "nrrd", "mha", "msd", "nnunet", "medmnist".
        case_hint: The source's own case id when it has coded ids (collections, MedMNIST);
            None where only a pseudonym may be used (DICOM, loose files).
        payload: Format-specific data needed by :meth:`load` (for DICOM also the load option
            ``resample_nonuniform``, set by the ingest run).
        case_id: The case id it will be written under (set by the ingest run before loading).
    """

    key: str
    source: str
    fmt: str
    case_hint: str | None
    payload: dict[str, Any]
    case_id: str | None = None

    def load(self, *, split_4d: bool = True) -> LoadedCase:
        """Read the item; ``split_4d``: a 4D DICOM series becomes one channel per time point
        (True) or one 4D channel (False)."""
        if self.fmt == "dicom":
            return _load_dicom(self, split_4d=split_4d)
        loader = _LOADERS[self.fmt]
        return loader(self)


# ---------------------------------------------------------------------------------------------
# MedMNIST 3D
# ---------------------------------------------------------------------------------------------
MEDMNIST_SPLITS = ("train", "val", "test")


def medmnist_items(npz_path: Path) -> list[IngestItem]:
    """One item per volume of a MedMNIST 3D ``.npz`` (official split kept, class as target)."""
    try:
        data = np.load(npz_path)
        keys = set(data.files)
    except Exception as exc:  # zipfile/pickle errors vary by corruption type
        raise InputError(npz_path, f"cannot read as a MedMNIST .npz archive ({exc})") from exc
    splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys]
    if not splits:
        raise InputError(npz_path, f"no '<split>_images' arrays (found keys {sorted(keys)})")
    name = npz_path.name.removesuffix(".npz")
    items: list[IngestItem] = []
    for split in splits:
        images = data[f"{split}_images"]
        if images.ndim not in (4, 5):
            raise InputError(
                npz_path,
                f"{split}_images has shape {images.shape}; expected (N, D, H, W[, C]) 3D volumes",
            )
        labels = data[f"{split}_labels"] if f"{split}_labels" in keys else None
        for i in range(images.shape[0]):
            target = None if labels is None else labels[i].astype(int).tolist()
            if isinstance(target, list) and len(target) == 1:
                target = target[0]
            items.append(
                IngestItem(
                    key=source_key("medmnist", npz_path.resolve(), split, i),
                    source=f"{npz_path.name}#{split}/{i}",
                    fmt="medmnist",
                    case_hint=f"{name}_{split}_{i:05d}",
                    payload={
                        "array": np.ascontiguousarray(images[i]),
                        "split": split,
                        "target": target,
                    },
                )
            )
    return items


def _load_medmnist(item: IngestItem) -> LoadedCase:
    array = item.payload["array"]
    if array.ndim == 4:  # (D, H, W, C) colour volumes: channels last in MedMNIST
        chans = [(f"C{c}", array[..., c], None) for c in range(array.shape[-1])]
    else:
        chans = [("image", array, None)]
    # MedMNIST volumes come without geometry: 1 mm isotropic, identity orientation (documented).
    meta = ImageMeta(affine=np.eye(4), source=item.source, modality="CT")
    return LoadedCase(
        channels=[(n, a, meta) for n, a, _ in chans],
        split=item.payload["split"],
        target=item.payload["target"],
        attributes={"modality": "CT"},
    )


# ---------------------------------------------------------------------------------------------
# MSD / nnU-Net collections
# ---------------------------------------------------------------------------------------------
def read_attribute_table(folder: Path) -> dict[str, dict[str, str]]:
    """``attributes.csv`` / ``participants.tsv`` beside dataset.json: case id -> attributes."""
    for name in ATTRIBUTE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        delimiter = "\t" if path.suffix == ".tsv" else ","
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            id_col = next(
                (
                    c
                    for c in ("case_id", "participant_id", "subject_id", "id")
                    if c in (reader.fieldnames or [])
                ),
                None,
            )
            if id_col is None:
                raise InputError(path, f"no case_id column (columns: {reader.fieldnames})")
            return {
                row[id_col]: {k: v for k, v in row.items() if k != id_col and v not in (None, "")}
                for row in reader
            }
    return {}


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def collection_items(dataset_json: Path, root: Path | None = None) -> list[IngestItem]:
    """Items of an MSD (``training`` list, 4D multi-channel files) or nnU-Net v2 collection."""
    folder = dataset_json.parent
    root = root or folder
    try:
        spec = json.loads(dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(dataset_json, f"not a readable dataset.json ({exc})") from exc
    if not isinstance(spec, dict):
        raise InputError(dataset_json, "dataset.json must hold a JSON object")
    channel_names = spec.get("channel_names") or spec.get("modality") or {"0": "image"}
    channels = [str(channel_names[k]) for k in sorted(channel_names, key=int)]
    fmt = "nnunet" if "channel_names" in spec else "msd"
    ending = spec.get("file_ending", ".nii.gz")
    attributes = read_attribute_table(folder)
    extra_attrs = {k: spec[k] for k in ("body_part", "site") if k in spec}
    entries: list[tuple[str, list[Path], Path | None, str]] = []  # case, images, label, split

    def resolve(rel: str) -> Path:
        return (folder / rel).resolve()

    if spec.get("training"):
        for entry in spec["training"]:
            images = [resolve(p) for p in _as_list(entry["image"])]
            label = resolve(entry["label"]) if entry.get("label") else None
            per_channel = fmt == "nnunet" or not isinstance(entry["image"], str)
            entries.append(
                (_case_from_files(images, len(channels), per_channel), images, label, "train")
            )
        for entry in spec.get("test", []) or []:
            value = entry["image"] if isinstance(entry, dict) else entry
            images = [resolve(p) for p in _as_list(value)]
            per_channel = fmt == "nnunet" or not isinstance(value, str)
            # a reference label of a test case (e.g. labelsTs/) is kept for scoring the test split
            has_label = isinstance(entry, dict) and entry.get("label")
            label = resolve(entry["label"]) if has_label else None
            entries.append(
                (_case_from_files(images, len(channels), per_channel), images, label, "test")
            )
    else:  # nnU-Net v2: files found by naming convention
        for split, sub in (("train", "imagesTr"), ("test", "imagesTs")):
            cases: dict[str, list[Path]] = {}
            for p in sorted((folder / sub).glob(f"*{ending}")):
                m = re.match(rf"^(.*)_(\d{{4}}){re.escape(ending)}$", p.name)
                if m:
                    cases.setdefault(m.group(1), []).append(p)
            for case, images in cases.items():
                label = (
                    folder / ("labelsTr" if split == "train" else "labelsTs") / f"{case}{ending}"
                )
                entries.append((case, images, label if label and label.exists() else None, split))
    if not entries:
        raise InputError(dataset_json, "no training or test cases listed or found")
    items = []
    for case, images, label, split in entries:
        attrs = {**extra_attrs, **attributes.get(case, {})}
        items.append(
            IngestItem(
                key=source_key("collection", dataset_json.resolve(), case),
                source=str(dataset_json.parent.relative_to(root) / case)
                if root != folder
                else case,
                fmt=fmt,
                case_hint=case,
                payload={
                    "images": [str(p) for p in images],
                    "label": str(label) if label else None,
                    "channels": channels,
                    "split": split,
                    "attributes": attrs,
                    "labels": spec.get("labels"),
                },
            )
        )
    return items


def _case_from_files(images: list[Path], n_channels: int, per_channel_files: bool) -> str:
    """Case id from the first image file: nnU-Net's ``<case>_<XXXX>`` channel suffix removed."""
    stem = image_stem(images[0])
    if per_channel_files or len(images) > 1 or n_channels > 1:
        stem = re.sub(r"_\d{4}$", "", stem)
    return stem


def _load_collection(item: IngestItem) -> LoadedCase:
    p = item.payload
    names: list[str] = p["channels"]
    chans: list[tuple[str, np.ndarray, ImageMeta]] = []
    for path in p["images"]:
        array, meta = read_image(path)
        if array.ndim == 4 and len(p["images"]) == 1:  # MSD: all channels in one 4D file
            if array.shape[3] != len(names):
                raise InputError(
                    path, f"4D image has {array.shape[3]} channels, dataset.json names {len(names)}"
                )
            chans.extend((names[c], array[..., c], meta) for c in range(array.shape[3]))
        else:
            chans.append(
                (names[len(chans)] if len(chans) < len(names) else f"C{len(chans)}", array, meta)
            )
    if len(chans) != len(names):
        raise InputError(
            p["images"][0],
            f"case has {len(chans)} channel file(s), dataset.json names {len(names)} channels",
        )
    label = read_image(p["label"]) if p["label"] else None
    modality = modality_from_channel(names[0])
    attrs = dict(p["attributes"])
    return LoadedCase(
        channels=chans,
        label=label,
        attributes={"modality": modality, **attrs},
        subject_key=attrs.pop("subject_id", None) or item.case_hint,
        split=p["split"],
    )


# ---------------------------------------------------------------------------------------------
# Folder trees: DICOM series and loose image files
# ---------------------------------------------------------------------------------------------
@dataclass
class SetAsideItem:
    """DICOM images found and left out on purpose (a series' localizers), to report.

    Attributes:
        key: Stable source key of the report (one per series).
        source: The folder relative to SRC and the image count, e.g. ``"scout [3 images]"``.
        set_aside: What discovery set aside and why.
    """

    key: str
    source: str
    set_aside: SetAside


def folder_items(
    root: Path, source_prefix: str | None = None
) -> tuple[list[IngestItem], list[tuple[str, str, str]], list[SetAsideItem]]:
    """Items found under ``root``, ``(key, source, reason)`` of unreadable files and the
    localizers set aside.

    Args:
        source_prefix: How sources name ``root`` (default: paths relative to it, ``.`` for
            itself), e.g. ``dicomweb:<series>`` for a series retrieved into a temporary folder.
    """

    def rel(path: Path) -> str:
        name = str(path.relative_to(root)) if path != root else "."
        if source_prefix is None:
            return name
        return source_prefix if name == "." else f"{source_prefix}/{name}"

    items: list[IngestItem] = []
    failures: list[tuple[str, str, str]] = []
    collections = sorted(p.parent for p in root.rglob("dataset.json"))
    for coll in collections:
        try:
            items.extend(collection_items(coll / "dataset.json", root=root))
        except InputError as exc:
            failures.append(
                (source_key("collection", coll.resolve()), str(coll.relative_to(root)), str(exc))
            )

    def inside_collection(p: Path) -> bool:
        return any(c == p or c in p.parents for c in collections)

    image_files = sorted(
        p for p in root.rglob("*") if p.is_file() and is_image_file(p) and not inside_collection(p)
    )
    by_stem = {(p.parent, image_stem(p)): p for p in image_files}
    label_files = {
        p
        for p in image_files
        if any(image_stem(p).lower().endswith(s) for s in LABEL_SUFFIXES)
        and (p.parent, _strip_label_suffix(image_stem(p))) in by_stem
    }
    for p in image_files:
        if p in label_files:
            continue
        label = next(
            (
                by_stem[(p.parent, image_stem(p) + s)]
                for s in LABEL_SUFFIXES
                if (p.parent, image_stem(p) + s) in by_stem
            ),
            None,
        )
        fmt = _file_format(p)
        items.append(
            IngestItem(
                key=source_key("file", p.resolve()),
                source=str(p.relative_to(root)),
                fmt=fmt,
                case_hint=None,
                payload={"image": str(p), "label": str(label) if label else None},
            )
        )

    non_dicom = set(image_files) | {c / "dataset.json" for c in collections}
    series_list, unreadable = discover_series(
        root, exclude=lambda p: p in non_dicom or inside_collection(p)
    )
    for path, reason in unreadable:
        failures.append((source_key("file", Path(path).resolve()), rel(Path(path)), reason))
    set_aside = [
        SetAsideItem(
            key=source_key("dicom-set-aside", s.key),
            source=f"{rel(s.folder)} [{len(s.files)} image{'s' if len(s.files) > 1 else ''}]",
            set_aside=s,
        )
        for s in series_list.set_aside
    ]
    for series in series_list:
        folder = Path(series.files[0]).parent
        items.append(
            IngestItem(
                key=source_key("dicom", series.key),
                source=f"{rel(folder)} [{series.n_slices} slices]",
                fmt="dicom",
                case_hint=None,
                payload={"series": series},
            )
        )
    return items, failures, set_aside


def _strip_label_suffix(stem: str) -> str:
    for s in LABEL_SUFFIXES:
        if stem.lower().endswith(s):
            return stem[: -len(s)]
    return stem


def _file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return "mha"


def _load_file(item: IngestItem) -> LoadedCase:
    array, meta = read_image(item.payload["image"])
    label = read_image(item.payload["label"]) if item.payload["label"] else None
    name = meta.modality if meta.modality != "unknown" else "image"
    return LoadedCase(channels=[(name, array, meta)], label=label, attributes=dict(meta.extra))


def _load_dicom(item: IngestItem, split_4d: bool = True) -> LoadedCase:
    series = item.payload["series"]
    array, meta = load_series(
        series, resample_nonuniform=item.payload.get("resample_nonuniform", False)
    )
    attrs = dict(meta.extra)
    attrs["modality"] = meta.modality
    time_last = array.ndim == 4 and not split_4d
    if array.ndim == 4:
        attrs["n_timepoints"] = array.shape[3]
    if array.ndim == 4 and split_4d:  # (i, j, k, t): one channel per time point
        chans = [(f"{meta.modality}_t{t:03d}", array[..., t], meta) for t in range(array.shape[3])]
    else:  # a 3D volume, or the whole 4D series as one channel (time last)
        chans = [(meta.modality, array, meta)]
    return LoadedCase(
        channels=chans, attributes=attrs, subject_key=series.patient_key, time_last=time_last
    )


_LOADERS = {
    "medmnist": _load_medmnist,
    "msd": _load_collection,
    "nnunet": _load_collection,
    "nifti": _load_file,
    "nrrd": _load_file,
    "mha": _load_file,
    "dicom": _load_dicom,
}
