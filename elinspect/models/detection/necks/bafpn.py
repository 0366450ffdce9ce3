"""``bafpn``: BAF-Detector's Bidirectional Attention FPN (Su, Chen, Zhou; DESIGN §2 "BAFPN").

FPN top-down + PANet-style bottom-up path — the ``pafpn`` neck, reused as is — with
multi-head cosine non-local attention
(:class:`~elinspect.models.detection.attention.CosineNonLocalAttention`) refining the two
middle levels of the bottom-up path, N3 and N4 (outputs ``"1"`` and ``"2"``)::

    N2..N5, pool = PAFPN(C2..C5)
    N3' = N3 + Att(N3),  N4' = N4 + Att(N4)

Choices the sources leave open (documented, behind options):

- ``heads``: the notes say "multi-head" without a number; default 4 (64 channels per
  head at 256 channels).
- ``placement``: ``"output"`` (default) refines the bottom-up path's outputs, as the EBBA
  paper describes BAF ("applied attention mechanisms to refine the outputs of only the
  middle two layers"); ``"in_path"`` refines N3 / N4 *inside* the path, so the refined N3
  feeds N4 and the refined N4 feeds N5. In ``"in_path"`` mode the attention modules sit in
  ``paths.fuse`` (each fuse conv becomes ``Sequential(conv, attention)``).
- ``temperature``: ``"fixed"`` (τ = 1, the paper) or ``"learnable"``.
- ``relu``: PAFPN's conv activations (see :mod:`~elinspect.models.detection.necks.pafpn`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from elinspect.models.detection.attention import CosineNonLocalAttention, Temperature
from elinspect.models.detection.necks import register_neck
from elinspect.models.detection.necks.pafpn import PAFPN
from elinspect.utils.errors import ConfigError

PLACEMENTS = ("output", "in_path")


@register_neck("bafpn")
class BAFPN(nn.Module):
    """PAFPN whose middle bottom-up levels are refined by multi-head cosine non-local attention.

    Args:
        in_channels_list: channels of C2..C5.
        out_channels: channels of every output level (divisible by ``heads``).
        heads: attention heads (channel groups); 4 by default (the notes give no number).
        temperature: ``"fixed"`` (τ = 1) or ``"learnable"``.
        levels: output levels to refine (``(1, 2)`` = N3, N4).
        placement: ``"output"`` or ``"in_path"`` (see the module docstring).
        relu: ReLU after PAFPN's bottom-up convs.
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int = 256,
        heads: int = 4,
        temperature: Temperature = "fixed",
        levels: Sequence[int] = (1, 2),
        placement: Literal["output", "in_path"] = "output",
        relu: bool = True,
    ) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        n = len(in_channels_list)
        levels = tuple(int(level) for level in levels)
        lowest = 1 if placement == "in_path" else 0  # N2 = P2 has no bottom-up conv to attach to
        if any(not lowest <= level < n for level in levels):
            raise ConfigError(f"levels must lie in [{lowest}, {n}) for placement {placement!r}, got {levels}")
        self.out_channels = out_channels
        self.placement = placement
        self.levels = levels
        self.paths = PAFPN(in_channels_list, out_channels, relu=relu)
        attention = {
            str(level): CosineNonLocalAttention(out_channels, heads=heads, temperature=temperature)
            for level in levels
        }
        if placement == "in_path":
            for level, module in attention.items():  # PAFPN's fuse[i - 1] produces N(i + 2), key "i"
                i = int(level) - 1
                self.paths.fuse[i] = nn.Sequential(self.paths.fuse[i], module)
            self.attention = None
        else:
            self.attention = nn.ModuleDict(attention)

    def forward(self, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        out = self.paths(features)
        if self.attention is not None:
            for key, attention in self.attention.items():
                out[key] = attention(out[key])
        return out
