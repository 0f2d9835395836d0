"""Private helpers shared by the phantom modules: argument checks and random streams.

Kept apart so that the site tables, the scanner simulation, both anatomy painters and the
collection writer validate arguments and split seeds the same way, without importing each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _check_modality(modality: str) -> str:
    if not isinstance(modality, str) or modality.lower() not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    return modality.lower()


def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


_MODALITY_CODE = {"ct": 1, "mr": 2}


def _streams(seed: int, modality: str) -> list[np.random.Generator]:
    """Independent generators: attributes, anatomy, acquisition.

    Anatomy draws only scalars whose number does not depend on the grid, so one seed gives the
    same anatomy at every site (only the acquisition differs).
    """
    ss = np.random.SeedSequence([seed, _MODALITY_CODE[modality]])
    return [np.random.default_rng(s) for s in ss.spawn(3)]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _n(rng: np.random.Generator, sd: float) -> float:
    return float(rng.normal(0.0, sd))
