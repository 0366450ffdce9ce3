"""Seeded splits of a dataset's items: stratified (a held-out fraction, or k folds) and plain
random (by ratios, a held-out fraction, or a fixed-size test set).

Stratification keeps each stratum's share (e.g. ELPV's defect probability × module type)
the same in every part, up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from elinspect.utils.errors import ConfigError


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


def ratio_split(num_items: int, ratios: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(num_items)`` into parts sized by ``ratios``.

    ``ratios`` are normalised to sum 1; part boundaries are the rounded cumulative shares,
    so 24 items at 6:2:2 (the EBBA paper's protocol) give 14 / 5 / 5. Each part is sorted.
    """
    shares = np.asarray(ratios, dtype=np.float64)
    if shares.ndim != 1 or len(shares) == 0 or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"split ratios must be non-negative with a positive sum, got {list(ratios)}")
    bounds = np.rint(np.cumsum(shares / shares.sum()) * num_items).astype(int)
    order = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(part) for part in np.split(order, bounds[:-1])]


def holdout_split(num_items: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held out)`` sorted indices, with ``round(fraction · num_items)`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a held-out fraction must lie in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(num_items)
    num_held = int(round(fraction * num_items))
    return np.sort(order[num_held:]), np.sort(order[:num_held])


MIN_TRAIN = 2  # images a split by test_size must leave for training (train + val)


def fixed_size_split(num_items: int, test_size: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded ``{"train", "val", "test"}`` sorted indices: ``test_size`` random items for test,
    then ``round(val_fraction · rest)`` of the rest for val, the remainder for train.

    The RDDN paper's protocol on Aluminum and Fabric (``rddn.txt`` §III.A: "we randomly select
    500 images for testing, and use all the rest images for training"; val is ours). A dataset
    with fewer than ``test_size + 2`` items is refused (never silently capped: a smaller test set
    would be a different protocol); lower ``data.test_size`` for a small set.
    """
    if test_size < 1:
        raise ConfigError(f"data.test_size must be at least 1, got {test_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {val_fraction}")
    if num_items < test_size + MIN_TRAIN:
        raise ValueError(
            f"{num_items} images cannot give a {test_size}-image test split and a training split "
            f"(at least {test_size + MIN_TRAIN} needed); set data.test_size lower for a small dataset"
        )
    order = np.random.default_rng(seed).permutation(num_items)
    test, rest = order[:test_size], order[test_size:]
    num_val = int(round(val_fraction * len(rest)))
    num_val = min(num_val, len(rest) - 1)  # never an empty training split
    return {"train": np.sort(rest[num_val:]), "val": np.sort(rest[:num_val]), "test": np.sort(test)}
