"""RDDN's template reference at the image and the feature level: TR-Pre and TR-Inter (``rddn.txt`` §IV.A).

**TR-Pre** (§IV.A.1, eq. 7) replaces the mean of the usual normalisation ``(I − mean) / std``
by the image's aligned template ``T``:

    I' = (I − T) / (2 · std)

``std`` is the *same per-channel standard deviation as the standard pre-processing* — the
paper keeps "the var value as the same in the standard pre-processing" (the detector's
``image_std``: the backbone weights' own, ImageNet's for ResNets, 0.5 for EfficientNet-Lite),
not a statistic of the difference image or of the dataset; the factor 2 maps the doubled range of ``I − T`` ([−1, 1] instead of about [−0.5, 0.5]) back to
what the pretrained first layers expect. The difference *replaces* the normalised image.

**TR-Inter** (§IV.A.2, eq. 9) runs one shared backbone body on ``I`` and ``T`` and builds
the FPN on ``Ci(I) − Ci(T)`` (i = 2..5): :func:`difference_features`.

Both need the template resized exactly like its image. torchvision's
:class:`~torchvision.models.detection.transform.GeneralizedRCNNTransform` normalises, then
resizes each image to a random training scale, then pads the batch; :class:`ReferenceTransform`
stacks image and template along the channel axis before that, so both share one random
scale, one interpolation and one padding, and splits them afterwards. For TR-Pre the
difference is taken before the resize (bilinear resizing is linear, so resizing ``I − T``
equals subtracting the resized images).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from elinspect.utils.errors import ConfigError

TemplateInput = Literal["none", "difference", "pair"]
TEMPLATE_INPUTS: tuple[str, ...] = ("none", "difference", "pair")


def template_difference(image: Tensor, template: Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """TR-Pre (RDDN eq. 7): ``(image − template) / (2 · std)`` with a per-channel ``std``.

    Args:
        image, template: ``(C, H, W)`` float tensors in [0, 1] of the same shape.
        std: the ``C`` standard deviations of the standard normalisation (the detector's
            ``image_std``, the backbone weights' own by default).
    """
    if image.shape != template.shape:
        raise ValueError(
            f"template shape {tuple(template.shape)} differs from image shape {tuple(image.shape)}"
        )
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    return (image - template) / (2.0 * std[:, None, None])


def check_references(images: Sequence[Tensor], references: Sequence[Tensor], name: str = "template") -> None:
    """Raise ``ValueError`` unless every reference is a float tensor shaped like its image."""
    if len(references) != len(images):
        raise ConfigError(f"got {len(images)} images but {len(references)} {name}s: one {name} per image")
    for i, (image, ref) in enumerate(zip(images, references, strict=True)):
        if not torch.is_tensor(ref) or not ref.is_floating_point():
            kind = type(ref).__name__ if not torch.is_tensor(ref) else str(ref.dtype)
            raise ConfigError(f"{name} {i} must be a float tensor in [0, 1], got {kind}")
        if ref.shape != image.shape:
            raise ConfigError(
                f"{name} {i} has shape {tuple(ref.shape)} but its image has {tuple(image.shape)}: "
                f"a {name} must be aligned with (and as large as) its image"
            )


class ReferenceTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform that also carries each image's template.

    Args:
        template_input: ``"none"`` (a plain ``GeneralizedRCNNTransform``), ``"difference"``
            (TR-Pre: :meth:`with_templates` returns the resized ``(I − T) / (2·std)``) or
            ``"pair"`` (TR-Inter / TR-Post: the normalised, resized image *and* template,
            both with the same scale and padding).
        test_min_size: the shorter side at inference. torchvision uses the last of the
            training ``min_size`` values; RDDN trains at random short sides in [600, 1000]
            but tests at 800 (§III.C.1). ``None`` keeps torchvision's behaviour.
        The other arguments are :class:`GeneralizedRCNNTransform`'s.
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisible: int = 32,
        fixed_size: tuple[int, int] | None = None,
        template_input: TemplateInput = "none",
        test_min_size: int | None = None,
    ) -> None:
        if template_input not in TEMPLATE_INPUTS:
            raise ConfigError(f"template_input must be one of {TEMPLATE_INPUTS}, got {template_input!r}")
        super().__init__(
            tuple(min_size) if isinstance(min_size, Sequence) else min_size,
            max_size,
            list(image_mean),
            list(image_std),
            size_divisible=size_divisible,
            fixed_size=fixed_size,
        )
        self.template_input = template_input
        self.test_min_size = test_min_size

    @classmethod
    def from_transform(
        cls,
        transform: GeneralizedRCNNTransform,
        template_input: TemplateInput = "none",
        test_min_size: int | None = None,
    ) -> ReferenceTransform:
        """The same resize / normalisation settings as ``transform``, with templates."""
        return cls(
            transform.min_size,
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
            template_input=template_input,
            test_min_size=test_min_size,
        )

    @property
    def channels(self) -> int:
        return len(self.image_mean)

    def normalize(self, image: Tensor) -> Tensor:
        """Standard normalisation of a ``C``-channel image; TR-Pre or per-part normalisation of
        a ``2C``-channel image-and-template stack (see :meth:`with_templates`)."""
        c = self.channels
        if image.shape[0] != 2 * c or self.template_input == "none":
            return super().normalize(image)
        image_part, template_part = image[:c], image[c:]
        if self.template_input == "difference":
            return template_difference(image_part, template_part, self.image_std)
        return torch.cat([super().normalize(image_part), super().normalize(template_part)])

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        if self.training or self.test_min_size is None:
            return super().resize(image, target)
        train_sizes = self.min_size
        self.min_size = (self.test_min_size,)
        try:
            return super().resize(image, target)
        finally:
            self.min_size = train_sizes

    def with_templates(
        self,
        images: Sequence[Tensor],
        templates: Sequence[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None, Tensor | None]:
        """Transform images together with their templates.

        Returns:
            ``(images, targets, templates)``: for ``"difference"`` the images are the TR-Pre
            inputs and ``templates`` is ``None``; for ``"pair"`` ``templates`` is the batch of
            normalised templates, resized and padded exactly like the images.
        """
        if self.template_input == "none":
            raise ValueError("this transform takes no templates (template_input='none')")
        images = list(images)
        check_references(images, templates)
        if any(img.shape[0] != self.channels for img in images):
            raise ValueError(
                f"images must have {self.channels} channels (one per image_mean value), "
                f"got {[img.shape[0] for img in images]}"
            )
        stacked = [torch.cat([img, tpl.to(img.dtype)]) for img, tpl in zip(images, templates, strict=True)]
        image_list, targets = super().forward(stacked, targets)
        if self.template_input == "difference":
            return image_list, targets, None
        c = self.channels
        tensors = image_list.tensors
        return ImageList(tensors[:, :c], image_list.image_sizes), targets, tensors[:, c:]


def difference_features(
    body: nn.Module, neck: nn.Module, images: Tensor, templates: Tensor
) -> OrderedDict[str, Tensor]:
    """TR-Inter (RDDN eq. 9): ``neck({i: Ci(I) − Ci(T)})`` with one shared ``body``.

    Image and template go through the body as one batch, so that a BatchNorm body in
    training mode normalises both with the same statistics (separate batches would put a
    statistics gap into the difference).
    """
    if images.shape != templates.shape:
        raise ValueError(
            f"templates {tuple(templates.shape)} and images {tuple(images.shape)} differ in shape"
        )
    n = images.shape[0]
    stages = body(torch.cat([images, templates]))
    return neck(OrderedDict((k, v[:n] - v[n:]) for k, v in stages.items()))
