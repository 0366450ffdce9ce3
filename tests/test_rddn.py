"""RDDN (rddn.txt): template reference (Pre / Inter / Post), the pseudo template generator,
the module's references and errors, ``model=rddn`` and the paper's tables as experiments.

Tiny ResNet-18 detectors on synthetic 64-px tensors: a striped texture (the template), the
same texture with a bright rectangle (the defect image) and another texture (a normal sample).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from elinspect.data.info import DatasetInfo
from elinspect.models.build import build_model, constructor_arguments, effective_loss_config
from elinspect.models.detection import DetectionModule, build_faster_rcnn
from elinspect.models.detection.rddn import (
    TEMPLATE_MODES,
    MissingReferenceError,
    PseudoTemplateGenerator,
    RddnFasterRCNN,
    RddnModule,
    ReferenceTransform,
    StageGenerator,
    TemplatePostScorer,
    build_rddn,
    extra_inputs_of,
    template_difference,
    template_post_factor,
    warmup_multistep_lr,
)
from elinspect.models.detection.rddn.post import rescaled_logits, rescore_detections
from tests.conftest import CONFIG_DIR, FAST_DETECTOR_OVERRIDES

SIZE = 64
CLASSES = ["stain", "hole"]
DATASET = {"task": "detection", "class_names": CLASSES, "in_channels": 3, "class_counts": [2, 2]}
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
TINY = {
    "backbone": {"depth": 18, "weights": None, "norm_layer": "bn"},
    "neck": {"name": "fpn", "out_channels": 16},
    "anchor_sizes": [[16], [32], [64], [128], [256]],
    "min_size": SIZE,
    "max_size": SIZE,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 20,
    "box_score_thresh": 0.0,
}
TINY_PTG = {"hidden_channels": 16, "kernel_size": 4}


def texture(seed: int) -> torch.Tensor:
    """A 3×64×64 striped texture in [0, 1] (phase and period from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    period = 4 + int(torch.randint(0, 5, (1,), generator=g))
    x = torch.arange(SIZE, dtype=torch.float32)
    stripes = 0.4 + 0.2 * torch.sin(2 * math.pi * (x[None, :] + x[:, None] * 0.5) / period)
    return (stripes + 0.05 * torch.rand(SIZE, SIZE, generator=g)).expand(3, -1, -1).contiguous()


def samples(n: int = 2, with_template: bool = True, with_normal: bool = True):
    """``(images, targets)``: defect images with their templates and normal samples in the targets."""
    images, targets = [], []
    for i in range(n):
        template = texture(i)
        image = template.clone()
        x1, y1 = 8 + 12 * i, 10 + 6 * i
        image[:, y1 : y1 + 20, x1 : x1 + 24] = 0.95
        target = {
            "boxes": torch.tensor([[float(x1), float(y1), float(x1 + 24), float(y1 + 20)]]),
            "labels": torch.tensor([1 + i % 2]),
            "image_id": torch.tensor(i),
            "difficult": torch.zeros(1, dtype=torch.bool),
        }
        if with_template:
            target["template"] = template
        if with_normal:
            target["normal"] = texture(100 + i)
        images.append(image)
        targets.append(target)
    return images, targets


def tiny_rddn(template: str = "none", **kwargs) -> RddnFasterRCNN:
    return build_rddn(3, template=template, **{**TINY, "ptg": TINY_PTG, **kwargs})


def tiny_module(template: str = "none", head: str = "standard", context=None, **detector) -> RddnModule:
    return RddnModule(
        detector=functools.partial(build_rddn, ptg=TINY_PTG, **{**TINY, **detector}),
        dataset=DATASET,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        template=template,
        head=head,
        context=context,
    )


# --- TR-Pre and the paired transform ---------------------------------------------------------------


def test_tr_pre_divides_the_template_difference_by_twice_the_normalisation_std() -> None:
    """I' = (I − T) / (2·std) with the transform's own (ImageNet) std, replacing the normalised image."""
    image = torch.tensor([0.8, 0.6, 0.4])[:, None, None].expand(3, 32, 48).contiguous()
    template = torch.full((3, 32, 48), 0.3)
    expected = (torch.tensor([0.5, 0.3, 0.1]) / (2 * IMAGENET_STD))[:, None, None].expand(3, 32, 48)
    assert torch.allclose(template_difference(image, template, IMAGENET_STD), expected)

    transform = ReferenceTransform(
        32, 48, [0.485, 0.456, 0.406], IMAGENET_STD.tolist(), template_input="difference"
    )
    transform.eval()
    batch, _, templates = transform.with_templates([image], [template])
    assert templates is None and batch.image_sizes == [(32, 48)]
    assert torch.allclose(batch.tensors[0, :, :, :48], expected, atol=1e-6)  # then padded to 64
    # not the standard normalisation of the image
    assert not torch.allclose(batch.tensors[0], transform([image])[0].tensors[0], atol=1e-3)

    # a resized input: the resized difference of the random images
    g = torch.Generator().manual_seed(0)
    image, template = torch.rand(3, 40, 60, generator=g), torch.rand(3, 40, 60, generator=g)
    transform = ReferenceTransform(20, 100, [0.5] * 3, IMAGENET_STD.tolist(), template_input="difference")
    transform.eval()
    batch, _, _ = transform.with_templates(
        [image], [template], [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 30.0]])}]
    )
    difference = (image - template) / (2 * IMAGENET_STD[:, None, None])
    resized = F.interpolate(difference[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(batch.tensors[0, :, :20, :30], resized, atol=1e-5)


def test_templates_are_resized_and_padded_exactly_like_their_images() -> None:
    transform = ReferenceTransform(
        (40, 48, 56), 200, [0.485, 0.456, 0.406], IMAGENET_STD.tolist(), template_input="pair"
    )
    transform.train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 50, 70, generator=g)]
    templates = [torch.rand_like(img) for img in images]
    for seed in range(4):
        torch.manual_seed(seed)
        batch, _, template_batch = transform.with_templates(images, templates)
        torch.manual_seed(seed)  # the same random training scales for the templates alone
        alone, _ = transform(templates)
        assert template_batch.shape == batch.tensors.shape == alone.tensors.shape
        assert torch.allclose(template_batch, alone.tensors, atol=1e-6)
    with pytest.raises(ValueError, match="template 1 has shape"):
        transform.with_templates(images, [templates[0], templates[0]])


