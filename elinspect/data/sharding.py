"""How a split is dealt to the ranks under DDP, so that every image counts once.

torch's ``DistributedSampler``, which Lightning puts into every loader under DDP, pads the ranks
to one size with images already served: 7 images on 2 ranks are served as [0, 2, 4, 6] and
[1, 3, 5, 0]. Anything summed or gathered over the ranks then holds the first images twice.

* **Evaluation** (validation, test, predict): :func:`evaluation_sampler` deals each rank its
  share with nothing repeated (Lightning's ``UnrepeatedDistributedSampler``; shares differ by at
  most one image). Evaluation runs no collective per step, so uneven shares are safe; a split
  smaller than the world keeps Lightning's sampler, since every rank needs a batch.
* **Training** keeps the padding: DDP's gradient steps need the same number of batches on every
  rank, and a repeated image in a gradient step is harmless. Statistics that a model computes
  once over the training split are not: PaDiM's Gaussian, SeMaCNN's heatmap scale, GAN-AE's
  percentile threshold. :class:`FlaggingDistributedSampler` serves the same images in the same
  order as Lightning's sampler and marks the padded ones; :class:`FlagRepeats` puts the mark into
  the sample as ``repeat`` (True for the padding), which those statistics leave out
  (:func:`elinspect.data.normals.defect_free` with ``once=True``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler


class FlaggedIndex(NamedTuple):
    """A dataset index, and whether the sampler serves it again only to pad its rank."""

    index: int
    repeat: bool


class FlaggingDistributedSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (padding included, so every rank has as many batches),
    yielding :class:`FlaggedIndex` entries: ``repeat`` is True where a position only pads."""

    def __iter__(self) -> Iterator[FlaggedIndex]:  # type: ignore[override]
        size = len(self.dataset)  # type: ignore[arg-type]
        # the rank's i-th index sits at position rank + i·world of the padded epoch order
        for i, index in enumerate(super().__iter__()):
            yield FlaggedIndex(index, self.rank + i * self.num_replicas >= size)


class FlagRepeats(Dataset):
    """A map-style dataset read by :class:`FlaggedIndex`: the sample at its index, with
    ``repeat`` (a bool tensor) added to a dict sample; a plain index reads as before."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | FlaggedIndex) -> Any:
        index, repeat = key if isinstance(key, FlaggedIndex) else (key, False)
        sample = self.dataset[index]
        if isinstance(sample, dict):
            sample = {**sample, "repeat": torch.tensor(repeat)}
        return sample


def training_sampler(
    dataset: Dataset, world_size: int, rank: int, shuffle: bool = True
) -> FlaggingDistributedSampler:
    """The training shard as Lightning would deal it (shuffled unless ``overfit_batches``, seeded
    by ``PL_GLOBAL_SEED``, padded), its padding flagged; read the dataset through
    :class:`FlagRepeats`."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return FlaggingDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)


def evaluation_sampler(dataset: Dataset, world_size: int, rank: int) -> Sampler[int] | None:
    """Each rank's share of an evaluation split, nothing repeated; None where the split has
    fewer images than ranks (Lightning's padded sampler is left to shard it)."""
    if len(dataset) < world_size:  # type: ignore[arg-type]
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
