"""The torch parts of the detection core: ResNet bodies, necks, ROI heads, builder, focal loss.

Everything runs on CPU with random weights, tiny images and few proposals.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import DeformConv2d

from elinspect.losses import FocalLoss
from elinspect.models.backbones.resnet import DeformableConv2d, build_resnet_body
from elinspect.models.detection.backbone_with_neck import BackboneWithNeck
from elinspect.models.detection.builder import build_faster_rcnn, make_anchor_generator
from elinspect.models.detection.necks import NECKS, build_neck, register_neck
from elinspect.models.detection.roi_heads import LOSS_KEYS, LossRoIHeads, detection_losses

R18_CHANNELS = [64, 128, 256, 512]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models run faster on one thread; on busy shared cores, two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = {
    "min_size": 128,
    "max_size": 128,
    "anchor_sizes": ((16,), (32,), (64,), (128,), (256,)),
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
}


def small_model(
    neck: str = "fpn", norm_layer: str = "frozen_bn", **kwargs
) -> torchvision.models.detection.FasterRCNN:
    options = {**SMALL, **kwargs}
    return build_faster_rcnn(
        3, {"depth": 18, "norm_layer": norm_layer}, {"name": neck, "out_channels": 32}, **options
    )


def batch(n: int = 1) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(123)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(n)]
    targets = [
        {
            "boxes": torch.tensor([[20.0, 30.0, 60.0, 80.0], [70.0, 70.0, 110.0, 100.0]]),
            "labels": torch.tensor([1, 2]),
        }
        for _ in range(n)
    ]
    return images, targets


def c2_c5(sizes: tuple[int, ...], channels: list[int] = R18_CHANNELS) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        (str(i), torch.randn(2, c, s, s + 1)) for i, (c, s) in enumerate(zip(channels, sizes, strict=True))
    )


# ----------------------------------------------------------------------------- necks


@pytest.mark.parametrize("name", sorted(NECKS))
@pytest.mark.parametrize("sizes", [(32, 16, 8, 4), (25, 13, 7, 4)], ids=["even", "odd"])
def test_every_neck_follows_the_contract(name: str, sizes: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    neck = build_neck(name, R18_CHANNELS, out_channels=24)
    features = c2_c5(sizes)
    out = neck(features)
    assert neck.out_channels == 24
    assert isinstance(out, OrderedDict)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for key, fmap in out.items():
        assert fmap.shape[:2] == (2, 24), key
        assert torch.isfinite(fmap).all(), key
    for key in ["0", "1", "2", "3"]:
        assert out[key].shape[-2:] == features[key].shape[-2:], key
    areas = [fmap.shape[-2] * fmap.shape[-1] for fmap in out.values()]
    assert all(a > b for a, b in zip(areas, areas[1:], strict=False)), areas


def test_build_neck_unknown_name_lists_registered_necks() -> None:
    with pytest.raises(ValueError, match="unknown neck 'nope'.*fpn.*pafpn"):
        build_neck("nope", R18_CHANNELS)


def test_register_neck_refuses_a_second_class_under_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_neck("fpn")(type("OtherFPN", (nn.Module,), {}))
    assert NECKS["fpn"].__name__ == "FPN"


def test_pafpn_bottom_up_path_carries_fine_levels_to_coarse_ones() -> None:
    torch.manual_seed(0)
    neck = build_neck("pafpn", R18_CHANNELS, out_channels=16)
    features = c2_c5((32, 16, 8, 4))
    out = neck(features)
    top_down = neck.fpn(features)
    torch.testing.assert_close(out["0"], top_down["0"])  # N2 = P2
    assert not torch.allclose(out["3"], top_down["3"])

    changed = OrderedDict(features)
    changed["0"] = features["0"] + 1.0  # C2 only
    assert torch.equal(neck.fpn(changed)["3"], top_down["3"])  # FPN's P5 never sees C2 ...
    assert not torch.allclose(neck(changed)["3"], out["3"])  # ... PANet's N5 does


# ----------------------------------------------------------------------------- backbones


def test_resnet_body_returns_c2_to_c5() -> None:
    body, channels = build_resnet_body(18)
    out = body(torch.rand(1, 3, 64, 96))
    assert channels == R18_CHANNELS
    assert list(out) == ["0", "1", "2", "3"]
    assert [tuple(f.shape[1:]) for f in out.values()] == [
        (64, 16, 24),
        (128, 8, 12),
        (256, 4, 6),
        (512, 2, 3),
    ]
    assert build_resnet_body(50)[1] == [256, 512, 1024, 2048]


def test_deformable_body_equals_plain_body_at_init_and_learns_offsets() -> None:
    torch.manual_seed(0)
    plain, _ = build_resnet_body(18)
    torch.manual_seed(0)
    deformable, _ = build_resnet_body(18, deformable_stages=(3, 4, 5))
    assert sum(isinstance(m, DeformConv2d) for m in deformable.modules()) == 6  # 2 blocks x 3 stages
    assert not any(isinstance(m, DeformConv2d) for m in deformable["layer1"].modules())

    x = torch.rand(1, 3, 64, 64)
    expected, got = plain(x), deformable(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)

    sum(f.square().sum() for f in got.values()).backward()
    offset = deformable["layer4"][1].conv2.offset
    assert offset.weight.grad is not None and offset.weight.grad.abs().sum() > 0

    with torch.no_grad():
        offset.bias.fill_(0.5)  # the sampling grid moves: the output must change
    assert not torch.allclose(deformable(x)["3"], expected["3"], atol=1e-3)


def test_deformable_conv_copies_the_conv_it_replaces() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
    dcn = DeformableConv2d.from_conv(conv)
    x = torch.rand(2, 8, 9, 11)
    torch.testing.assert_close(dcn(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen_stages", [0, 2, 5])
def test_frozen_stages_have_no_gradient_and_stay_in_eval(frozen_stages: int) -> None:
    body, _ = build_resnet_body(18, frozen_stages=frozen_stages, deformable_stages=(5,), norm_layer="bn")
    stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    body.train()
    for index, names in enumerate(stages):
        frozen = index < frozen_stages
        params = [p for n in names for p in body[n].parameters()]
        assert params
        assert all(p.requires_grad != frozen for p in params), (names, frozen)
        bns = [m for n in names for m in body[n].modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(bn.training != frozen for bn in bns), (names, frozen)


def test_backbone_arguments_are_validated() -> None:
    for kwargs in ({"depth": 20}, {"frozen_stages": 6}, {"deformable_stages": (2,)}, {"norm_layer": "gn"}):
        with pytest.raises(ValueError):
            build_resnet_body(**{"depth": 18, **kwargs})


def test_weights_none_and_local_file(tmp_path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    state = reference.state_dict()
    state["layer3.0.conv1.weight"].fill_(0.123)
    state["layer3.0.conv2.weight"].fill_(-0.05)
    state["bn1.running_mean"].fill_(0.7)
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)

    random_body, _ = build_resnet_body(18, weights=None)
    assert not torch.all(random_body["layer3"][0].conv1.weight == 0.123)

    body, _ = build_resnet_body(18, weights=str(path), deformable_stages=(4,))
    assert torch.all(body["layer3"][0].conv1.weight == 0.123)
    assert torch.all(body["layer3"][0].conv2.conv.weight == -0.05)  # loaded before being made deformable
    assert torch.all(body["bn1"].running_mean == 0.7)
    torch.testing.assert_close(body["layer1"][0].conv1.weight, state["layer1.0.conv1.weight"])


# ----------------------------------------------------------------------------- ROI heads and losses


class SpyLoss(nn.Module):
    """Cross-entropy plus 10 that remembers its inputs and output."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.logits, self.labels = logits, labels
        self.output = F.cross_entropy(logits, labels) + 10.0
        return self.output