def test_the_test_size_differs_from_the_training_sizes() -> None:
    transform = ReferenceTransform((30, 40), 1000, [0.5] * 3, [0.25] * 3, test_min_size=20)
    image = torch.rand(3, 60, 90)
    transform.eval()
    assert transform([image])[0].image_sizes == [(20, 30)]
    transform.train()
    assert transform([image])[0].image_sizes[0][0] in (30, 40)
    assert transform.min_size == (30, 40)


# --- TR-Inter -------------------------------------------------------------------------------------


def test_tr_inter_builds_the_neck_on_the_stage_difference() -> None:
    """A spy on body and neck: the neck's input is Ci(I) − Ci(T) of one shared body pass."""
    torch.manual_seed(0)
    model = tiny_rddn("inter").eval()
    body_calls, neck_inputs = [], []
    model.backbone.body.register_forward_hook(lambda m, args, out: body_calls.append((args[0], out)))
    model.backbone.neck.register_forward_pre_hook(lambda m, args: neck_inputs.append(args[0]))
    images, targets = samples()
    templates = [t["template"] for t in targets]
    with torch.no_grad():
        model(images, templates=templates)
        expected_templates, _ = model.transform(templates)
    assert len(body_calls) == 1 and len(neck_inputs) == 1
    body_input, stages = body_calls[0]
    n = len(images)
    assert body_input.shape[0] == 2 * n
    assert torch.allclose(body_input[n:], expected_templates.tensors, atol=1e-6)  # the templates, transformed
    assert list(neck_inputs[0]) == list(stages)
    for key, value in neck_inputs[0].items():
        assert torch.equal(value, stages[key][:n] - stages[key][n:]), key
        assert not torch.allclose(value, stages[key][:n])  # the template really was subtracted
    with pytest.raises(ValueError, match="needs one aligned template"):
        model(images)


# --- TR-Post --------------------------------------------------------------------------------------


class ConstantHeads(nn.Module):
    """Heads whose region feature is the flattened RoIAlign output."""

    def __init__(self) -> None:
        super().__init__()
        self.box_roi_pool = MultiScaleRoIAlign(["0"], output_size=2, sampling_ratio=2)
        self.box_head = nn.Flatten()


