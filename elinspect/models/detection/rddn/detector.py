"""The Reference-based Defect Detection Network (RDDN, ``rddn.txt`` §IV) on torchvision's Faster R-CNN.

:class:`RddnFasterRCNN` is a :class:`~torchvision.models.detection.generalized_rcnn.GeneralizedRCNN`
with the same parts as :func:`~elinspect.models.detection.builder.build_faster_rcnn`'s model
(``backbone`` = ResNet body + neck, torchvision's RPN, the ROI heads — standard or Cascade,
with or without the context reference) plus one *template reference* mode:

========  =====================================================  ==========================
template  what changes                                           extra input
========  =====================================================  ==========================
none      nothing (the paper's baseline, Table III)              —
pre       input ``(I − T) / (2·std)`` (TR-Pre, eq. 7)             aligned template ``T``
inter     FPN on ``Ci(I) − Ci(T)`` (TR-Inter, eq. 9)              aligned template ``T``
post      scores × ``1 − cos(F_I, F_T)`` at inference (TR-Post)   template at inference
ptg       FPN on ``Ci(I) − Gi(Ci(I))``, ``G`` trained on normal   normal sample ``N`` in
          samples (PTG, eqs. 13–14); ``loss_ptg`` added           training only
========  =====================================================  ==========================

PTG gradient flow (the paper says only "end-to-end joint-trainable"): the detection losses
train backbone, generators and the rest through the residual ``Ci(I) − Gi(Ci(I))``; the
reconstruction loss on the normal sample trains the generators only — with
``detach_normal=True`` (default) the normal sample's backbone pass runs without gradient,
so the backbone cannot lower ``Loss_g`` by shrinking or blurring its features (a collapse
the reconstruction loss alone would reward), and it costs no backward memory.
``detach_normal=False`` lets ``Loss_g`` reach the backbone too.

The transform is a :class:`~elinspect.models.detection.rddn.template_reference.ReferenceTransform`
(torchvision's, plus templates and RDDN's separate test size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from elinspect.models.detection.backbone_with_neck import BackboneWithNeck
from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.rddn.post import (
    POST_FEATURES,
    POST_STAGES,
    PostFeatures,
    PostStage,
    rescore_detections,
    rescore_proposals,
)
from elinspect.models.detection.rddn.ptg import PseudoTemplateGenerator
from elinspect.models.detection.rddn.template_reference import (
    ReferenceTransform,
    difference_features,
)
from elinspect.utils.errors import ConfigError

TemplateMode = Literal["none", "pre", "inter", "post", "ptg"]
TEMPLATE_MODES: tuple[str, ...] = ("none", "pre", "inter", "post", "ptg")
TEMPLATE_INPUT = {"none": "none", "pre": "difference", "inter": "pair", "post": "pair", "ptg": "none"}
PTG_KEYS = frozenset({"hidden_channels", "kernel_size", "loss_weight", "detach_normal"})
POST_KEYS = frozenset({"stage", "features"})


def extra_inputs_of(template: str) -> frozenset[str]:
    """What a batch must carry besides images and boxes: ``{"template"}``, ``{"normal"}`` or nothing."""
    if template not in TEMPLATE_MODES:
        raise ConfigError(f"template must be one of {TEMPLATE_MODES}, got {template!r}")
    if template in ("pre", "inter", "post"):
        return frozenset({"template"})
    if template == "ptg":
        return frozenset({"normal"})
    return frozenset()


class RddnFasterRCNN(GeneralizedRCNN):
    """Faster / Cascade R-CNN with RDDN's template reference (see the module docstring).

    ``forward(images, targets=None, templates=None, normals=None)``: the loss dict in training
    mode (torchvision's four terms, plus ``loss_ptg`` in PTG mode when ``normals`` are given),
    the detections in eval mode. ``templates`` (one ``3×H×W`` tensor in [0, 1] per image, the
    image's size) are required by ``pre`` and ``inter``, used by ``post`` at inference (without
    them ``post`` returns the plain detections, as the paper allows); ``normals`` (defect-free
    images) feed PTG's reconstruction loss in training and are never needed at inference.

    Args:
        backbone: a :class:`BackboneWithNeck` (``body`` → C2..C5, ``neck``).
        rpn, roi_heads: the detector's, e.g. from :func:`build_faster_rcnn`.
        transform: a :class:`ReferenceTransform` whose ``template_input`` fits ``template``.
        template: one of :data:`TEMPLATE_MODES`.
        generators: the PTG (``template="ptg"`` only).
        ptg_loss_weight: weight of ``loss_ptg`` in the total loss.
        detach_normal: run the normal sample's backbone pass without gradient (see above).
        post_stage, post_features: where TR-Post rescales and which region features it compares
            (:mod:`~elinspect.models.detection.rddn.post`).
    """

    def __init__(
        self,
        backbone: BackboneWithNeck,
        rpn: nn.Module,
        roi_heads: nn.Module,
        transform: ReferenceTransform,
        template: TemplateMode = "none",
        generators: PseudoTemplateGenerator | None = None,
        ptg_loss_weight: float = 1.0,
        detach_normal: bool = True,
        post_stage: PostStage = "proposals",
        post_features: PostFeatures = "box_head",
    ) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        if template not in TEMPLATE_MODES:
            raise ConfigError(f"template must be one of {TEMPLATE_MODES}, got {template!r}")
        if (
            not isinstance(transform, ReferenceTransform)
            or transform.template_input != TEMPLATE_INPUT[template]
        ):
            raise ConfigError(
                f"template={template!r} needs a ReferenceTransform with template_input="
                f"{TEMPLATE_INPUT[template]!r}, got {transform!r}"
            )
        if not (hasattr(backbone, "body") and hasattr(backbone, "neck")):
            raise ConfigError("RDDN needs a backbone with separate body and neck (BackboneWithNeck)")
        if (template == "ptg") != (generators is not None):
            raise ConfigError("generators are given exactly when template='ptg'")
        if post_stage not in POST_STAGES or post_features not in POST_FEATURES:
            raise ConfigError(
                f"post_stage must be one of {POST_STAGES} and post_features one of {POST_FEATURES}, "
                f"got {post_stage!r}, {post_features!r}"
            )
        self.template = template
        self.generators = generators
        self.ptg_loss_weight = float(ptg_loss_weight)
        self.detach_normal = bool(detach_normal)
        self.post_stage = post_stage
        self.post_features = post_features

    @classmethod
    def from_faster_rcnn(
        cls,
        model: FasterRCNN,
        template: TemplateMode = "none",
        test_min_size: int | None = None,
        ptg: Mapping[str, Any] | None = None,
        post: Mapping[str, Any] | None = None,
    ) -> RddnFasterRCNN:
        """RDDN from a built Faster R-CNN's parts (shared, not copied); new PTG generators if asked."""
        if template not in TEMPLATE_MODES:
            raise ConfigError(f"template must be one of {TEMPLATE_MODES}, got {template!r}")
        ptg = dict(ptg or {})
        post = dict(post or {})
        for name, options, allowed in (("ptg", ptg, PTG_KEYS), ("post", post, POST_KEYS)):
            unknown = sorted(set(options) - allowed)
            if unknown:
                raise ConfigError(f"unknown {name} options {unknown}; allowed: {sorted(allowed)}")
        generators = None
        if template == "ptg":
            body_channels = body_output_channels(model.backbone)
            generators = PseudoTemplateGenerator(
                list(body_channels.values()),
                names=list(body_channels),
                hidden_channels=int(ptg.get("hidden_channels", 256)),
                kernel_size=int(ptg.get("kernel_size", 4)),
            )
        transform = ReferenceTransform.from_transform(
            model.transform, template_input=TEMPLATE_INPUT[template], test_min_size=test_min_size
        )
        return cls(
            model.backbone,
            model.rpn,
            model.roi_heads,
            transform,
            template=template,
            generators=generators,
            ptg_loss_weight=float(ptg.get("loss_weight", 1.0)),
            detach_normal=bool(ptg.get("detach_normal", True)),
            post_stage=post.get("stage", "proposals"),
            post_features=post.get("features", "box_head"),
        )

    @property
    def extra_inputs(self) -> frozenset[str]:
        return extra_inputs_of(self.template)

    def residual_features(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """PTG (eq. 14): ``neck({i: Ci(I) − Gi(Ci(I))})``."""
        assert self.generators is not None
        return self.backbone.neck(self.generators.residual(self.backbone.body(images)))

    def ptg_loss(self, normals: Sequence[Tensor]) -> Tensor:
        """``Loss_g`` (eq. 13) on the normal samples, transformed like training images.

        The body's batch norms normalise the normal batch by its own statistics (as the
        detection pass does) but keep their running statistics: a normal-only batch must not
        pull them away from the defect images the detector is tested on.
        """
        assert self.generators is not None
        normal_list, _ = self.transform(list(normals))
        with kept_batch_norm_statistics(self.backbone.body), torch.set_grad_enabled(not self.detach_normal):
            stages = self.backbone.body(normal_list.tensors)
        return self.ptg_loss_weight * self.generators.reconstruction_loss(stages)

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
        templates: Sequence[Tensor] | None = None,
        normals: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        images = list(images)
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        targets = None if targets is None else [dict(t) for t in targets]
        needs_template = self.template in ("pre", "inter")
        if needs_template and templates is None:
            raise ValueError(f"template={self.template!r} needs one aligned template per image")
        use_templates = needs_template or (
            self.template == "post" and not self.training and templates is not None
        )
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]

        template_tensors = None
        if use_templates:
            image_list, targets, template_tensors = self.transform.with_templates(images, templates, targets)
        else:
            image_list, targets = self.transform(images, targets)

        template_features = None
        if self.template == "inter":
            features = difference_features(
                self.backbone.body, self.backbone.neck, image_list.tensors, template_tensors
            )
        elif self.template == "ptg":
            features = self.residual_features(image_list.tensors)
        elif template_tensors is not None:  # post, inference: one backbone pass for both
            n = image_list.tensors.shape[0]
            both = self.backbone(torch.cat([image_list.tensors, template_tensors]))
            features = OrderedDict((k, v[:n]) for k, v in both.items())
            template_features = OrderedDict((k, v[n:]) for k, v in both.items())
        else:
            features = self.backbone(image_list.tensors)

        proposals, proposal_losses = self.rpn(image_list, features, targets)
        if template_features is not None and self.post_stage == "proposals":
            detections = rescore_proposals(
                self.roi_heads,
                features,
                template_features,
                proposals,
                image_list.image_sizes,
                self.post_features,
            )
            detector_losses: dict[str, Tensor] = {}
        else:
            detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
            if template_features is not None:
                detections = rescore_detections(
                    self.roi_heads,
                    features,
                    template_features,
                    detections,
                    image_list.image_sizes,
                    self.post_features,
                )

        if not self.training:
            return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        losses = {**detector_losses, **proposal_losses}
        if self.template == "ptg" and normals is not None:
            losses["loss_ptg"] = self.ptg_loss(normals)
        return losses


@contextmanager
def kept_batch_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in whatever mode it is in while its batch norms update copies of their
    running statistics; the originals are put back afterwards, untouched (swapped, not copied
    into: autograd may hold the copies the forward used)."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    names = ("running_mean", "running_var", "num_batches_tracked")
    originals = [{name: getattr(m, name) for name in names} for m in norms]
    for m, buffers in zip(norms, originals, strict=True):
        for name, tensor in buffers.items():
            setattr(m, name, tensor.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, originals, strict=True):
            for name, tensor in buffers.items():
                setattr(m, name, tensor)


def body_output_channels(backbone: BackboneWithNeck) -> OrderedDict[str, int]:
    """The body's output keys and channels, from one tiny no-grad pass (no state change)."""
    body = backbone.body
    modes = {m: m.training for m in body.modules()}
    body.eval()
    try:
        with torch.no_grad():
            param = next(body.parameters())
            out = body(torch.zeros(1, 3, 64, 64, dtype=param.dtype, device=param.device))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return OrderedDict((k, int(v.shape[1])) for k, v in out.items())


def build_rddn(
    num_classes: int,
    backbone: Mapping[str, Any],
    neck: Mapping[str, Any],
    classification_loss: nn.Module | None = None,
    template: TemplateMode = "none",
    test_min_size: int | None = None,
    ptg: Mapping[str, Any] | None = None,
    post: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> RddnFasterRCNN:
    """Build RDDN: :func:`build_faster_rcnn` (backbone, neck, RPN, heads — ``head``, ``context``,
    ``cascade_iou`` included) turned into an :class:`RddnFasterRCNN`.

    Args:
        num_classes, backbone, neck, classification_loss: as :func:`build_faster_rcnn`.
        template: ``none | pre | inter | post | ptg`` (the module docstring).
        test_min_size: shorter side at inference (RDDN: 800; ``None``: the last ``min_size``).
        ptg: ``hidden_channels`` (256), ``kernel_size`` (4), ``loss_weight`` (1.0),
            ``detach_normal`` (true) of the pseudo template generator.
        post: ``stage`` (``detections`` | ``proposals``) and ``features`` (``box_head`` |
            ``roi_align``) of TR-Post.
        **kwargs: the remaining arguments of :func:`build_faster_rcnn`.

    The Faster R-CNN is built first, so with ``template="none"`` the detector has the same
    parameters, names and random initialisation as ``build_faster_rcnn``'s; the PTG
    generators are created afterwards.
    """
    base = build_faster_rcnn(num_classes, backbone, neck, classification_loss, **kwargs)
    return RddnFasterRCNN.from_faster_rcnn(
        base, template=template, test_min_size=test_min_size, ptg=ptg, post=post
    )
