"""A frozen backbone made cheaper to run, with the same outputs: batch norms folded into the
convolutions before them, and TensorFlow's "same" padding moved into the kernel.

For a network whose weights never change again (PaDiM's feature extractor, always in eval
mode), two things its forward spends time on can go. Measured on the truncated ImageNet
EfficientNet-Lite0 that SeMaCNN's PaDiM uses (224 px, batch 16, 2 CPU threads; ``torch.profiler``,
``experiments/results/bench_padim.md``): batch norm 28 % of the time, the "same" padding's
fill and copy 16 %.

* **Batch norm folding** (as inference engines do; ``torch.nn.utils.fusion``): an eval-mode
  ``y = γ (conv(x) − μ) / √(σ² + ε) + β`` is the convolution with weight ``W γ/√(σ² + ε)`` and
  bias ``β + (b − μ) γ/√(σ² + ε)``. A batch norm is folded into the convolution registered
  right before it in the same parent (``conv1, bn1``; timm's ``conv_dw, bn2``), the order in
  which torchvision's ResNets and timm's EfficientNets define and call them; what the batch
  norm did after normalising (timm's ``BatchNormAct2d``: dropout, activation) stays.
* **"Same" padding in the kernel**: TensorFlow pads a strided convolution by
  ``total = max((⌈n/s⌉ − 1)·s + k − n, 0)`` per axis (timm's ``get_same_padding``), ``⌊total/2⌋``
  before and the rest after (timm's ``Conv2dSame`` copies the input into a padded tensor for it). Where ``total`` is
  odd, the same outputs come from a kernel one tap longer whose first tap is zero, with
  ``⌈total/2⌉`` zeros on both sides — which the convolution itself pads, without a copy of
  its input.

:func:`fold_for_inference` does both and checks the result on a probe input against the
network before; where they differ (a network whose batch norm does not read the convolution
registered before it), it puts every module back and folds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from timm.layers import Conv2dSame, get_same_padding
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

log = logging.getLogger(__name__)


class FoldedPair(NamedTuple):
    """A convolution and the batch norm folded into it, by their paths in the folded network."""

    conv: str
    norm: str
    eps: float


class SamePaddingConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding, padded by the convolution itself.

    An axis with an odd total padding gets one more kernel tap, a zero in front, and
    ``⌈total/2⌉`` on both sides (module docstring); the result equals timm's ``Conv2dSame``.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight, padding = self.weight, []
        for axis, size in enumerate(x.shape[-2:]):
            total = get_same_padding(
                int(size), self.kernel_size[axis], self.stride[axis], self.dilation[axis]
            )
            padding.append((total + 1) // 2)
            if total % 2:  # one more zero after than before: a leading zero tap takes the extra one
                weight = F.pad(weight, (1, 0) if axis == 1 else (0, 0, 1, 0))
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SamePaddingConv2d:
        """The same convolution (its parameters shared, not copied) padded as :class:`SamePaddingConv2d`."""
        out = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        out.weight = conv.weight
        out.bias = conv.bias
        return out


def _after_normalising(norm: nn.BatchNorm2d) -> nn.Module:
    """What a batch norm does after it normalises: timm's ``BatchNormAct2d`` drops and
    activates (``drop``, ``act``); a plain one nothing."""
    parts = [
        getattr(norm, name) for name in ("drop", "act") if isinstance(getattr(norm, name, None), nn.Module)
    ]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _replace(
    root: nn.Module, path: str, module: nn.Module, undo: list[tuple[nn.Module, str, nn.Module]]
) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    undo.append((parent, name, getattr(parent, name)))
    setattr(parent, name, module)


def _fold(net: nn.Module, undo: list[tuple[nn.Module, str, nn.Module]]) -> list[FoldedPair]:
    pairs: list[FoldedPair] = []
    for parent_path, parent in list(net.named_modules()):
        before: tuple[str, nn.Module] | None = None
        for name, child in list(parent.named_children()):
            path = f"{parent_path}.{name}" if parent_path else name
            if (
                before is not None
                and isinstance(child, nn.BatchNorm2d)
                and child.track_running_stats
                and child.num_features == before[1].out_channels
            ):
                _replace(net, before[0], fuse_conv_bn_eval(before[1], child), undo)
                _replace(net, path, _after_normalising(child), undo)
                pairs.append(FoldedPair(before[0], path, float(child.eps)))
                before = None
            else:
                before = (path, child) if isinstance(child, nn.Conv2d) else None
    for path, module in list(net.named_modules()):
        if isinstance(module, Conv2dSame):
            _replace(net, path, SamePaddingConv2d.from_conv(module), undo)
    return pairs


@torch.no_grad()
def fold_for_inference(net: nn.Module, probe: Tensor) -> list[FoldedPair]:
    """Fold ``net``'s batch norms and "same" paddings in place (module docstring); ``net``
    must be in eval mode and is never trained again. Returns the folded pairs, or ``[]``
    (and ``net`` as it was) where the folded network's outputs on ``probe`` differ."""
    if net.training:
        raise ValueError("fold_for_inference folds a network in eval mode; call .eval() first")
    before = net(probe)
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    pairs = _fold(net, undo)
    after = net(probe)
    expected, got = _flat_outputs(before), _flat_outputs(after)
    if len(expected) == len(got) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-6)
        for a, b in zip(expected, got, strict=True)
    ):
        return pairs
    for parent, name, module in reversed(undo):
        setattr(parent, name, module)
    log.warning("batch norms not folded: the folded %s's outputs differ from its own", type(net).__name__)
    return []


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [t for value in values for t in _flat_outputs(value)]


def fold_state_dict(state: MutableMapping[str, Any], prefix: str, pairs: Sequence[FoldedPair]) -> int:
    """Fold the batch norms of a state dict saved before its network was folded (keys under
    ``prefix``) into their convolutions' weight and bias, in place; returns how many were."""
    folded = 0
    for pair in pairs:
        norm = f"{prefix}{pair.norm}."
        if norm + "running_var" not in state:
            continue
        conv = f"{prefix}{pair.conv}."
        weight, bias = fuse_conv_bn_weights(
            state[conv + "weight"],
            state.get(conv + "bias"),
            state.pop(norm + "running_mean"),
            state.pop(norm + "running_var"),
            pair.eps,
            state.pop(norm + "weight", None),
            state.pop(norm + "bias", None),
        )
        state.pop(norm + "num_batches_tracked", None)
        state[conv + "weight"], state[conv + "bias"] = weight.detach(), bias.detach()
        folded += 1
    return folded
