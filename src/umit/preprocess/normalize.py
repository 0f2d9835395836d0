"""Intensity normalization per channel, as the plan says, plus the body masks used for cropping.

Each function returns the normalized float32 volume and the channel's *pad value*: the normalized
value of air/background, which crops that reach past the volume are filled with.
"""

from __future__ import annotations

import numpy as np

from umit.data.plan import AIR_HU, CT_BODY_HU, ChannelPlan

MIN_MASK_VOXELS = 16  # fewer nonzero voxels than this: per-volume stats use the whole volume


def is_ct(modality: str | None) -> bool:
    return (modality or "").upper() == "CT"


def body_mask(
    array: np.ndarray, modality: str | None, threshold: float | None = None
) -> np.ndarray:
    """Voxels that belong to the body: ``> threshold`` if given, else > -500 HU for CT, nonzero otherwise."""
    if threshold is not None:
        return array > threshold
    if is_ct(modality):
        return array > CT_BODY_HU
    return array != 0


def _ct_window(x: np.ndarray | float, low: float, high: float) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float32), np.float32(low), np.float32(high))
    return (x - np.float32(low)) * np.float32(2.0 / (high - low)) - np.float32(1.0)


def _zscore(x: np.ndarray | float, low: float, high: float, mean: float, std: float) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float32), np.float32(low), np.float32(high))
    return (x - np.float32(mean)) / np.float32(max(std, 1e-8))


def normalize_channel(
    array: np.ndarray, channel: ChannelPlan, threshold: float | None = None
) -> tuple[np.ndarray, float, dict]:
    """Normalize one channel; returns ``(float32 array, pad value, per-volume stats)``.

    Args:
        array: Raw intensities of one channel (any numeric dtype).
        channel: The channel's plan (scheme, clips, dataset stats, percentiles).
        threshold: Body threshold for ``mri_zscore``'s statistics mask (default: nonzero voxels).
    """
    scheme = channel.scheme
    if scheme == "ct_window":
        out = _ct_window(array, channel.clip_low, channel.clip_high)
        return out, float(_ct_window(AIR_HU, channel.clip_low, channel.clip_high)), {}
    if scheme == "ct_zscore":
        out = _zscore(array, channel.clip_low, channel.clip_high, channel.mean, channel.std)
        pad = _zscore(AIR_HU, channel.clip_low, channel.clip_high, channel.mean, channel.std)
        return out, float(pad), {}
    if scheme == "mri_zscore":
        x = np.asarray(array, dtype=np.float32)
        mask = x > threshold if threshold is not None else x != 0
        values = x[mask] if int(mask.sum()) >= MIN_MASK_VOXELS else x.ravel()
        low, high = np.percentile(values, [channel.percentile_low, channel.percentile_high])
        clipped = np.clip(values, low, high)
        mean, std = float(clipped.mean(dtype=np.float64)), float(clipped.std(dtype=np.float64))
        out = _zscore(x, low, high, mean, std)
        pad = float(_zscore(0.0, low, high, mean, std))
        return (
            out,
            pad,
            {"clip_low": float(low), "clip_high": float(high), "mean": mean, "std": std},
        )
    if scheme == "none":
        out = np.asarray(array, dtype=np.float32)
        pad = AIR_HU if is_ct(channel.modality) else float(out.min()) if out.size else 0.0
        return out, float(pad), {}
    raise ValueError(f"unknown scheme {scheme!r}")