def test_classification_loss_reaches_the_roi_head() -> None:
    torch.manual_seed(0)
    spy = SpyLoss()
    model = small_model(classification_loss=spy)
    assert isinstance(model.roi_heads, LossRoIHeads)
    sampled = []
    model.roi_heads.box_predictor.register_forward_pre_hook(lambda m, args: sampled.append(args[0].shape[0]))
    model.train()
    images, targets = batch(2)
    losses = model(images, targets)

    assert losses["loss_classifier"] is spy.output
    assert losses["loss_classifier"].item() > 10
    assert spy.logits.shape == (sampled[0], 2 + 1)  # two defect classes + background
    assert 0 < sampled[0] <= 2 * SMALL["box_batch_size_per_image"]
    assert spy.labels.shape == (sampled[0],) and spy.labels.dtype == torch.int64
    assert (spy.labels == 0).any() and (spy.labels > 0).any() and spy.labels.max() <= 2


def test_cross_entropy_roi_heads_reproduce_torchvision_losses() -> None:
    torch.manual_seed(0)
    model = small_model()
    model.train()
    images, targets = batch(2)
    torch.manual_seed(1)
    ours = model(images, targets)

    heads = model.roi_heads
    model.roi_heads = RoIHeads(
        heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5, 32, 0.25, None, 0.05, 0.5, 100
    )
    torch.manual_seed(1)
    stock = model(images, targets)
    assert set(ours) == set(stock) == set(LOSS_KEYS)
    for key in LOSS_KEYS:
        torch.testing.assert_close(ours[key], stock[key])
    assert ours["loss_box_reg"] > 0


