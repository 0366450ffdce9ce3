"""RDDN's context reference and Cascade R-CNN box heads (``rddn.txt`` §III.B–C, §IV.C).

Geometry of the context boxes, what the context pooler pools, the ``build_box_heads``
factory, a one-stage cascade against the standard head, the stage ensemble at inference,
and a tiny ResNet-18 detector with cascade + context that learns one synthetic box.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import MultiScaleRoIAlign

from elinspect.losses import FocalLoss
from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.cascade import CascadeRoIHeads
from elinspect.models.detection.context import ContextRoIPool, SharedHeadContext, context_boxes, parse_context
from elinspect.models.detection.heads import CASCADE_BBOX_REG_WEIGHTS, build_box_heads
from elinspect.models.detection.roi_heads import LossRoIHeads
from tests.test_detection_parts import assert_learnt_the_box

C = 8  # neck channels
SIZE = 64  # image side (the transform's min_size / max_size)
LEVELS = ["0", "1", "2", "3"]
TINY = {
    "min_size": SIZE,
    "max_size": SIZE,
    "anchor_sizes": ((8,), (16,), (32,), (64,), (128,)),
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 30,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_detector(num_classes: int = 3, out_channels: int = C, **kwargs):
    options = {**TINY, **kwargs}
    return build_faster_rcnn(
        num_classes,
        {"depth": 18, "norm_layer": "bn"},
        {"name": "fpn", "out_channels": out_channels},
        **options,
    )


def roi_heads(num_classes: int = 3, loss=None, **kwargs) -> LossRoIHeads:
    """The LossRoIHeads of a tiny detector (the pooler reads levels 0..3 at C channels)."""
    return tiny_detector(num_classes, classification_loss=loss, **kwargs).roi_heads


def fpn_features(batch: int = 2, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(batch, C, SIZE // s, SIZE // s, generator=g))
        for name, s in zip(LEVELS, (4, 8, 16, 32), strict=True)
    )


def random_boxes(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 12)
    wh = 4 + torch.rand(n, 2, generator=g) * (size / 2)
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[20.0, 20.0, 50.0, 44.0], [4.0, 40.0, 20.0, 60.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]


def proposals(seed: int = 1) -> list[torch.Tensor]:
    """Random proposals plus jittered copies of the ground truth, so every stage has positives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(targets()):
        jitter = t["boxes"].repeat(4, 1) + torch.randn(4 * len(t["boxes"]), 4, generator=g) * 2
        out.append(torch.cat([random_boxes(40, seed + i), jitter.clamp(0, SIZE)]))
    return out


SHAPES = [(SIZE, SIZE), (SIZE, SIZE)]


# ----------------------------------------------------------------------------- context geometry


def test_context_boxes_keep_the_centre_and_scale_width_and_height() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [40.0, 40.0, 50.0, 44.0]])
    got = context_boxes(boxes, (100, 100), 1.5)
    # centres (20, 40), (45, 42); sizes 20 x 40 -> 30 x 60, 10 x 4 -> 15 x 6
    torch.testing.assert_close(got, torch.tensor([[5.0, 10.0, 35.0, 70.0], [37.5, 39.0, 52.5, 45.0]]))
    torch.testing.assert_close(context_boxes(boxes, (100, 100), 1.0), boxes)


def test_context_boxes_are_clipped_to_the_image_height_and_width() -> None:
    # image 50 high, 100 wide: x clipped at 100, y at 50 (not the other way round)
    boxes = torch.tensor([[80.0, 40.0, 100.0, 50.0], [0.0, 0.0, 20.0, 20.0]])
    got = context_boxes(boxes, (50, 100), 2.0)
    torch.testing.assert_close(got, torch.tensor([[70.0, 35.0, 100.0, 50.0], [0.0, 0.0, 30.0, 30.0]]))


def test_context_boxes_of_degenerate_and_empty_inputs() -> None:
    boxes = torch.tensor([[10.0, 10.0, 10.0, 30.0], [5.0, 6.0, 5.0, 6.0]])  # zero width; a point
    got = context_boxes(boxes, (64, 64), 1.5)
    torch.testing.assert_close(got, torch.tensor([[10.0, 5.0, 10.0, 35.0], [5.0, 6.0, 5.0, 6.0]]))
    assert context_boxes(torch.zeros(0, 4), (64, 64), 1.5).shape == (0, 4)
    with pytest.raises(ValueError, match="k enlarges"):
        context_boxes(boxes, (64, 64), 0.9)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        context_boxes(torch.zeros(3), (64, 64), 1.5)


