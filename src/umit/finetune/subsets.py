"""Seeded, stratified label subsets for label-fraction experiments.

``select_labeled(ids, strata, fraction=0.1, seed=0)`` keeps a fraction of the training cases
labeled, stratified by class (classification) or by any attribute; the rest are never used with
labels. Subsets are nested across fractions for one seed (10% contains 5%), so a curve measures
more labels, not different ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def select_labeled(
    ids: Sequence[str],
    strata: Sequence[object] | None = None,
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
) -> list[str]:
    """A seeded subset of ``ids`` (fraction or count), stratified by ``strata`` when given.

    Every stratum keeps at least one case when the requested size allows it, and the subset for a
    smaller fraction is contained in the subset for a larger one (same seed).
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction and count")
    n = len(ids)
    if n == 0:
        raise ValueError("no cases to select from")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        k = max(1, int(round(fraction * n)))
    else:
        if count is None or count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        k = min(int(count), n)
    strata = ["all"] * n if strata is None else [str(s) for s in strata]
    if len(strata) != n:
        raise ValueError(f"strata has {len(strata)} entries for {n} ids")
    rng = np.random.default_rng([seed, 104729])
    groups: dict[str, list[int]] = {}
    for i in rng.permutation(n):  # a seeded order within each stratum: prefixes are nested
        groups.setdefault(strata[i], []).append(int(i))
    # allocate by largest remainder, at least one per stratum while k allows
    names = sorted(groups)
    quota = {g: len(groups[g]) * k / n for g in names}
    take = {g: int(np.floor(quota[g])) for g in names}
    if k >= len(names):
        for g in names:
            take[g] = max(take[g], 1)
    left = k - sum(take.values())
    for g in sorted(names, key=lambda g: quota[g] - np.floor(quota[g]), reverse=True):
        if left <= 0:
            break
        if take[g] < len(groups[g]):
            take[g] += 1
            left -= 1
    while sum(take.values()) > k:  # the at-least-one rule overshot: trim the largest strata
        g = max(names, key=lambda g: take[g])
        take[g] -= 1
    chosen = [ids[i] for g in names for i in groups[g][: take[g]]]
    return sorted(chosen)