def test_tr_post_multiplies_scores_by_one_minus_the_cosine_of_the_region_features() -> None:
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0])
    assert template_post_factor(a[None], a[None]).item() == pytest.approx(0.0, abs=1e-6)
    assert template_post_factor(a[None], torch.tensor([[0.0, 2.0, 0.0]])).item() == pytest.approx(1.0)
    assert template_post_factor(a[None], b[None]).item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert template_post_factor(a[None], -a[None]).item() == pytest.approx(1.0)  # cosine clipped at 0

    # constant feature maps: every box pools exactly a (image) and b (template)
    maps = {
        name: {"0": v[None, :, None, None].expand(1, 3, 16, 16)}
        for name, v in (("image", a), ("template", b))
    }
    detections = [
        {
            "boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0], [4.0, 4.0, 12.0, 14.0]]),
            "scores": torch.tensor([0.9, 0.5]),
            "labels": torch.tensor([1, 2]),
        }
    ]
    out = rescore_detections(ConstantHeads(), maps["image"], maps["template"], detections, [(16, 16)])
    factor = 1 - 1 / math.sqrt(2)
    assert torch.allclose(out[0]["scores"], torch.tensor([0.9, 0.5]) * factor, atol=1e-6)
    assert torch.equal(out[0]["labels"], torch.tensor([1, 2]))
    same = rescore_detections(ConstantHeads(), maps["image"], maps["image"], detections, [(16, 16)])
    assert same[0]["scores"].abs().max() < 1e-6


def test_rescaled_logits_scale_the_foreground_probabilities() -> None:
    logits = torch.tensor([[0.2, 1.0, -0.5], [2.0, 0.0, 0.3]])
    factor = torch.tensor([0.5, 0.0])
    probs = F.softmax(logits, dim=1)
    rescaled = F.softmax(rescaled_logits(logits, factor), dim=1)
    assert torch.allclose(rescaled[:, 1:], probs[:, 1:] * factor[:, None], atol=1e-6)
    assert torch.allclose(rescaled.sum(1), torch.ones(2), atol=1e-6)


def test_tr_post_rescores_any_trained_detector_and_an_identical_template_scores_zero() -> None:
    torch.manual_seed(0)
    detector = build_faster_rcnn(3, **TINY).eval()  # a model=faster_rcnn detector: no template at training
    images, targets = samples()
    templates = [t["template"] for t in targets]
    after_nms = TemplatePostScorer(detector, stage="detections")
    with torch.no_grad():
        plain = detector(images)
        assert all(
            torch.equal(a["scores"], b["scores"]) for a, b in zip(after_nms(images), plain, strict=True)
        )
        same = after_nms(images, images)
        rescored = after_nms(images, templates)
        before_nms_same = TemplatePostScorer(detector)(images, images)  # the default: before NMS
        before_nms = TemplatePostScorer(detector)(images, templates)
    assert sum(len(d["boxes"]) for d in plain) > 0
    for p, s, r in zip(plain, same, rescored, strict=True):
        assert len(s["scores"]) == len(p["scores"]) and s["scores"].abs().max() < 1e-4
        assert (r["scores"] <= p["scores"].max() + 1e-6).all() and r["scores"].max() > 1e-3
        assert torch.all(r["scores"][:-1] >= r["scores"][1:])  # re-sorted
    assert all(len(d["scores"]) == 0 or d["scores"].max() < 1e-4 for d in before_nms_same)
    assert sum(len(d["boxes"]) for d in before_nms) > 0

    # the same through model.template=post (before NMS by default), with the plain detector's weights
    torch.manual_seed(0)
    post = tiny_rddn("post").eval()
    assert post.post_stage == "proposals"
    post.load_state_dict(detector.state_dict())
    with torch.no_grad():
        assert all(len(d["scores"]) == 0 or d["scores"].max() < 1e-4 for d in post(images, templates=images))
        ours = post(images, templates=templates)
    for a, b in zip(ours, before_nms, strict=True):
        assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_tr_post_before_nms_works_with_the_cascade_head() -> None:
    """Fig. 5 with a Cascade R-CNN: the stage-averaged probabilities of the last stage's boxes,
    rescaled by the template factor of the last stage's region features, then NMS."""
    from elinspect.models.detection.rddn.post import region_features, template_post_factor

    torch.manual_seed(0)
    detector = build_faster_rcnn(3, head="cascade", **{**TINY, "box_score_thresh": 0.0}).eval()
    images, targets = samples()
    templates = [t["template"] for t in targets]
    with torch.no_grad():
        same = TemplatePostScorer(detector)(images, images)
        rescored = TemplatePostScorer(detector)(images, templates)
        # recomputed by hand: the factor of every last-stage box, applied before postprocessing
        image_list, _ = detector.transform(images)
        template_list, _ = detector.transform(templates)
        feats, tfeats = detector.backbone(image_list.tensors), detector.backbone(template_list.tensors)
        proposals, _ = detector.rpn(image_list, feats)
        heads = detector.roi_heads
        logits, regression, boxes = heads.scores(feats, proposals, image_list.image_sizes)
        factor = template_post_factor(
            region_features(heads, feats, boxes, image_list.image_sizes),
            region_features(heads, tfeats, boxes, image_list.image_sizes),
        )
        expected = heads.stages[-1].postprocess_detections(
            rescaled_logits(logits, factor), regression, boxes, image_list.image_sizes
        )[1]
    assert all(len(d["scores"]) == 0 or d["scores"].max() < 1e-4 for d in same)
    assert sum(len(d["scores"]) for d in rescored) > 0
    for got, want in zip(rescored, expected, strict=True):
        torch.testing.assert_close(got["scores"], want)


