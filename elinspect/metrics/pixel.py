"""Pixel-level AUROC of anomaly maps against ground-truth defect masks.

The AUROC over every pixel of every image of a split (normal images included), as
MVTec-AD results are reported, computed exactly by torchmetrics' ``binary_auroc``
(``thresholds=None``). Anomaly scores are raw Mahalanobis distances or reconstruction
errors, unbounded; torchmetrics would pass scores outside [0, 1] through a sigmoid, which
saturates in float32 and ties every large score. So the scores are first mapped onto [0, 1]
by min–max scaling in float64 — strictly increasing, so the AUROC (which depends only on the
order of the scores) is unchanged and nothing is squashed. A binned AUROC would need a score
range fixed in advance.

**Memory.** Every pixel is kept until :meth:`PixelAuroc.compute`: a float32 score and a
bool target, 5 bytes. Maps larger than ``max_size`` on their longer side are first
shrunk to it (scores by area averaging, masks by nearest neighbour), so the default 256
keeps at most 256×256×5 B ≈ 0.33 MB per image (1000 test images ≈ 330 MB), and the
number is the AUROC at that resolution; ``max_size=None`` keeps full resolution. Computing
needs a few times that again for torchmetrics' sort. States live on the module's
device; pass ``compute_on_cpu=True`` to keep them in host memory instead. Under DDP the
states are gathered from every rank (``dist_reduce_fx="cat"``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)


def exact_auroc(scores: Tensor, targets: Tensor) -> Tensor:
    """Exact binary AUROC of flat real ``scores`` (any range) against bool ``targets``;
    NaN when either class is absent."""
    if targets.all() or not targets.any():
        return torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    scores = scores.double()
    low, high = scores.min(), scores.max()
    unit = (scores - low) / (high - low) if high > low else torch.zeros_like(scores)
    return binary_auroc(unit, targets.long(), thresholds=None)


class PixelAuroc(Metric):
    """Exact pixel-level AUROC of anomaly maps (higher = more anomalous) against masks.

    ``update(maps, masks)``: maps N×1×H×W or N×H×W (any real scores), masks of the same
    shape (nonzero = defect pixel). ``compute()`` is NaN when the pixels seen are all of
    one class. See the module docstring for memory and the ``max_size`` option.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, max_size: int | None = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_size is not None and max_size < 1:
            raise ConfigError(f"max_size must be None or >= 1, got {max_size}")
        self.max_size = max_size
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        if maps.ndim == 3:
            maps = maps[:, None]
        if masks.ndim == 3:
            masks = masks[:, None]
        if maps.ndim != 4 or maps.shape[1] != 1 or maps.shape != masks.shape:
            raise ValueError(
                f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be N×1×H×W "
                "of the same size"
            )
        maps, masks = maps.detach().float(), masks.detach()
        height, width = maps.shape[-2:]
        if self.max_size is not None and max(height, width) > self.max_size:
            scale = self.max_size / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            maps = F.interpolate(maps, size=size, mode="area")
            masks = F.interpolate(masks.float(), size=size, mode="nearest-exact")
        self.scores.append(maps.flatten())
        self.targets.append(masks.flatten() > 0)

    def compute(self) -> Tensor:
        scores, targets = self.scores, self.targets
        if isinstance(scores, Tensor):  # after a DDP sync the lists are concatenated
            scores, targets = [scores], [targets]
        if not scores:
            return torch.tensor(float("nan"))
        return exact_auroc(torch.cat(scores), torch.cat(targets)).float()


def pixel_auroc_value(metric: PixelAuroc, split: str) -> Tensor | None:
    """The metric's value over what it saw since the last reset, then reset; None (and a
    warning) when it saw nothing or only one class of pixels — a value not worth logging."""
    if not metric.update_called:
        return None
    value = metric.compute()
    metric.reset()
    if not torch.isfinite(value):
        log.warning("%s/pixel_auroc is undefined: the %s masks hold only one class of pixels", split, split)
        return None
    return value
