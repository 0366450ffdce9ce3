"""Multi-class softmax focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection").

For a sample of true class ``u`` with softmax probability ``p_u``::

    FL = -alpha_u * (1 - p_u) ** gamma * log(p_u)

The modulating factor ``(1 - p_u) ** gamma`` down-weights well-classified (easy) samples;
``gamma = 0`` and no ``alpha`` is plain cross-entropy. The interface is that of
``F.cross_entropy`` — ``loss(logits[N, C], target[N])`` — so the same module serves the
detector's ROI classifier (class 0 = background) and the image classifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elinspect.utils.errors import ConfigError

REDUCTIONS = ("mean", "sum", "none")


class FocalLoss(nn.Module):
    """Softmax focal loss.

    Args:
        gamma: focusing parameter (>= 0); the paper's default is 2.
        alpha: ``None`` (no weighting), a float applied to every sample (the form of
            kornia's and mmcv's softmax focal loss), or one weight per class
            (``alpha_u`` by target class, e.g. inverse-frequency weights).
        reduction: ``"mean"`` (over the non-ignored samples, like ``F.cross_entropy``
            without class weights), ``"sum"`` or ``"none"`` (per-sample losses, 0 where ignored).
        ignore_index: target value whose samples contribute nothing.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"gamma must be >= 0, got {gamma}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.scalar_alpha: float | None = None
        self.register_buffer("class_alpha", None)
        if isinstance(alpha, int | float):
            self.scalar_alpha = float(alpha)
        elif alpha is not None:
            self.class_alpha = torch.as_tensor(alpha, dtype=torch.float32).flatten()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, safe_target[:, None]).squeeze(1)
        loss = -log_p
        if self.gamma != 0:
            loss = (1 - log_p.exp()).clamp(min=0).pow(self.gamma) * loss
        if self.scalar_alpha is not None:
            loss = self.scalar_alpha * loss
        elif self.class_alpha is not None:
            if self.class_alpha.numel() != logits.shape[1]:
                raise ValueError(
                    f"alpha has {self.class_alpha.numel()} weights for {logits.shape[1]} classes"
                )
            loss = self.class_alpha.to(loss.device)[safe_target] * loss
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if self.reduction == "mean":
            return loss.sum() / valid.sum().clamp(min=1)
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        alpha = self.scalar_alpha if self.class_alpha is None else self.class_alpha.tolist()
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}"