# --- PTG ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_ptg_generators_give_back_the_feature_size(kernel_size: int) -> None:
    generator = StageGenerator(8, hidden_channels=4, kernel_size=kernel_size)
    for h, w in [(1, 1), (2, 3), (5, 8), (13, 21), (25, 42)]:
        assert generator(torch.rand(1, 8, h, w)).shape == (1, 8, h, w)
    convs = [m for m in generator.modules() if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 2] and [d.stride[0] for d in deconvs] == [2, 2, 1]


def test_ptg_size_matches_table_viii() -> None:
    """Four 4×4 generators for ResNet-50's C2..C5: 48.2 M parameters, Table VIII's 367.6 M (× 8 bytes)."""
    with torch.device("meta"):
        ptg = PseudoTemplateGenerator([256, 512, 1024, 2048], hidden_channels=256, kernel_size=4)
    params = sum(p.numel() for p in ptg.parameters())
    assert params * 8 / 2**20 == pytest.approx(367.60, rel=0.005)


@pytest.mark.slow  # ~3 CPU-s with one thread, but 50 s under thread contention
def test_ptg_learns_the_normal_features_without_becoming_the_identity() -> None:
    """Joint training (detection + reconstruction losses) with the body frozen, so that the
    normal features stay put and a few steps show the generators learning them."""
    torch.manual_seed(0)
    model = tiny_rddn("ptg", backbone={**TINY["backbone"], "frozen_stages": 5})
    model.train()
    images, targets = samples(1)
    normals = [t["normal"] for t in targets]
    plain_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ptg_losses = []
    for _ in range(16):
        losses = model(images, plain_targets, normals=normals)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        ptg_losses.append(losses["loss_ptg"].item())
    assert ptg_losses[-1] < 0.7 * ptg_losses[0], ptg_losses

    model.eval()
    stages, neck_inputs = [], []
    model.backbone.body.register_forward_hook(lambda m, args, out: stages.append(out))
    model.backbone.neck.register_forward_pre_hook(lambda m, args: neck_inputs.append(args[0]))
    with torch.no_grad():
        model(images)  # no normal sample at inference
        for key, c in stages[0].items():
            pseudo = model.generators.generators[key](c)
            assert torch.allclose(neck_inputs[0][key], c - pseudo, atol=1e-6)  # FPN on C − G(C)
            assert (c - pseudo).norm() > 0.05 * c.norm(), key  # G is not the identity


@pytest.mark.parametrize("detach_normal", [True, False])
def test_ptg_reconstruction_loss_reaches_the_backbone_only_when_not_detached(detach_normal: bool) -> None:
    torch.manual_seed(0)
    model = tiny_rddn("ptg", ptg={**TINY_PTG, "detach_normal": detach_normal}).train()
    loss = model.ptg_loss([texture(7)])
    loss.backward()
    body_grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generators.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in body_grads) is not detach_normal


