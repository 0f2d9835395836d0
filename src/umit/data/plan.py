"""The preprocessing plan: everything needed to turn a RAW case into store voxels, as plain JSON.

A plan is computed once from the dataset fingerprint (``fingerprint.py``), may be overridden by
the config, is saved as ``PREP/plan.json`` and travels into every checkpoint, so that inference
applies exactly the spacing, orientation and intensity scheme the model was trained with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from umit import __version__
from umit.config import UmitConfig
from umit.errors import InputError
from umit.utils.fileio import atomic_write_json

PLAN_NAME = "plan.json"
PLAN_FORMAT_VERSION = 1

Scheme = Literal["ct_window", "ct_zscore", "mri_zscore", "none"]
SCHEMES: tuple[str, ...] = ("ct_window", "ct_zscore", "mri_zscore", "none")

# Air in Hounsfield units; the pad value of a CT channel is the normalized value of air.
AIR_HU = -1024.0
# Default body threshold (HU) for CT foreground when a case has no label.
CT_BODY_HU = -500.0

# Plan fields that are provenance, not processing: a rerun may differ in these and still match.
PROVENANCE_FIELDS = frozenset({"umit_version", "created_at", "fingerprint"})


class ChannelPlan(UmitConfig):
    """How one input channel is normalized."""

    name: str
    """Channel name from the catalog, e.g. "CT", "T1", "FLAIR"; cases must match it in order."""
    modality: str = "unknown"
    """Modality of the channel ("CT", "MR", ...); chooses the default scheme and pad value."""
    scheme: Scheme = "none"
    """Intensity scheme. ``ct_window``: clip to [clip_low, clip_high] HU, then map linearly to
    [-1, 1] (window low -> -1, high -> +1; a bounded range suits float16 and transformer
    patch embeddings). ``ct_zscore``: nnU-Net's CTNormalization: clip to the dataset foreground
    percentiles [clip_low, clip_high], then (x - mean) / std with dataset foreground mean/std.
    ``mri_zscore``: per volume, clip to the volume's [percentile_low, percentile_high]
    percentiles over nonzero voxels, then z-score with that volume's nonzero mean/std.
    ``none``: keep the raw values (cast to the image dtype)."""
    clip_low: float | None = None
    """Lower clip (raw units, e.g. HU) for the CT schemes."""
    clip_high: float | None = None
    """Upper clip (raw units) for the CT schemes."""
    mean: float | None = None
    """Dataset foreground mean (raw units) used by ``ct_zscore``; informative otherwise."""
    std: float | None = None
    """Dataset foreground standard deviation used by ``ct_zscore``; informative otherwise."""
    percentile_low: float = 0.5
    """Per-volume lower clip percentile for ``mri_zscore``."""
    percentile_high: float = 99.5
    """Per-volume upper clip percentile for ``mri_zscore``."""

    @model_validator(mode="after")
    def _check(self) -> ChannelPlan:
        if self.scheme in ("ct_window", "ct_zscore"):
            if self.clip_low is None or self.clip_high is None:
                raise ValueError(
                    f"channel {self.name!r}: scheme {self.scheme} needs clip_low and clip_high"
                )
            if not self.clip_low < self.clip_high:
                raise ValueError(
                    f"channel {self.name!r}: clip_low {self.clip_low} must be < clip_high {self.clip_high}"
                )
        if self.scheme == "ct_zscore" and (self.mean is None or not self.std or self.std <= 0):
            raise ValueError(
                f"channel {self.name!r}: ct_zscore needs mean and a positive std, got {self.mean}, {self.std}"
            )
        if not 0 <= self.percentile_low < self.percentile_high <= 100:
            raise ValueError(
                f"channel {self.name!r}: need 0 <= percentile_low < percentile_high <= 100, "
                f"got {self.percentile_low}, {self.percentile_high}"
            )
        return self


class Plan(UmitConfig):
    """Target geometry, intensity scheme per channel and storage layout of a preprocessed dataset."""

    format_version: int = PLAN_FORMAT_VERSION
    """Version of this plan format."""
    target_spacing: tuple[float, float, float]
    """Voxel size in mm along the RAS-ordered voxel axes (i ~ R, j ~ A, k ~ S) after resampling."""
    orientation: Literal["RAS"] = "RAS"
    """Voxel axis orientation of the stored volumes (closest RAS; oblique affines stay oblique)."""
    channels: list[ChannelPlan]
    """One entry per input channel, in catalog channel order."""
    crop_foreground: bool = True
    """Crop each case to the bounding box of its foreground (+ ``crop_margin_mm``) before
    resampling, like nnU-Net's crop-to-nonzero; the label is cropped identically."""
    foreground_threshold: float | None = None
    """Raw intensity above which a voxel counts as body for cropping (and for the fingerprint when
    a case has no label). None: -500 HU for CT channels, nonzero for the others."""
    crop_margin_mm: float = 10.0
    """Margin kept around the foreground bounding box, in mm."""
    image_dtype: Literal["float16", "float32"] = "float16"
    """Stored image dtype. float16 halves the IO and the store size; normalized intensities (about
    [-1, 1] or a few standard deviations) keep ~3 significant digits, far below scanner noise.
    Use float32 with scheme ``none`` on raw values beyond +-2048 that must stay exact."""
    label_dtype: Literal["uint8"] = "uint8"
    """Stored label dtype (label values must be integers in 0..255)."""
    chunk_size: int = 64
    """Edge of the cubic Zarr chunk (image chunks are (1, n, n, n), label chunks (n, n, n)); a
    96³ crop then touches 8 to 27 chunks per channel."""
    compression: Literal["blosc-zstd", "blosc-lz4", "zstd", "none"] = "blosc-zstd"
    """Chunk compressor (Blosc ones byte-shuffle first, which suits float16)."""
    compression_level: int = 3
    """Compression level of the compressor."""
    interpolation_order: Literal[1, 3] = 1
    """Image interpolation: 1 trilinear (exact separable; default), 3 cubic B-spline (scipy).
    Labels always use nearest neighbour, so no new label values appear."""
    labels: dict[str, int] | None = None
    """Label name -> integer value, when the dataset declares them."""
    max_class_locations: int = 10_000
    """Foreground voxel coordinates cached per label class and case for foreground-weighted crops."""
    umit_version: str = __version__
    """Version of umit that made the plan (provenance)."""
    fingerprint: dict[str, Any] = {}
    """Summary of the dataset fingerprint the plan was derived from (provenance)."""
    created_at: str = ""
    """UTC ISO time the plan was made (provenance)."""

    @model_validator(mode="after")
    def _check(self) -> Plan:
        if any(not s > 0 for s in self.target_spacing):
            raise ValueError(f"target_spacing must be positive, got {self.target_spacing}")
        if not self.channels:
            raise ValueError("a plan needs at least one channel")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"channel names must be unique, got {names}")
        if not 8 <= self.chunk_size <= 1024:
            raise ValueError(f"chunk_size must be in 8..1024, got {self.chunk_size}")
        if self.crop_margin_mm < 0:
            raise ValueError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        return self

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    def processing_dict(self) -> dict[str, Any]:
        """The plan without provenance: two plans that agree here produce identical stores."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in PROVENANCE_FIELDS}

    def processing_hash(self) -> str:
        text = json.dumps(self.processing_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: Plan) -> list[str]:
        """Names of processing fields whose values differ from ``other``'s."""
        a, b = self.processing_dict(), other.processing_dict()
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically (temp file + rename)."""
        path = Path(path)
        atomic_write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`, with errors naming the file and the problem."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_NAME
        if not path.is_file():
            raise InputError(path, "plan file not found (run `umit preprocess` to make one)")
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise InputError(path, f"plan is not valid JSON ({exc})") from exc
        return cls.from_json(text, path)

    @classmethod
    def from_json(cls, text: str, path: str | Path) -> Plan:
        """A plan from the JSON text of a plan file (``path`` names it in errors)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"plan is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise InputError(path, f"plan must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if version != PLAN_FORMAT_VERSION:
            raise InputError(
                path,
                f"plan format_version {version} is not supported (expected {PLAN_FORMAT_VERSION})",
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InputError(path, f"invalid plan: {problems}") from exc