@settings(max_examples=40, deadline=None)
@given(
    x1=st.floats(0, 90),
    y1=st.floats(0, 40),
    w=st.floats(0, 60),
    h=st.floats(0, 30),
    k=st.floats(1.0, 3.0),
)
def test_context_box_contains_its_roi_inside_the_image(x1, y1, w, h, k) -> None:
    image = (50, 100)
    box = torch.tensor([[x1, y1, min(x1 + w, 100.0), min(y1 + h, 50.0)]], dtype=torch.float64)
    got = context_boxes(box, image, k)[0]
    assert 0 <= got[0] <= box[0, 0] + 1e-9 and 0 <= got[1] <= box[0, 1] + 1e-9
    assert box[0, 2] - 1e-9 <= got[2] <= 100 and box[0, 3] - 1e-9 <= got[3] <= 50
    unclipped = box[0].clone()
    cx, cy, bw, bh = (
        (unclipped[0] + unclipped[2]) / 2,
        (unclipped[1] + unclipped[3]) / 2,
        *(unclipped[2:] - unclipped[:2]),
    )
    if cx - k * bw / 2 >= 0 and cx + k * bw / 2 <= 100 and cy - k * bh / 2 >= 0 and cy + k * bh / 2 <= 50:
        torch.testing.assert_close(got[2] - got[0], k * bw)
        torch.testing.assert_close((got[0] + got[2]) / 2, cx)


# ----------------------------------------------------------------------------- context pooling


def test_concat_pools_roi_then_context_and_context_only_pools_the_enlarged_box() -> None:
    pool = MultiScaleRoIAlign(LEVELS, output_size=7, sampling_ratio=2)
    features, boxes = fpn_features(), [random_boxes(5, 0), random_boxes(3, 1)]
    enlarged = [context_boxes(b, s, 1.5) for b, s in zip(boxes, SHAPES, strict=True)]
    concat = ContextRoIPool(pool, k=1.5, mode="concat")(features, boxes, SHAPES)
    assert concat.shape == (8, 2 * C, 7, 7)
    torch.testing.assert_close(concat[:, :C], pool(features, boxes, SHAPES))
    torch.testing.assert_close(concat[:, C:], pool(features, enlarged, SHAPES))
    only = ContextRoIPool(pool, k=1.5, mode="context_only")
    assert only.channels_factor == 1
    torch.testing.assert_close(only(features, boxes, SHAPES), pool(features, enlarged, SHAPES))


def test_global_mode_pools_the_whole_image_for_every_roi_of_that_image() -> None:
    pool = MultiScaleRoIAlign(LEVELS, output_size=7, sampling_ratio=2)
    features, boxes = fpn_features(), [random_boxes(4, 0), random_boxes(2, 1)]
    got = ContextRoIPool(pool, mode="global")(features, boxes, SHAPES)
    assert got.shape == (6, 2 * C, 7, 7)
    whole = pool(features, [torch.tensor([[0.0, 0.0, SIZE, SIZE]])] * 2, SHAPES)
    torch.testing.assert_close(got[:4, C:], whole[0].expand(4, -1, -1, -1))
    torch.testing.assert_close(got[4:, C:], whole[1].expand(2, -1, -1, -1))
    assert not torch.allclose(whole[0], whole[1])
    torch.testing.assert_close(got[:, :C], pool(features, boxes, SHAPES))


def test_context_options_are_validated() -> None:
    pool = MultiScaleRoIAlign(LEVELS, 7, 2)
    with pytest.raises(ValueError, match="context mode"):
        ContextRoIPool(pool, mode="sum")
    with pytest.raises(ValueError, match="unknown context options"):
        parse_context({"enabled": True, "scale": 1.5})
    assert parse_context({"enabled": False, "k": 1.5}) is None
    assert parse_context({"k": 1.3}) == {"k": 1.3, "mode": "concat", "fuse_at": "fc"}


# ----------------------------------------------------------------------------- the factory


def test_standard_head_without_context_is_returned_unchanged() -> None:
    heads = roi_heads()
    assert build_box_heads(heads) is heads
    assert build_box_heads(heads, context={"enabled": False, "k": 1.5, "mode": "concat"}) is heads


