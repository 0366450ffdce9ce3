"""Neck registry: feature pyramids that turn backbone levels C2..C5 into detector inputs.

Neck contract (every registered neck follows it; ``tests/test_detection_parts.py`` checks
each entry of :data:`NECKS`):

- constructor ``Neck(in_channels_list: list[int], out_channels: int = 256, **kwargs)``;
  ``in_channels_list`` are the backbone's C2..C5 channels;
- attribute ``out_channels: int``;
- ``forward(features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]``: the input
  has keys ``"0"`` .. ``"3"`` (C2..C5, strides 4..32, finest first); the output has the
  same keys, in the same order, followed by ``"pool"``, an extra coarser level (stride 64,
  as torchvision's :class:`~torchvision.ops.feature_pyramid_network.LastLevelMaxPool`).
  Every output map has ``out_channels`` channels; level ``"i"`` keeps the spatial size of
  input ``"i"``.

The RPN uses every output level (one anchor size per level, so five by default), RoIAlign
the levels ``"0"`` .. ``"3"`` — exactly what torchvision's ``BackboneWithFPN`` provides.

To add a neck, decorate its class with ``@register_neck("name")`` in a module of this
package and import that module at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NECKS: dict[str, type[nn.Module]] = {}


def register_neck(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make the neck available to :func:`build_neck` (and configs) as ``name``."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in NECKS and NECKS[name] is not cls:
            raise ValueError(f"neck {name!r} is already registered by {NECKS[name].__qualname__}")
        NECKS[name] = cls
        return cls

    return decorator


def build_neck(name: str, in_channels_list: list[int], out_channels: int = 256, **kwargs) -> nn.Module:
    """Instantiate the neck registered as ``name``; extra ``kwargs`` go to its constructor."""
    if name not in NECKS:
        raise ValueError(f"unknown neck {name!r}; registered necks: {', '.join(sorted(NECKS))}")
    return NECKS[name](list(in_channels_list), out_channels, **kwargs)


# Built-in necks register themselves on import; add new neck modules here.
from elinspect.models.detection.necks import bafpn, ebfpn, fpn, pafpn  # noqa: E402, F401

__all__ = ["NECKS", "build_neck", "register_neck"]
