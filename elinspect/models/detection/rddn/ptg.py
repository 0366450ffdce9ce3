"""RDDN's pseudo template generator (PTG, ``rddn.txt`` §IV.B, Fig. 4c, eqs. 13–14).

Where no aligned template exists, one encoder–decoder ``G_i`` per backbone stage (C2..C5)
turns the stage's features into the features of a *pseudo template*, and the FPN is built on
the residual ``Ci(I) − Gi(Ci(I))`` (eq. 14). Each ``G_i`` is trained on a defect-free
(normal) sample ``N`` of the same iteration to reconstruct its features,
``Loss_g = Σ_i ||Ci(N) − Gi(Ci(N))||²`` (eq. 13, "MSE reconstruction loss"), jointly with the
detector, whose losses keep ``G`` from becoming the identity (which would zero the residual).

Generator (§IV.B): three convolutions then three transposed convolutions, hidden width 256,
stride 2 on the last two convolutions and the first two transposed convolutions, ReLU after
every layer but the last, output channels = input channels. The paper gives no kernel size;
the default 4 is read off Table VIII, whose PTG memory (367.60 M for parameters and their
gradients at 4 bytes, beside ResNet-50's 179.35 M = 23.5 M parameters × 8 bytes) means
about 48.2 M parameters — exactly four generators with 4×4 kernels for ResNet-50's
C2..C5 (256, 512, 1024, 2048 channels); 3×3 kernels would give 27.1 M.

Geometry: stride-2 layers use padding ``k // 2`` and each transposed convolution is given
its encoder twin's size (``output_size``), so ``G_i(C)`` has exactly ``C``'s size for every
input size, odd or even, down to 1×1 (stage C5 of small images). The stride-1 layers keep the
size: "same" padding (one extra row / column at the end for even kernels), and the last
transposed convolution is cropped to the input size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from elinspect.utils.errors import ConfigError


class StageGenerator(nn.Module):
    """One ``G_i``: conv(s1) → conv(s2) → conv(s2) → deconv(s2) → deconv(s2) → deconv(s1).

    Args:
        channels: the stage's channels (input = output).
        hidden_channels: width of every hidden layer (256 in the paper).
        kernel_size: of every layer (see the module docstring for the default 4).
    """

    def __init__(self, channels: int, hidden_channels: int = 256, kernel_size: int = 4) -> None:
        super().__init__()
        if kernel_size < 2:
            raise ConfigError(f"kernel_size must be >= 2, got {kernel_size}")
        k, h, pad = kernel_size, hidden_channels, kernel_size // 2
        before = (k - 1) // 2
        # "same" padding of a stride-1 conv: (left, right, top, bottom)
        self.same_pad = (before, k - 1 - before, before, k - 1 - before)
        self.conv1 = nn.Conv2d(channels, h, k, stride=1)
        self.conv2 = nn.Conv2d(h, h, k, stride=2, padding=pad)
        self.conv3 = nn.Conv2d(h, h, k, stride=2, padding=pad)
        self.deconv1 = nn.ConvTranspose2d(h, h, k, stride=2, padding=pad)
        self.deconv2 = nn.ConvTranspose2d(h, h, k, stride=2, padding=pad)
        self.deconv3 = nn.ConvTranspose2d(h, channels, k, stride=1, padding=before)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        e1 = F.relu(self.conv1(F.pad(x, self.same_pad)))
        e2 = F.relu(self.conv2(e1))
        e3 = F.relu(self.conv3(e2))
        d1 = F.relu(self.deconv1(e3, output_size=e2.shape[-2:]))
        d2 = F.relu(self.deconv2(d1, output_size=e1.shape[-2:]))
        return self.deconv3(d2)[..., : size[0], : size[1]]


class PseudoTemplateGenerator(nn.Module):
    """The generators ``G_2..G_5``, one per backbone level, keyed like the body's output.

    Args:
        in_channels_list: the body's C2..C5 channels.
        names: the body's output keys (``"0"`` .. ``"3"`` for a registry body).
        hidden_channels, kernel_size: of every :class:`StageGenerator`.
    """

    def __init__(
        self,
        in_channels_list: Sequence[int],
        names: Sequence[str] | None = None,
        hidden_channels: int = 256,
        kernel_size: int = 4,
    ) -> None:
        super().__init__()
        names = [str(i) for i in range(len(in_channels_list))] if names is None else list(names)
        if len(names) != len(in_channels_list):
            raise ConfigError(f"got {len(in_channels_list)} channel counts for {len(names)} level names")
        self.generators = nn.ModuleDict(
            {
                name: StageGenerator(c, hidden_channels, kernel_size)
                for name, c in zip(names, in_channels_list, strict=True)
            }
        )

    def _check(self, features: Mapping[str, Tensor]) -> None:
        if list(features) != list(self.generators):
            raise ConfigError(f"expected backbone levels {list(self.generators)}, got {list(features)}")

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The pseudo templates ``G_i(C_i)`` of every level."""
        self._check(features)
        return OrderedDict((k, self.generators[k](v)) for k, v in features.items())

    def residual(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """``C_i − G_i(C_i)``: the neck's input (RDDN eq. 14)."""
        self._check(features)
        return OrderedDict((k, v - self.generators[k](v)) for k, v in features.items())

    def reconstruction_loss(self, features: Mapping[str, Tensor]) -> Tensor:
        """``Σ_i mean((C_i − G_i(C_i))²)`` on a normal sample's features (RDDN eq. 13)."""
        self._check(features)
        losses = [F.mse_loss(self.generators[k](v), v) for k, v in features.items()]
        return sum(losses[1:], losses[0])