@pytest.mark.parametrize(("mode", "factor"), [("concat", 2), ("global", 2), ("context_only", 1)])
def test_standard_head_with_context_fused_at_roi_widens_the_box_head(mode: str, factor: int) -> None:
    loss = FocalLoss(gamma=2.0)
    heads = roi_heads(loss=loss, box_score_thresh=0.2, box_nms_thresh=0.4, box_fg_iou_thresh=0.6)
    context = {"enabled": True, "k": 1.4, "mode": mode, "fuse_at": "roi"}
    new = build_box_heads(heads, context=context, representation_size=32)
    assert isinstance(new, LossRoIHeads) and new is not heads
    assert isinstance(new.box_roi_pool, ContextRoIPool) and new.box_roi_pool.roi_pool is heads.box_roi_pool
    assert (new.box_roi_pool.k, new.box_roi_pool.mode) == (1.4, mode)
    assert new.box_head.fc6.in_features == factor * C * 7 * 7
    assert new.box_predictor.cls_score.out_features == 3
    assert new.classification_loss is loss
    assert (new.score_thresh, new.nms_thresh, new.detections_per_img) == (0.2, 0.4, 10)
    assert new.proposal_matcher.high_threshold == 0.6
    assert new.fg_bg_sampler.batch_size_per_image == 32
    new.train()
    losses = new(fpn_features(), proposals(), SHAPES, targets())
    assert set(losses[1]) == {"loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses[1].values())


@pytest.mark.parametrize("mode", ["concat", "global"])
def test_context_fused_at_fc_concatenates_the_shared_heads_region_features(mode: str) -> None:
    """RDDN §IV.C: ROI and context go through the *shared* two-fc head and its two outputs
    after activation (the "region features") are concatenated before the predictor; fc6 keeps
    its size. The default (``fuse_at`` omitted) is this one."""
    heads = roi_heads()
    new = build_box_heads(heads, context={"k": 1.5, "mode": mode}, representation_size=32)
    assert isinstance(new.box_head, SharedHeadContext)
    mlp = new.box_head.head
    assert mlp.fc6.in_features == C * 7 * 7 and new.box_predictor.cls_score.in_features == 2 * 32
    pooled = new.box_roi_pool(fpn_features(), proposals(), SHAPES)
    roi, context = pooled.split(C, dim=1)
    expected = torch.cat([mlp(roi), mlp(context)], dim=1)
    torch.testing.assert_close(new.box_head(pooled), expected)
    new.train()
    losses = new(fpn_features(), proposals(), SHAPES, targets())[1]
    assert all(torch.isfinite(v) for v in losses.values())
    # what fusing before fc6 would cost: fc6 doubles, here only the predictor's input does
    wide = build_box_heads(heads, context={"k": 1.5, "mode": mode, "fuse_at": "roi"}, representation_size=32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide.box_head) - count(new.box_head) == C * 7 * 7 * 32
    with pytest.raises(ValueError, match="fuse_at"):
        build_box_heads(heads, context={"fuse_at": "fc7"})


def test_cascade_stages_follow_the_paper_and_cascade_r_cnn() -> None:
    loss = FocalLoss(gamma=2.0)
    heads = roi_heads(loss=loss)
    cascade = build_box_heads(heads, "cascade", context={"k": 1.5, "mode": "concat"}, representation_size=32)
    assert isinstance(cascade, CascadeRoIHeads)
    assert cascade.iou_thresholds == (0.4, 0.5, 0.6)
    assert cascade.stage_weights == (1.0, 0.5, 0.25)
    for stage, iou, weights in zip(cascade.stages, (0.4, 0.5, 0.6), CASCADE_BBOX_REG_WEIGHTS, strict=True):
        assert stage.proposal_matcher.low_threshold == stage.proposal_matcher.high_threshold == iou
        assert tuple(stage.box_coder.weights) == weights
        assert isinstance(stage.box_roi_pool, ContextRoIPool)
        assert stage.box_head.head.fc6.in_features == C * 49  # fused after the shared fc head
        assert stage.classification_loss is loss
    heads_params = [{id(p) for p in s.box_head.parameters()} for s in cascade.stages]
    assert not heads_params[0] & heads_params[1] and not heads_params[1] & heads_params[2]
    assert cascade.detections_per_img == heads.detections_per_img


def test_factory_arguments_are_validated() -> None:
    heads = roi_heads()
    with pytest.raises(ValueError, match="head must be one of"):
        build_box_heads(heads, "hybrid")
    with pytest.raises(ValueError, match="one loss weight per stage"):
        build_box_heads(heads, "cascade", cascade_iou=(0.5, 0.6))
    with pytest.raises(ValueError, match=r"IoU thresholds in \(0, 1\)"):
        build_box_heads(heads, "cascade", cascade_iou=(0.5, 1.2, 0.7))
    with pytest.raises(ValueError, match="explicit cascade_bbox_reg_weights"):
        build_box_heads(
            heads, "cascade", cascade_iou=(0.4, 0.5, 0.6, 0.7), cascade_stage_weights=(1, 1, 1, 1)
        )
    with pytest.raises(ValueError, match=r"one \(wx, wy, ww, wh\) per stage"):
        build_box_heads(heads, "cascade", cascade_bbox_reg_weights=[(10, 10, 5, 5)] * 2)


# ----------------------------------------------------------------------------- cascade behaviour


def one_stage_twin(heads: LossRoIHeads, context) -> tuple[LossRoIHeads, CascadeRoIHeads]:
    """A standard head and a one-stage cascade with the same weights."""
    standard = build_box_heads(heads, context=context, representation_size=32)
    cascade = build_box_heads(
        heads,
        "cascade",
        cascade_iou=(0.5,),
        cascade_stage_weights=(1.0,),
        cascade_bbox_reg_weights=[standard.box_coder.weights],
        context=context,
        representation_size=getattr(standard.box_head, "head", standard.box_head).fc7.out_features,
    )
    stage = cascade.stages[0]
    stage.box_head.load_state_dict(standard.box_head.state_dict())
    stage.box_predictor.load_state_dict(standard.box_predictor.state_dict())
    return standard, cascade


@pytest.mark.parametrize("context", [None, {"k": 1.5, "mode": "concat"}], ids=["plain", "context"])
def test_one_stage_cascade_equals_the_standard_head(context) -> None:
    torch.manual_seed(0)
    standard, cascade = one_stage_twin(roi_heads(loss=FocalLoss(gamma=2.0)), context)
    features, boxes = fpn_features(), proposals()

    standard.train(), cascade.train()
    torch.manual_seed(7)
    _, expected = standard(features, [b.clone() for b in boxes], SHAPES, targets())
    torch.manual_seed(7)
    _, got = cascade(features, [b.clone() for b in boxes], SHAPES, targets())
    assert set(got) == set(expected) == {"loss_classifier", "loss_box_reg"}
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(cascade.stage_losses["loss_classifier_s0"], expected["loss_classifier"])

    standard.eval(), cascade.eval()
    with torch.no_grad():
        expected_det, _ = standard(features, boxes, SHAPES)
        got_det, _ = cascade(features, boxes, SHAPES)
    assert sum(len(d["boxes"]) for d in expected_det) > 0
    for e, g in zip(expected_det, got_det, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], e[key]), key


