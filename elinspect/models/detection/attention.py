"""Cosine non-local attention (EBBA-Detector §3.B.2, BAF-Detector's multi-head variant; DESIGN §2).

A non-local block (Wang et al. 2018) whose pairwise similarity is the cosine of the two
positions' feature vectors instead of their dot product. The feature map ``x`` (N×C×H×W)
is flattened to HW×C; for every position ``i``::

    w_ij = softmax_j(cos(x_i, x_j) / τ)
    y_i  = x_i + Σ_j w_ij · x_j            (residual: the paper's ``F2 = F1 + Att(F1)``)

There are no projections (no θ/φ/g convs): the paper multiplies the softmax weights by
the (transposed) input feature map itself and adds the result to the input.

With ``q = k = normalize(x)`` (unit vectors, so ``q·k = cos``) and ``v = x`` this is
exactly ``F.scaled_dot_product_attention(q, k, v, scale=1/τ)``, which runs the fused
(flash / memory-efficient) kernels: memory grows as O(HW), and the HW×HW similarity
matrix of the paper's Fig 6 is never materialised. :func:`explicit_cosine_attention`
is that explicit HW×HW formulation, kept as the reference for tests and
``experiments/bench_attention.py``.

Multi-head (BAF-Detector, Su et al.): the C channels are split into ``heads`` groups of
C/heads channels; cosines, softmax and the weighted sum are computed per group.

Temperature (DESIGN §2): cosines lie in [−1, 1], so at τ = 1 a softmax over thousands of
positions is nearly uniform. ``temperature="fixed"`` is the paper (τ = 1);
``"learnable"`` learns ``log τ`` (initialised to 0, i.e. τ = 1 at the start).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elinspect.utils.errors import ConfigError

Temperature = Literal["fixed", "learnable"]
TEMPERATURES: tuple[str, ...] = ("fixed", "learnable")


def split_heads(x: Tensor, heads: int) -> Tensor:
    """N×C×H×W → N×heads×HW×(C/heads): one row per position, channels split into heads.

    The result is contiguous: SDPA's fused kernels need the last dimension to have stride 1
    (with a strided view it silently falls back to the math kernel and its HW×HW matrix).
    """
    n, c, h, w = x.shape
    if c % heads:
        raise ValueError(f"{c} channels cannot be split into {heads} heads")
    return x.reshape(n, heads, c // heads, h * w).transpose(-1, -2).contiguous()


def merge_heads(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`split_heads`: N×heads×HW×d → N×(heads·d)×H×W."""
    n, heads, _, d = x.shape
    return x.transpose(-1, -2).reshape(n, heads * d, height, width)


def explicit_cosine_attention(x: Tensor, heads: int = 1, tau: float | Tensor = 1.0) -> Tensor:
    """Reference formulation of :class:`CosineNonLocalAttention`: builds the HW×HW matrix.

    Returns ``x + Σ_j softmax_j(cos(x_i, x_j) / tau) x_j`` per head, i.e. the same as the
    module's ``forward``. Memory is O(HW²) per head and image: 76×76 positions (the
    paper's B3 at a 600×600 input) is a 5776×5776 matrix, 133 MB in float32.
    """
    _, _, h, w = x.shape
    v = split_heads(x, heads)
    unit = F.normalize(v, dim=-1)
    cosine = unit @ unit.transpose(-1, -2)  # N×heads×HW×HW
    if not (isinstance(tau, int | float) and tau == 1):
        cosine = cosine / tau
    weights = torch.softmax(cosine, dim=-1)
    return x + merge_heads(weights @ v, h, w)


class CosineNonLocalAttention(nn.Module):
    """``x + Att(x)`` with cosine-similarity non-local attention, computed by SDPA in O(HW) memory.

    Args:
        channels: C of the input; must be divisible by ``heads``.
        heads: number of channel groups with their own cosine attention (1 in EBBA's
            B-A module; BAF-Detector's module is multi-head).
        temperature: ``"fixed"`` (τ = 1, the papers) or ``"learnable"`` (a learnt
            ``log_temperature``, initialised to 0).
    """

    def __init__(self, channels: int, heads: int = 1, temperature: Temperature = "fixed") -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ConfigError(f"channels ({channels}) must be a positive multiple of heads ({heads})")
        if temperature not in TEMPERATURES:
            raise ConfigError(f"temperature must be one of {TEMPERATURES}, got {temperature!r}")
        self.channels = channels
        self.heads = heads
        self.temperature = temperature
        self.log_temperature = nn.Parameter(torch.zeros(())) if temperature == "learnable" else None

    @property
    def tau(self) -> Tensor | float:
        """The softmax temperature τ (a tensor when learnable)."""
        return 1.0 if self.log_temperature is None else self.log_temperature.exp()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        _, _, h, w = x.shape
        v = split_heads(x, self.heads)
        k = F.normalize(v, dim=-1)
        q = k
        if self.log_temperature is not None:
            # SDPA's ``scale`` must be a Python float; dividing q by τ keeps τ differentiable.
            q = k * torch.exp(-self.log_temperature).to(k.dtype)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return x + merge_heads(out, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, temperature={self.temperature!r}"
