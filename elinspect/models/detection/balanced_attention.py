"""The Balanced-Attention (B-A) module of the EBBA-Detector (EBBA §3.B.2, DESIGN §2).

Gather → refine → scatter over the pyramid, like Libra R-CNN's balanced feature pyramid
(mmdetection's ``BFP``), with learnt level weights and cosine non-local attention::

    w = softmax(w2..w5)                                    learnable scalars
    F1 = conv3x3(Σ_i w_i · resize_to_B3(B_i))              B2 max-pooled, B4, B5 bilinear
    F2 = F1 + Att(F1)                                      cosine non-local attention
    H_i = w_i · resize_to_i(F2) + (1 − w_i) · B_i          back to every level

The neck (:mod:`~elinspect.models.detection.necks.ebfpn`) adds ``H6 = maxpool(H5, 1, 2)``.

Resizing is to exact target sizes, so odd feature-map sizes (e.g. 600×600 inputs: 150,
75, 38, 19) need no divisibility: a smaller target is reached by adaptive max pooling
(max pooling with stride 2 when the size halves exactly), a larger one by bilinear
interpolation (``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elinspect.models.detection.attention import CosineNonLocalAttention, Temperature
from elinspect.utils.errors import ConfigError


def max_pool_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Max-pool ``x`` to exactly ``size`` (= ``max_pool2d(x, 2)`` when the size halves exactly)."""
    size = tuple(int(s) for s in size)
    h, w = (int(s) for s in x.shape[-2:])
    if (h, w) == size:
        return x
    if h % size[0] == 0 and w % size[1] == 0:
        # the same windows as adaptive pooling, as a plain max-pool: ONNX export (the
        # TorchScript exporter cannot translate adaptive_max_pool2d of a traced size)
        kernel = (h // size[0], w // size[1])
        return F.max_pool2d(x, kernel_size=kernel, stride=kernel)
    return F.adaptive_max_pool2d(x, size)


def upsample_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear interpolation of ``x`` to exactly ``size``."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Max-pool to a target no larger than ``x`` in both dimensions, else bilinear-upsample."""
    h, w = x.shape[-2:]
    if size[0] <= h and size[1] <= w:
        return max_pool_to(x, size)
    return upsample_to(x, size)


class BalancedAttention(nn.Module):
    """EBBA's B-A module: maps B2..B5 to H2..H5 (same sizes and channels).

    Args:
        channels: channels of every pyramid level.
        num_levels: number of levels (4: B2..B5).
        refine_level: index of the level whose size the levels are fused at (1 = B3, the paper).
        heads: heads of the cosine non-local attention (1 in the paper).
        temperature: ``"fixed"`` (τ = 1, the paper) or ``"learnable"``; see
            :class:`~elinspect.models.detection.attention.CosineNonLocalAttention`.
    """

    def __init__(
        self,
        channels: int,
        num_levels: int = 4,
        refine_level: int = 1,
        heads: int = 1,
        temperature: Temperature = "fixed",
    ) -> None:
        super().__init__()
        if not 0 <= refine_level < num_levels:
            raise ConfigError(f"refine_level must be in [0, {num_levels}), got {refine_level}")
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.level_logits = nn.Parameter(torch.zeros(num_levels))  # softmax → w2..w5, 1/4 each at init
        self.refine = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.kaiming_uniform_(self.refine.weight, a=1)
        nn.init.zeros_(self.refine.bias)
        self.attention = CosineNonLocalAttention(channels, heads=heads, temperature=temperature)

    def level_weights(self) -> Tensor:
        """``w2..w5``: the softmax-normalised learnt level weights (they sum to 1)."""
        return torch.softmax(self.level_logits, dim=0)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(features)}")
        w = self.level_weights().to(features[0].dtype)
        size = features[self.refine_level].shape[-2:]
        gathered = sum(w[i] * resize_to(f, size) for i, f in enumerate(features))
        refined = self.attention(self.refine(gathered))  # F2 = F1 + Att(F1)
        # H_i = w_i·resize(F2) + (1 − w_i)·B_i, as one fused lerp per level (a third of the
        # elementwise passes over B2's 150×150×256 at a 600² input)
        return [torch.lerp(f, resize_to(refined, f.shape[-2:]), w[i]) for i, f in enumerate(features)]

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, refine_level={self.refine_level}"