@pytest.mark.parametrize("detach_normal", [True, False])
def test_ptg_targets_leave_the_bodys_batch_norm_statistics_alone(detach_normal: bool) -> None:
    """Loss_g's normal-only batch is normalised by its own statistics in training mode, but the
    running statistics (what the detector is evaluated with) are not updated by it."""
    torch.manual_seed(0)
    model = tiny_rddn("ptg", ptg={**TINY_PTG, "detach_normal": detach_normal}).train()
    norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    model.ptg_loss([texture(7), texture(8)]).backward()
    for m, (mean, var, count) in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == count
    images, targets = samples()
    model(images, targets)  # the detection pass itself still updates them
    assert not torch.equal(norms[0].running_mean, before[0][0])


# --- the module: every mode trains and evaluates; references and errors ----------------------------

GRID = [
    ("none", "standard", None),
    ("pre", "standard", None),
    ("inter", "standard", None),
    ("post", "standard", None),
    ("ptg", "standard", None),
    ("none", "cascade", {"enabled": True, "k": 1.5, "mode": "concat"}),
    ("pre", "cascade", None),
    ("inter", "standard", {"enabled": True, "k": 1.3, "mode": "context_only"}),
    ("post", "cascade", {"enabled": True, "k": 1.5, "mode": "global"}),
    ("ptg", "cascade", {"enabled": True, "k": 1.5, "mode": "concat"}),
]


@pytest.mark.parametrize(("template", "head", "context"), GRID)
def test_every_mode_head_and_context_trains_and_detects(
    template: str, head: str, context, monkeypatch
) -> None:
    torch.manual_seed(0)
    module = tiny_module(template, head, context)
    assert module.extra_inputs == set(extra_inputs_of(template))
    assert (type(module.model.roi_heads).__name__ == "CascadeRoIHeads") == (head == "cascade")
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.update(values))
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: value}))
    module.train()
    loss = module.training_step(samples(), 0)
    assert math.isfinite(loss.item()) and loss.requires_grad
    loss.backward()
    assert ("train/loss_ptg" in logged) == (template == "ptg")
    module.eval()
    with torch.no_grad():
        preds = module.validation_step(samples(), 0)
    assert len(preds) == 2 and all(torch.isfinite(p["scores"]).all() for p in preds)
    assert module.val_metrics.updated


@pytest.mark.parametrize("template", ["none", "pre"])
def test_validation_losses_are_logged_as_epoch_means_over_every_rank(template: str, monkeypatch) -> None:
    """With ``val_loss`` the validation batches log ``val/loss`` (the sum) and each part, all
    reduced over the ranks (``sync_dist``), as the plain detector logs them."""
    torch.manual_seed(0)
    module = tiny_module(template)
    module.val_loss = True
    logged: dict[str, tuple[torch.Tensor, dict]] = {}
    monkeypatch.setattr(
        module, "log_dict", lambda values, **kw: logged.update({k: (v, kw) for k, v in values.items()})
    )
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: (value, kw)}))
    module.eval()
    with torch.no_grad():
        module.validation_step(samples(), 0)
    parts = {k: v for k, (v, _) in logged.items() if k.startswith("val/loss_")}
    assert {"val/loss_classifier", "val/loss_box_reg", "val/loss_objectness", "val/loss_rpn_box_reg"} <= set(
        parts
    )
    assert float(logged["val/loss"][0]) == pytest.approx(float(sum(parts.values())))
    for name, (_, kw) in logged.items():
        assert kw.get("sync_dist") is True and kw.get("on_epoch") is True, name


def test_extra_inputs_of_every_mode() -> None:
    expected = {
        "none": set(),
        "pre": {"template"},
        "inter": {"template"},
        "post": {"template"},
        "ptg": {"normal"},
    }
    assert {m: set(extra_inputs_of(m)) for m in TEMPLATE_MODES} == expected
    with pytest.raises(ValueError, match="template must be one of"):
        extra_inputs_of("mean")