def test_three_stage_cascade_trains_with_weighted_stage_losses_and_detects() -> None:
    torch.manual_seed(0)
    cascade = build_box_heads(
        roi_heads(loss=FocalLoss(gamma=2.0), box_score_thresh=0.0),
        "cascade",
        context={"k": 1.5, "mode": "concat"},
        representation_size=32,
    )
    features, boxes = fpn_features(), proposals()
    cascade.train()
    _, losses = cascade(features, boxes, SHAPES, targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    stage = cascade.stage_losses
    assert set(stage) == {f"{k}_s{t}" for k in ("loss_classifier", "loss_box_reg") for t in range(3)}
    for key in ("loss_classifier", "loss_box_reg"):
        expected = sum(w * stage[f"{key}_s{t}"] for t, w in enumerate((1.0, 0.5, 0.25)))
        torch.testing.assert_close(losses[key].detach(), expected)
        assert torch.isfinite(losses[key]) and losses[key] > 0
    sum(losses.values()).backward()
    for s in cascade.stages:
        assert s.box_predictor.bbox_pred.weight.grad.abs().sum() > 0

    cascade.eval()
    with torch.no_grad():
        detections, extra = cascade(features, boxes, SHAPES)
    assert extra == {}
    assert len(detections) == 2
    for d in detections:
        assert 0 < len(d["boxes"]) <= cascade.detections_per_img
        assert ((d["scores"] >= 0) & (d["scores"] <= 1)).all()
        assert ((d["boxes"] >= 0) & (d["boxes"] <= SIZE)).all()
        assert set(d["labels"].tolist()) <= {1, 2}


def test_refine_decodes_the_chosen_class_and_detaches() -> None:
    cascade = build_box_heads(roi_heads(), "cascade", representation_size=16)
    stage = cascade.stages[1]  # weights (20, 20, 10, 10)
    boxes = [torch.tensor([[10.0, 10.0, 30.0, 20.0]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    regression = torch.zeros(2, 3 * 4, requires_grad=True)
    deltas = regression.detach().clone()
    deltas[0, 2 * 4 : 2 * 4 + 4] = torch.tensor([20.0 * 0.5, 0.0, 0.0, 0.0])  # class 2: dx = half a width
    deltas[1, 1 * 4 : 1 * 4 + 4] = torch.tensor([-20.0, 0.0, 0.0, 0.0])  # class 1: dx = -1 width, clipped
    moved = cascade.refine(stage, regression + deltas, boxes, torch.tensor([2, 1]), SHAPES)
    torch.testing.assert_close(moved[0], torch.tensor([[20.0, 10.0, 40.0, 20.0]]))
    torch.testing.assert_close(moved[1], torch.tensor([[0.0, 0.0, 0.0, 8.0]]))
    assert not moved[0].requires_grad
    empty = cascade.refine(
        stage, torch.zeros(0, 12), [torch.zeros(0, 4)], torch.zeros(0, dtype=torch.long), SHAPES[:1]
    )
    assert empty[0].shape == (0, 4)


def test_inference_averages_the_class_probabilities_of_all_stages() -> None:
    heads = roi_heads(box_score_thresh=0.0)
    cascade = build_box_heads(heads, "cascade", representation_size=16)
    logits = [torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, -2.0, 1.0])]
    with torch.no_grad():
        for stage, bias in zip(cascade.stages, logits, strict=True):  # constant scores, no box motion
            stage.box_predictor.cls_score.weight.zero_()
            stage.box_predictor.cls_score.bias.copy_(bias)
            stage.box_predictor.bbox_pred.weight.zero_()
            stage.box_predictor.bbox_pred.bias.zero_()
    cascade.eval()
    boxes = [random_boxes(12, 3)]
    with torch.no_grad():
        (detections,), _ = cascade(fpn_features(batch=1), boxes, SHAPES[:1])
    mean = torch.stack([torch.softmax(b, 0) for b in logits]).mean(0)
    for label, score in zip(detections["labels"], detections["scores"], strict=True):
        torch.testing.assert_close(score, mean[label])
    assert len(detections["boxes"]) > 0
    distance = torch.cdist(detections["boxes"], boxes[0]).min(dim=1).values
    assert (distance < 1e-4).all()  # zero deltas: the proposals themselves, never moved


def test_tiny_detector_with_cascade_and_context_learns_one_box() -> None:
    """ResNet-18 + FPN at 64 px, cascade (0.4/0.5/0.6) with CR k=1.5: the loss falls in 60 SGD
    steps and the box is found (class, IoU > 0.5, mAP@0.5 > 0.5)."""
    torch.manual_seed(0)
    model = tiny_detector(num_classes=2, out_channels=16)
    model.roi_heads = build_box_heads(
        model.roi_heads,
        "cascade",
        context={"enabled": True, "k": 1.5, "mode": "concat"},
        representation_size=64,
    )
    image = 0.1 * torch.rand(3, SIZE, SIZE)
    image[:, 16:48, 16:40] = 0.9
    target = [{"boxes": torch.tensor([[16.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([1])}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    history = []
    for _ in range(60):
        losses = model([image], target)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.75 * first, history
    assert_learnt_the_box(model, image, target[0])


def test_refined_ground_truth_boxes_are_not_passed_to_the_next_stage() -> None:
    """Sampling adds the ground truth to each stage's proposals; the boxes refined from those
    ground-truth copies are dropped before the next stage (which adds the ground truth itself),
    as mmdetection's cascade does — so each stage's input holds the ground truth exactly once."""
    torch.manual_seed(0)
    heads = roi_heads()
    heads.fg_bg_sampler.batch_size_per_image = 512  # every proposal and GT box is sampled
    cascade = build_box_heads(heads, "cascade", representation_size=32)
    seen: list[list[int]] = []
    for stage in cascade.stages[1:]:
        original = stage.select_training_samples

        def spy(props, tgts, original=original):
            seen.append([len(p) for p in props])
            return original(props, tgts)

        stage.select_training_samples = spy
    cascade.train()
    given = proposals()
    cascade(fpn_features(), [p.clone() for p in given], SHAPES, targets())
    expected = [len(p) for p in given]  # the stage-0 proposals, refined; GT copies dropped
    assert seen == [expected, expected]


def test_the_shared_head_context_takes_an_image_without_proposals() -> None:
    """A batch whose images have no proposal left (an untrained RPN on a hard image) reaches the
    box head with 0 RoIs: the fused region features are then 0 × parts·R, not a reshape error
    (found by the Table VI re-run, r50_global on Aluminum)."""
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 7 * 7, 16))
    shared = SharedHeadContext(head, parts=2)
    assert shared(torch.zeros(0, 8, 7, 7)).shape == (0, 32)
    assert shared(torch.zeros(3, 8, 7, 7)).shape == (3, 32)