def test_focal_loss_with_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(32, 5), torch.randint(0, 5, (32,))
    target[3] = -100
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(
        FocalLoss(gamma=0.0, reduction="sum")(logits, target),
        F.cross_entropy(logits, target, reduction="sum"),
    )


def test_focal_loss_down_weights_easy_examples() -> None:
    logits = torch.tensor(
        [[4.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    )  # sample 0 easy (p~0.96), sample 1 hard for class 0
    target = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, target, reduction="none")
    focal = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    p = torch.softmax(logits, dim=1)[:, 0]
    torch.testing.assert_close(focal, (1 - p) ** 2 * ce)
    assert torch.all(focal < ce)
    assert focal[0] / ce[0] < 0.01 < 0.5 < focal[1] / ce[1]

    weighted = FocalLoss(gamma=2.0, alpha=[0.25, 1.0, 1.0], reduction="none")(logits, target)
    torch.testing.assert_close(weighted, 0.25 * focal)
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=0.5)(logits, target), 0.5 * focal.mean())


def test_detection_losses_in_eval_mode_leave_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = small_model(norm_layer="bn")
    images, targets = batch(1)
    bn = model.backbone.body["layer2"][0].bn1
    seen = {}

    def record(name: str):
        def hook(module: nn.Module, args, output) -> None:
            seen[name] = module.training

        return hook

    bn.register_forward_hook(record("bn"))
    model.roi_heads.register_forward_hook(record("roi"))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    model.eval()
    losses = detection_losses(model, images, targets)
    assert set(losses) == set(LOSS_KEYS)
    assert all(torch.isfinite(v) and not v.requires_grad for v in losses.values())
    assert seen == {"bn": False, "roi": True}  # heads ran in training mode, BatchNorm did not
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), key
    assert isinstance(model(images), list)  # still an eval-mode model returning detections

    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    detection_losses(model, images, targets)
    assert {name: m.training for name, m in model.named_modules()} == modes


# ----------------------------------------------------------------------------- builder


def test_overfitting_one_image_drives_the_loss_down() -> None:
    torch.manual_seed(0)
    model = small_model(norm_layer="bn", box_batch_size_per_image=64)
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(123))
    image[:, 30:80, 20:60] += 0.5
    target = {"boxes": torch.tensor([[20.0, 30.0, 60.0, 80.0]]), "labels": torch.tensor([1])}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()
    history = []
    for _ in range(50):
        total = sum(model([image], [target]).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    final = sum(history[-5:]) / 5
    assert final < history[0] / 5, (history[0], history[-5:])
    assert_learnt_the_box(model, image, target)


def assert_learnt_the_box(model: nn.Module, image: torch.Tensor, target: dict[str, torch.Tensor]) -> None:
    """After overfitting: the top detection is the box's class at IoU > 0.5, and mAP@0.5 > 0.5."""
    from torchmetrics.detection import MeanAveragePrecision
    from torchvision.ops import box_iou

    model.eval()
    with torch.no_grad():
        (detection,) = model([image])
    assert len(detection["scores"]) > 0, "no detection at all"
    top = int(detection["scores"].argmax())
    assert int(detection["labels"][top]) == int(target["labels"][0])
    assert float(box_iou(detection["boxes"][top : top + 1], target["boxes"])[0, 0]) > 0.5
    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="faster_coco_eval")
    metric.update([detection], [target])
    assert float(metric.compute()["map_50"]) > 0.5