def test_a_batch_without_the_needed_reference_is_refused_clearly() -> None:
    torch.manual_seed(0)
    module = tiny_module("pre").train()
    with pytest.raises(
        MissingReferenceError, match=r"model.template=pre needs target\['template'\].*data=fabric"
    ):
        module.training_step(samples(with_template=False), 0)
    ptg = tiny_module("ptg").train()
    with pytest.raises(
        MissingReferenceError, match=r"model.template=ptg needs target\['normal'\] for every train"
    ):
        ptg.training_step(samples(with_normal=False), 0)
    ptg.eval()
    with torch.no_grad():  # no normal sample needed outside training
        ptg.validation_step(samples(with_normal=False, with_template=False), 0)


def test_post_needs_templates_to_evaluate_but_not_to_train() -> None:
    torch.manual_seed(0)
    module = tiny_module("post").train()
    module.training_step(samples(with_template=False, with_normal=False), 0)
    module.eval()
    with torch.no_grad(), pytest.raises(MissingReferenceError, match="for every val image"):
        module.validation_step(samples(with_template=False), 0)
    with torch.no_grad():  # predicting without templates: the plain detections (the paper's fallback)
        assert len(module.predict_step(samples(with_template=False), 0)) == 2


def test_without_template_rddn_is_the_faster_rcnn_it_builds_on() -> None:
    """Same parameters, names and initial values: a DetectionModule checkpoint loads into RddnModule."""
    torch.manual_seed(0)
    plain = DetectionModule(
        detector=functools.partial(build_faster_rcnn, **TINY),
        dataset=DATASET,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
    )
    torch.manual_seed(0)
    rddn = tiny_module("post")
    a, b = plain.state_dict(), rddn.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warmup_then_step_decay_at_epoch_milestones() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = warmup_multistep_lr(
        optimizer, [2, 4], gamma=0.1, warmup_iters=4, warmup_factor=0.2, steps_per_epoch=3
    )
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up from 0.2 x lr over 4 steps, x0.1 at epochs 2 and 4 = steps 6 and 12
    expected = [0.002, 0.004, 0.006, 0.008] + [0.01] * 2 + [0.001] * 6 + [0.0001] * 2
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        warmup_multistep_lr(optimizer, [16, 22])

    module = tiny_module()
    module.scheduler_factory = functools.partial(warmup_multistep_lr, milestones=[16, 22], warmup_iters=500)
    module._trainer = SimpleNamespace(train_dataloader=[], num_training_batches=7, accumulate_grad_batches=2)
    config = module.configure_optimizers()
    decay = config["lr_scheduler"]["scheduler"]._schedulers[1]
    assert sorted(decay.milestones) == [64, 88]  # 4 steps per epoch
    assert config["lr_scheduler"]["interval"] == "step"


# --- configs --------------------------------------------------------------------------------------


def test_model_rddn_composes_with_the_paper_settings_and_trains(make_cfg) -> None:
    paper = make_cfg("train.yaml", ["model=rddn"]).model
    det = paper.detector
    assert (paper.template, paper.head, list(paper.cascade_iou), paper.context.k) == (
        "none",
        "standard",
        [0.4, 0.5, 0.6],
        1.5,
    )
    assert (min(det.min_size), max(det.min_size), det.max_size, det.test_min_size) == (600, 1000, 1600, 800)
    assert (
        det.rpn_fg_iou_thresh,
        det.rpn_bg_iou_thresh,
        det.rpn_pre_nms_top_n_train,
        det.rpn_post_nms_top_n_train,
    ) == (
        0.7,
        0.1,
        20000,
        2000,
    )
    assert (
        det.box_batch_size_per_image,
        det.box_positive_fraction,
        det.box_nms_thresh,
        det.box_score_thresh,
    ) == (
        512,
        0.25,
        0.5,
        0.01,
    )
    assert det.box_detections_per_img == 100 and paper.optimizer.lr == 0.01
    assert (list(paper.scheduler.milestones), paper.scheduler.warmup_iters, paper.scheduler_interval) == (
        [16, 22],
        500,
        "step",
    )

    cfg = make_cfg(
        "train.yaml",
        [
            "model=rddn",
            "model.template=inter",
            "model.head=cascade",
            "model.context.enabled=true",
            "model.detector.neck.out_channels=16",
            "model.detector.test_min_size=64",
            *FAST_DETECTOR_OVERRIDES,
        ],
    )
    torch.manual_seed(0)
    module = build_model(cfg.model, effective_loss_config(cfg), DatasetInfo.from_dict(DATASET))
    assert isinstance(module, RddnModule) and module.extra_inputs == {"template"}
    assert type(module.model.roi_heads).__name__ == "CascadeRoIHeads"
    assert all(type(s.box_roi_pool).__name__ == "ContextRoIPool" for s in module.model.roi_heads.stages)
    module.train()
    assert math.isfinite(module.training_step(samples(), 0).item())


