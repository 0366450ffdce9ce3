"""Seeded, stratified splits: a held-out fraction, or k folds.

Stratification keeps each stratum's share (e.g. ELPV's defect probability × module type)
the same in every part, up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_fold_ids(strata: Sequence, num_folds: int, seed: int) -> np.ndarray:
    """Assign every item a fold in ``0..num_folds-1``, balanced within each stratum."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}")
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(strata), dtype=np.int64)
    offset = 0
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        # continue the round-robin across strata so fold sizes differ by at most one
        folds[members] = (np.arange(len(members)) + offset) % num_folds
        offset += len(members)
    return folds


def stratified_holdout(strata: Sequence, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out ``fraction`` of the items, stratified."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a held-out fraction must lie in [0, 1), got {fraction}")
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(strata), dtype=bool)
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        held[members[: int(round(fraction * len(members)))]] = True
    return held