@pytest.mark.parametrize("fixed_size", [(96, 96), (96, 128)])
def test_pafpn_detector_with_fixed_size_returns_detections(fixed_size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = small_model(neck="pafpn", fixed_size=fixed_size, box_score_thresh=0.0)
    assert isinstance(model.backbone, BackboneWithNeck) and isinstance(model.roi_heads, LossRoIHeads)
    shapes = []
    model.backbone.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    model.eval()
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 120, 160)])
    assert shapes == [(1, 3, *fixed_size)]  # (height, width), both divisible by 32
    assert set(detections) == {"boxes", "labels", "scores"}
    boxes = detections["boxes"]
    assert boxes.shape[0] > 0
    assert boxes[:, [0, 2]].max() <= 160 and boxes[:, [1, 3]].max() <= 120  # mapped back to the input size
    assert set(detections["labels"].tolist()) <= {1, 2}


def test_builder_validates_anchor_levels_and_keyword_arguments() -> None:
    with pytest.raises(ValueError, match="anchor_sizes has 4 levels but neck 'fpn' returns 5"):
        small_model(anchor_sizes=((32,), (64,), (128,), (256,)))
    with pytest.raises(TypeError, match="rpn_nms_tresh"):
        small_model(rpn_nms_tresh=0.5)


def test_multi_scale_training_changes_what_reaches_the_backbone_and_eval_does_not() -> None:
    """A list of ``min_size`` values is multi-scale training: torchvision draws one per training
    batch, so the backbone sees several sizes; evaluation uses one (the last)."""
    torch.manual_seed(0)
    model = build_faster_rcnn(
        3,
        {"name": "resnet18", "norm_layer": "bn"},
        {"name": "fpn", "out_channels": 16},
        min_size=(48, 64, 80),
        max_size=200,
        rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20,
        box_batch_size_per_image=16,
    )
    sizes: list[tuple[int, int]] = []
    model.backbone.register_forward_hook(lambda m, args, out: sizes.append(tuple(args[0].shape[-2:])))
    image = torch.rand(3, 60, 60)
    target = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    model.train()
    for _ in range(12):
        model([image], target)
    assert len({s[0] for s in sizes}) > 1, sizes
    sizes.clear()
    model.eval()
    with torch.no_grad():
        for _ in range(4):
            model([image])
    assert len(set(sizes)) == 1  # min_size[-1], padded to torchvision's size_divisible


def test_a_random_rescale_before_the_detector_is_refused_with_the_multi_scale_advice() -> None:
    from elinspect.data.box_transforms import detection_augmentation

    with pytest.raises(ValueError, match=r"min_size=\["):
        detection_augmentation(scale_limit=0.1)


def test_boxes_keep_their_sub_pixel_coordinates_under_bf16_autocast() -> None:
    """Under ``bf16-mixed`` (``trainer=gpu``) the heads' outputs are bfloat16, which holds 8
    significant bits: boxes decoded (and anchors made) in it land on multiples of 2 px between
    256 and 512 and of 4 px above — thin cracks lose their width. Anchors and box decoding stay
    float32, so proposals and detections are those of the bf16 heads' regression, unrounded."""
    torch.manual_seed(0)
    model = small_model(min_size=600, max_size=600, box_score_thresh=0.0).eval()
    image = torch.rand(3, 600, 600, generator=torch.Generator().manual_seed(0))
    proposals: list[torch.Tensor] = []
    model.rpn.register_forward_hook(lambda m, args, out: proposals.extend(out[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = model([image])[0]["boxes"]
    for name, values in (("proposals", torch.cat(proposals)), ("detections", boxes)):
        assert values.dtype == torch.float32, name
        inside = values[(values > 300) & (values < 590)]  # clipped ones sit at 0 and 600
        assert len(inside) > 20, name
        assert (inside != inside.round()).float().mean() > 0.5, f"{name} rounded to whole pixels"

    anchor_maps = [torch.zeros(1, 8, 150, 150), torch.zeros(1, 8, 75, 75)]
    image_list = torchvision.models.detection.image_list.ImageList(torch.zeros(1, 3, 600, 600), [(600, 600)])
    generator = make_anchor_generator(((32,), (256,)), (0.5, 1.0, 2.0))
    full = generator(image_list, anchor_maps)[0]
    half = generator(image_list, [m.bfloat16() for m in anchor_maps])[0]
    assert half.dtype == torch.float32 and torch.equal(half, full)