def test_rddn_experiments_sweep_the_rows_of_their_tables(make_cfg) -> None:
    for name in (
        "rddn_table3",
        "rddn_table4",
        "rddn_table5",
        "rddn_table6",
        "rddn_table7",
        "rddn_references",
    ):
        spec = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
        swept = spec.hydra.sweeper.params["rddn.row"].split(",")
        assert swept == list(spec.rddn.rows) and spec.rddn.row in swept, name
    if not (CONFIG_DIR / "data" / "fabric.yaml").is_file():
        pytest.skip("conf/data/fabric.yaml is not there yet")
    shifted = make_cfg("train.yaml", ["experiment=rddn_table4", "rddn.row=inter_shift"])
    assert (shifted.model.template, list(shifted.data.template_shift)) == ("inter", [5, 10])
    full = make_cfg("train.yaml", ["experiment=rddn_table7", "rddn.row=faster_r50_dcn_ptg"])
    model = OmegaConf.to_container(constructor_arguments(full.model), resolve=True)
    assert (model["template"], model["head"], model["context"]["enabled"]) == ("ptg", "standard", True)
    assert model["detector"]["backbone"]["deformable_stages"] == [3, 4, 5]
    assert full.trainer.max_epochs == 24 and full.data.batch_size == 8
    for row, template, context in (("ptg", "ptg", False), ("context", "none", True), ("post", "post", False)):
        cfg = make_cfg("train.yaml", ["experiment=rddn_references", f"rddn.row={row}"])
        assert (cfg.model.template, cfg.model.context.enabled) == (template, context), row


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown ptg options"):
        tiny_rddn("ptg", ptg={"hidden": 3})
    with pytest.raises(ValueError, match="template must be one of"):
        tiny_module("median")
    inter = tiny_rddn("inter").eval()
    images, targets = samples(1)
    with pytest.raises(ValueError, match="template='inter' does not take"):
        TemplatePostScorer(inter)(images, [t["template"] for t in targets])
    with pytest.raises(ValueError, match="generators are given exactly"):
        model = tiny_rddn("none")
        RddnFasterRCNN(
            model.backbone,
            model.rpn,
            model.roi_heads,
            model.transform,
            template="none",
            generators=PseudoTemplateGenerator([64, 128, 256, 512], hidden_channels=4),
        )


def test_sdfl_weighs_the_classes_by_the_boxes_left_after_a_template_skip(
    make_cfg, tianchi_data_factory, tmp_path
) -> None:
    """A training image without its aligned template is skipped (``on_error=skip``) when the
    model asks for templates; SDFL's class weights (and the checkpoint's class counts) must
    count the boxes the model trains on, not those of the skipped image too."""
    import shutil

    from elinspect.build import build_datamodule_and_model
    from elinspect.data.detection import NO_TEMPLATE
    from elinspect.losses.sdfl import alpha_from_counts

    root = shutil.copytree(tianchi_data_factory("fabric"), tmp_path / "Fabric")
    overrides = ["model=rddn", "model.template=pre", "loss=sdfl", "data=fabric", f"data.root='{root}'"]
    overrides += ["data.image_size=64", "data.num_workers=0", "data.test_size=4", "data.on_error=skip"]
    cfg = make_cfg("train.yaml", [*overrides, *FAST_DETECTOR_OVERRIDES])
    before, _ = build_datamodule_and_model(cfg)
    boxed = max(before.records["train"], key=lambda r: r.num_boxes)
    boxed.template_path.unlink()

    datamodule, module = build_datamodule_and_model(cfg)
    assert datamodule.tally.counts[NO_TEMPLATE] == 1
    kept = datamodule.box_counts("train")
    assert sum(kept) == sum(before.box_counts("train")) - boxed.num_boxes
    loss = module.model.roi_heads.classification_loss
    torch.testing.assert_close(loss.alpha, alpha_from_counts(kept, loss.m, loss.gamma))
    assert tuple(module.hparams["dataset"]["class_counts"]) == tuple(kept)
