"""Plan computation: fingerprint -> :class:`~umit.data.plan.Plan`, and config overrides.

The plan's schema lives in :mod:`umit.data.plan` (ground layer: the store, inference and every
checkpoint read it); this module decides its values for a dataset.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from umit.data.plan import SCHEMES, ChannelPlan, Plan
from umit.errors import InputError


def default_scheme(modality: str | None) -> str:
    """CT -> ``ct_window``; MR -> ``mri_zscore``; anything else -> ``mri_zscore`` (per-volume)."""
    return "ct_window" if (modality or "").upper() == "CT" else "mri_zscore"


def plan_from_fingerprint(
    fingerprint: dict[str, Any],
    *,
    target_spacing: tuple[float, float, float] | None = None,
    ct_window: tuple[float, float] | None = None,
    scheme: str | dict[str, str] | None = None,
    labels: dict[str, int] | None = None,
    **fields: Any,
) -> Plan:
    """Make a plan from a fingerprint (see :func:`umit.preprocess.fingerprint.compute_fingerprint`).

    Args:
        fingerprint: The fingerprint dict.
        target_spacing: Overrides the fingerprint's target spacing (mm, RAS axis order).
        ct_window: (low, high) HU window for ``ct_window`` channels; default: the fingerprint's
            foreground [p0.5, p99.5].
        scheme: One scheme for every channel, or channel name -> scheme.
        labels: Label name -> value.
        **fields: Other :class:`Plan` fields (crop_foreground, image_dtype, chunk_size, ...);
            None values are ignored.
    """
    channels = []
    for ch in fingerprint["channels"]:
        name, modality = ch["name"], ch.get("modality") or "unknown"
        chosen = scheme.get(name) if isinstance(scheme, dict) else scheme
        chosen = chosen or default_scheme(modality)
        if chosen not in SCHEMES:
            raise InputError(
                None, f"unknown scheme {chosen!r} for channel {name!r}; choose from {SCHEMES}"
            )
        clip_low, clip_high = ch.get("p00_5"), ch.get("p99_5")
        if chosen == "ct_window" and ct_window is not None:
            clip_low, clip_high = float(ct_window[0]), float(ct_window[1])
        elif chosen == "mri_zscore":
            clip_low = clip_high = None  # clipped per volume at apply time
        channels.append(
            ChannelPlan(
                name=name,
                modality=modality,
                scheme=chosen,
                clip_low=clip_low,
                clip_high=clip_high,
                mean=ch.get("mean"),
                std=ch.get("std"),
            )
        )
    if isinstance(scheme, dict):
        unknown = set(scheme) - {c.name for c in channels}
        if unknown:
            raise InputError(
                None,
                f"scheme names unknown channels {sorted(unknown)}; channels are {[c.name for c in channels]}",
            )
    summary = {k: v for k, v in fingerprint.items() if k not in ("cases",)}
    try:
        return Plan(
            target_spacing=tuple(target_spacing or fingerprint["target_spacing"]),
            channels=channels,
            labels=labels,
            fingerprint=summary,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in fields.items() if v is not None},
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InputError(None, f"invalid plan settings: {problems}") from exc


def apply_overrides(
    plan: Plan,
    *,
    target_spacing: tuple[float, float, float] | None = None,
    ct_window: tuple[float, float] | None = None,
    scheme: str | dict[str, str] | None = None,
    **fields: Any,
) -> Plan:
    """A copy of a loaded plan with config overrides applied (None values are ignored)."""
    data = plan.model_dump(mode="json")
    if target_spacing is not None:
        data["target_spacing"] = list(target_spacing)
    fp_channels = {c["name"]: c for c in plan.fingerprint.get("channels", [])}
    for ch in data["channels"]:
        chosen = scheme.get(ch["name"]) if isinstance(scheme, dict) else scheme
        if chosen is not None:
            if chosen not in SCHEMES:
                raise InputError(None, f"unknown scheme {chosen!r}; choose from {SCHEMES}")
            if chosen != ch["scheme"] and chosen == "ct_zscore" and ch["name"] in fp_channels:
                fp = fp_channels[ch["name"]]
                ch.update(
                    clip_low=fp.get("p00_5"),
                    clip_high=fp.get("p99_5"),
                    mean=fp.get("mean"),
                    std=fp.get("std"),
                )
            ch["scheme"] = chosen
        if ct_window is not None and ch["scheme"] == "ct_window":
            ch["clip_low"], ch["clip_high"] = float(ct_window[0]), float(ct_window[1])
    data.update({k: v for k, v in fields.items() if v is not None})
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InputError(None, f"invalid plan overrides: {problems}") from exc
