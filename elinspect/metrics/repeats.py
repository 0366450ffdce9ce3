"""Images that a distributed sampler repeats, counted once.

Under DDP, Lightning's ``DistributedSampler`` pads every rank to the same number of images by
repeating the first ones of the split (5 images on 2 ranks: [0, 2, 4] and [1, 3, 0]). elinspect's
datamodules deal validation and test splits without repeats (:mod:`elinspect.data.sharding`);
these guards still count an image once where a loader does repeat one (a split with fewer images
than ranks, a loader of one's own): metrics gathered over the ranks keep each image's first
occurrence, by its index in the split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def first_occurrences(values: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of a 1-d tensor, in order."""
    _, first = np.unique(values.cpu().numpy(), return_index=True)
    return torch.as_tensor(np.sort(first), dtype=torch.long, device=values.device)


def counted_once(image_ids: Tensor) -> Tensor:
    """A boolean mask over ``image_ids`` (1-d) that keeps the first occurrence of each id; a
    negative id (an image without one) is always kept."""
    keep = image_ids < 0
    known = torch.nonzero(~keep).flatten()
    keep[known[first_occurrences(image_ids[known])]] = True
    return keep
