"""Whole store cases as model inputs: per-case labels, centred crops, and a dataset of them.

Classification fine-tuning, probes, evaluation, prediction and the privacy audit all feed a
model the same centred, padded case; this is that one definition.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from umit.data.store import Store


def case_label(entry: dict[str, Any], key: str) -> Any:
    """The per-case label ``key`` of a store index entry (a one-element list is unwrapped)."""
    value = entry.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def centre_crop_or_pad(
    volume: np.ndarray, size: tuple[int, int, int], pad_values: list[float]
) -> np.ndarray:
    """(C, X, Y, Z) -> (C, *size): centred crop, padding with each channel's background value."""
    C = volume.shape[0]
    out = np.empty((C, *size), dtype=np.float32)
    for c in range(C):
        out[c] = pad_values[c] if c < len(pad_values) else 0.0
    src, dst = [], []
    for n, s in zip(volume.shape[1:], size, strict=True):
        if n >= s:
            a = (n - s) // 2
            src.append(slice(a, a + s))
            dst.append(slice(0, s))
        else:
            a = (s - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def centred_input(store: Store, case_id: str, size: tuple[int, int, int]) -> torch.Tensor:
    """(C, *size) float tensor of one case, centre-cropped/padded with its background."""
    case = store.case(case_id)
    return torch.from_numpy(
        centre_crop_or_pad(np.asarray(case.read(), np.float32), size, case.pad_values)
    )


def balanced_cases(cases: list[str], targets: dict[str, int]) -> list[str]:
    """Repeat minority-class cases so every class appears equally often (deterministic)."""
    by_class: dict[int, list[str]] = {}
    for c in cases:
        by_class.setdefault(targets[c], []).append(c)
    most = max(len(v) for v in by_class.values())
    out: list[str] = []
    for k in sorted(by_class):
        group = by_class[k]
        out.extend(group[i % len(group)] for i in range(most))
    return out


class CentredCases(torch.utils.data.Dataset):
    """Whole cases, centre-cropped/padded to ``size`` (classification inputs)."""

    def __init__(
        self, store: Store, cases: list[str], size: tuple[int, int, int], repeats: int = 1
    ):
        self.store = store
        self.cases = list(cases)
        self.size = tuple(size)
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.cases) * self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.cases[i // self.repeats]
        return {"image": centred_input(self.store, c, self.size), "case_id": c}
