"""Scaled Dynamic Focal Loss, SDFL (EBBA-Detector §3.C, DESIGN §2).

For a sample of true class ``u`` with softmax probability ``p_u``::

    SDFL = -alpha_u * (1 - p_u) ** gamma * log(p_u),    alpha_u = m * (1 - n_u / N) ** gamma

``n_u`` is the number of training boxes (samples, for a classifier) of class ``u`` and
``N`` the number of all of them, so rare classes get weights close to ``m`` and frequent
ones smaller weights; the same ``gamma`` shapes both the class weight and the focal term.
The paper's check: m = 4, gamma = 2, N = 7747, n_u = 101 (star crack) gives alpha_u = 3.896.

The counts are never typed in a config: :func:`elinspect.models.build.build_loss` calls
:meth:`ScaledDynamicFocalLoss.set_class_counts` with the training split's per-class counts
from the datamodule (foreground classes in order, background excluded).

Two label layouts are served by the same counts, told apart by the number of logit columns:

- detector ROI heads: ``len(counts) + 1`` columns, label 0 = background with weight
  ``background_alpha`` (the paper: 1), label ``i`` ↔ ``counts[i - 1]``;
- classifiers: ``len(counts)`` columns, label ``i`` ↔ ``counts[i]``, no background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from elinspect.losses.focal import REDUCTIONS, FocalLoss
from elinspect.utils.errors import ConfigError


def alpha_from_counts(counts: Sequence[int], m: float = 4.0, gamma: float = 2.0) -> Tensor:
    """``alpha_u = m * (1 - n_u / N) ** gamma`` for every class ``u`` (``N = sum(counts)``), float32."""
    n = torch.as_tensor([int(c) for c in counts], dtype=torch.float64)
    if n.numel() == 0:
        raise ValueError("class counts are empty")
    if (n < 0).any():
        raise ValueError(f"class counts must be >= 0, got {list(counts)}")
    total = n.sum()
    if total <= 0:
        raise ValueError(f"class counts sum to 0: {list(counts)}")
    return (m * (1 - n / total) ** gamma).float()


class ScaledDynamicFocalLoss(nn.Module):
    """SDFL: softmax focal loss weighted per class by ``alpha_u = m (1 - n_u / N) ** gamma``.

    Args:
        m: the largest class weight (a class with no training samples gets ``m``); paper: 4.
        gamma: focusing parameter of both the focal term and the class weights; paper: 2.
        background_alpha: weight of the background (label 0) when the logits have a
            background column (detector ROI heads); paper: 1.
        reduction: ``"mean"`` (over non-ignored samples, like :class:`FocalLoss`),
            ``"sum"`` or ``"none"``.
        ignore_index: target value whose samples contribute nothing.

    Call :meth:`set_class_counts` before the first forward (the training entry point does).
    The class weights are a persistent buffer, so a checkpoint carries them.
    """

    alpha: Tensor | None

    def __init__(
        self,
        m: float = 4.0,
        gamma: float = 2.0,
        background_alpha: float = 1.0,
        reduction: str = "mean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if m <= 0:
            raise ConfigError(f"m must be > 0, got {m}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.m = float(m)
        self.gamma = float(gamma)
        self.background_alpha = float(background_alpha)
        self.reduction = reduction
        self.ignore_index = ignore_index
        # The unweighted focal term per sample (0 where ignored); validates gamma >= 0.
        self.focal = FocalLoss(gamma=gamma, alpha=None, reduction="none", ignore_index=ignore_index)
        self.register_buffer("alpha", None)  # one weight per foreground class, set from the counts

    alpha_from_counts = staticmethod(alpha_from_counts)

    def set_class_counts(self, counts: Sequence[int]) -> None:
        """Set ``alpha`` from the training split's per-class counts (foreground classes, in label order)."""
        alpha = alpha_from_counts(counts, self.m, self.gamma)
        self.alpha = alpha if self.alpha is None else alpha.to(self.alpha.device)

    def class_weights(self, num_columns: int) -> Tensor:
        """The weight of every logit column: ``[background_alpha, alpha...]`` or ``alpha``."""
        if self.alpha is None:
            raise RuntimeError(
                "ScaledDynamicFocalLoss has no class counts: call set_class_counts(counts) first. "
                "The counts come from the datamodule's training split (DatasetInfo.class_counts), "
                "which elinspect.models.build.build_loss passes at setup."
            )
        k = self.alpha.numel()
        if num_columns == k + 1:  # detector: column 0 is the background
            return torch.cat([self.alpha.new_tensor([self.background_alpha]), self.alpha])
        if num_columns == k:  # classifier: no background column
            return self.alpha
        raise ValueError(
            f"logits have {num_columns} columns but the loss has counts for {k} classes: "
            f"expected {k + 1} (detector, with background) or {k} (classifier)"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        weights = self.class_weights(logits.shape[1]).to(logits.device)
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        loss = weights[safe_target] * self.focal(logits, target)
        if self.reduction == "mean":
            return loss.sum() / valid.sum().clamp(min=1)
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A loss built from a config (no counts yet) adopts the weights stored in a checkpoint.
        key = prefix + "alpha"
        if self.alpha is None and key in state_dict:
            self.alpha = torch.empty_like(state_dict[key], device="cpu")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else [round(a, 4) for a in self.alpha.tolist()]
        return (
            f"m={self.m}, gamma={self.gamma}, background_alpha={self.background_alpha}, "
            f"reduction={self.reduction!r}, alpha={alpha}"
        )
