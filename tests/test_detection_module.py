"""The detection LightningModule, its mAP / confusion-matrix metrics, the visuals callback and configs.

Everything runs on a synthetic in-test batch (bright rectangles on a dark background,
128 px) with a ResNet-18 + thin FPN detector, so the suite stays fast on a CPU.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from elinspect.callbacks import DetectionVisualsCallback
from elinspect.data.info import DatasetInfo
from elinspect.losses import FocalLoss
from elinspect.metrics import DetectionConfusionMatrix, DetectionMetrics, confusion_counts
from elinspect.models import build as model_build
from elinspect.models.base import CHECKPOINT_KEY
from elinspect.models.build import build_model, effective_loss_config
from elinspect.models.detection import DetectionModule, build_faster_rcnn
from elinspect.models.schedules import warmup_multistep_lr

CLASSES = ["crack", "finger", "black_core"]
DATASET = {"task": "detection", "class_names": CLASSES, "in_channels": 3, "class_counts": [2, 2, 2]}
SIZE = 128
BOXES = [
    [[8.0, 10.0, 40.0, 46.0], [64.0, 16.0, 112.0, 40.0], [30.0, 70.0, 74.0, 116.0]],
    [[70.0, 60.0, 118.0, 110.0], [12.0, 80.0, 60.0, 100.0], [20.0, 8.0, 56.0, 44.0]],
]
LABELS = [[1, 2, 3], [3, 2, 1]]
BRIGHTNESS = {1: 0.95, 2: 0.7, 3: 0.45}

TINY_DETECTOR = {
    "backbone": {"depth": 18, "weights": None, "norm_layer": "bn"},
    "neck": {"name": "fpn", "out_channels": 32},
    "anchor_sizes": [[16], [32], [64], [128], [256]],
    "min_size": 96,  # the transform resizes the 128 px images to 96 px; boxes come back in 128 px
    "max_size": 96,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_train": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 20,
}
# the same, as overrides of conf/model/faster_rcnn.yaml
TINY_OVERRIDES = [
    "model.detector.backbone.name=resnet18",
    "model.detector.neck.out_channels=32",
    "model.detector.anchor_sizes=[[16],[32],[64],[128],[256]]",
    "model.detector.min_size=96",
    "model.detector.max_size=96",
    "model.detector.rpn_pre_nms_top_n_train=200",
    "model.detector.rpn_post_nms_top_n_train=100",
    "model.detector.box_batch_size_per_image=64",
]


def synthetic_samples() -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Two 3×128×128 images in [0, 1], one filled rectangle per box (brightness by class)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (boxes, labels) in enumerate(zip(BOXES, LABELS, strict=True)):
        image = 0.1 + 0.05 * torch.rand(1, SIZE, SIZE, generator=g)
        for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
            image[:, int(y1) : int(y2), int(x1) : int(x2)] = BRIGHTNESS[label]
        target = {
            "boxes": torch.tensor(boxes),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(i),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
        }
        samples.append((image.expand(3, -1, -1).contiguous(), target))
    return samples


def collate(samples):
    images, targets = zip(*samples, strict=True)
    return list(images), list(targets)


def loader() -> DataLoader:
    return DataLoader(synthetic_samples(), batch_size=2, collate_fn=collate)


def synthetic_batch():
    return collate(synthetic_samples())


def make_module(loss: nn.Module | None = None, **detector: object) -> DetectionModule:
    return DetectionModule(
        detector=functools.partial(build_faster_rcnn, **{**TINY_DETECTOR, **detector}),
        dataset=DATASET,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        loss=loss,
    )


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(root),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **kwargs})


def perfect(target: dict[str, torch.Tensor], score: float = 0.9) -> dict[str, torch.Tensor]:
    n = len(target["labels"])
    return {
        "boxes": target["boxes"].clone(),
        "labels": target["labels"].clone(),
        "scores": torch.full((n,), score),
    }


# --- metrics ---------------------------------------------------------------------------------------


def test_perfect_predictions_give_map_one() -> None:
    metrics = DetectionMetrics(CLASSES)
    _, targets = synthetic_batch()
    metrics.update([perfect(t) for t in targets], targets)
    values = metrics.compute()
    assert values["map"] == pytest.approx(1.0)
    assert values["map_50"] == pytest.approx(1.0)
    assert values["mar_100"] == pytest.approx(1.0)
    for name in CLASSES:
        assert values[f"ap_50/{name}"] == pytest.approx(1.0)
        assert values[f"recall/{name}"] == pytest.approx(1.0)
        assert values[f"ap/{name}"] == pytest.approx(1.0)


def test_a_missed_box_lowers_recall_and_ap_of_its_class_only() -> None:
    metrics = DetectionMetrics(CLASSES)
    _, targets = synthetic_batch()
    preds = [perfect(t) for t in targets]
    miss = preds[0]["labels"] == 1  # drop the crack of image 0: one of the two cracks found
    preds[0] = {k: v[~miss] for k, v in preds[0].items()}
    metrics.update(preds, targets)
    values = metrics.compute()
    assert values["recall/crack"] == pytest.approx(0.5)
    assert values["ap_50/crack"] < 0.6
    assert values["recall/finger"] == pytest.approx(1.0) and values["ap_50/finger"] == pytest.approx(1.0)
    assert values["mar_100"] < 1.0 and values["map_50"] < 1.0
    # the headline mAP@0.5 is the mean of the per-class AP@0.5
    mean_ap50 = sum(values[f"ap_50/{n}"] for n in CLASSES) / len(CLASSES)
    assert values["map_50"] == pytest.approx(float(mean_ap50), abs=1e-4)


def test_per_class_ap_50_is_at_iou_half_not_averaged_over_thresholds() -> None:
    """A box found with IoU 0.6: AP@0.5 is 1, AP@[.5:.95] is not (what class_metrics alone reports)."""
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([2])}
    pred = {
        "boxes": torch.tensor([[0.0, 0.0, 100.0, 60.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.9]),
    }
    metrics = DetectionMetrics(CLASSES)
    metrics.update([pred], [target])
    values = metrics.compute()
    assert values["ap_50/finger"] == pytest.approx(1.0)
    assert values["ap/finger"] < 0.5
    assert "ap_50/crack" not in values  # no ground truth: AP undefined, not logged


def test_difficult_boxes_are_ignored_by_the_map() -> None:
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]]),
        "labels": torch.tensor([1, 1]),
        "difficult": torch.tensor([False, True]),
    }
    # a detection of the difficult box ranked first: no false positive
    both = {
        "boxes": target["boxes"].flip(0),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.9, 0.8]),
    }
    # the difficult box missed: no miss
    only_normal = {"boxes": target["boxes"][:1], "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    for pred in (both, only_normal):
        metrics = DetectionMetrics(CLASSES)
        metrics.update([pred], [target])
        values = metrics.compute()
        assert values["map_50"] == pytest.approx(1.0) and values["recall/crack"] == pytest.approx(1.0)
    # the same boxes without the flag: a miss
    metrics = DetectionMetrics(CLASSES)
    metrics.update([only_normal], [{**target, "difficult": torch.tensor([False, False])}])
    assert metrics.compute()["recall/crack"] == pytest.approx(0.5)


def test_confusion_matrix_counts_hand_made_case() -> None:
    boxes = torch.tensor(
        [
            [0.0, 0.0, 20.0, 20.0],  # crack, detected as crack
            [30.0, 0.0, 50.0, 20.0],  # finger, detected as crack
            [60.0, 0.0, 80.0, 20.0],  # crack, only a low-score detection: missed
            [0.0, 30.0, 20.0, 50.0],  # black_core, difficult, detected: ignored
        ]
    )
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 1, 3]),
        "difficult": torch.tensor([False, False, False, True]),
    }
    pred = {
        "boxes": torch.cat([boxes[[0, 1, 2, 3, 0]], torch.tensor([[90.0, 90.0, 110.0, 110.0]])]),
        "labels": torch.tensor([1, 1, 1, 3, 1, 2]),
        "scores": torch.tensor([0.9, 0.8, 0.1, 0.9, 0.6, 0.7]),  # box 0 twice: the duplicate is a FP
    }
    counts = confusion_counts(pred, target, num_classes=3, iou_threshold=0.5, score_threshold=0.5)
    crack, finger, black_core, bg = range(4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[crack, crack] = 1
    expected[finger, crack] = 1
    expected[crack, bg] = 1  # the missed crack
    expected[bg, crack] = 1  # the duplicate detection of box 0
    expected[bg, finger] = 1  # the detection on empty background
    assert torch.equal(counts, expected), counts
    matrix = DetectionConfusionMatrix(num_classes=3)
    matrix.update([pred, pred], [target, target])
    assert torch.equal(matrix.compute(), 2 * expected)


def test_detection_metrics_count_each_image_once_when_a_ddp_sampler_repeats_some() -> None:
    """Under DDP, Lightning's DistributedSampler pads the ranks with repeated images (5 images on
    2 ranks: [0, 2, 4] and [1, 3, 0]) and the metrics gather both copies; each image must count
    once, by its ``image_id``, or a repeated false positive lowers mAP."""
    box = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    no_box = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    targets = [
        {**(no_box if i == 0 else {"boxes": box, "labels": torch.tensor([1])}), "image_id": torch.tensor(i)}
        for i in range(5)
    ]
    # image 0, defect-free: a confident false positive; images 1–4: their box found at a lower score
    preds = [
        {"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.9 if i == 0 else 0.6])}
        for i in range(5)
    ]
    gathered = [0, 1, 2, 3, 4, 0]  # the ranks' copies, as torchmetrics gathers them
    once, repeated = DetectionMetrics(CLASSES), DetectionMetrics(CLASSES)
    once.update(preds, targets)
    repeated.update([preds[i] for i in gathered], [targets[i] for i in gathered])
    assert once.compute()["map_50"] == pytest.approx(0.8)  # precision 4/5 at every recall
    assert repeated.compute()["map_50"] == pytest.approx(0.8)  # not 4/6
    matrices = DetectionConfusionMatrix(num_classes=3), DetectionConfusionMatrix(num_classes=3)
    matrices[0].update(preds, targets)
    matrices[1].update([preds[i] for i in gathered], [targets[i] for i in gathered])
    assert int(matrices[0].compute()[3, 0]) == 1  # one false positive (row background)
    assert torch.equal(matrices[1].compute(), matrices[0].compute())


# --- module ---------------------------------------------------------------------------------------


def test_training_step_returns_a_finite_loss_of_the_torchvision_terms() -> None:
    torch.manual_seed(0)
    module = make_module()
    module.train()
    loss = module.training_step(synthetic_batch(), 0)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.requires_grad
    loss.backward()
    assert module.model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("loss_name", "loss_type"), [("focal", FocalLoss), ("ce", nn.CrossEntropyLoss)])
def test_the_loss_group_reaches_the_roi_head(make_cfg, monkeypatch, loss_name: str, loss_type: type) -> None:
    cfg = make_cfg("train.yaml", ["model=faster_rcnn", f"loss={loss_name}", *TINY_OVERRIDES])
    built: list[nn.Module] = []
    real_build_loss = model_build.build_loss
    monkeypatch.setattr(model_build, "build_loss", lambda *a: built.append(real_build_loss(*a)) or built[-1])
    module = build_model(cfg.model, effective_loss_config(cfg), DatasetInfo.from_dict(DATASET))
    assert isinstance(module, DetectionModule) and module.class_names == CLASSES
    heads = module.model.roi_heads
    assert isinstance(heads.classification_loss, loss_type) and heads.classification_loss is built[0]
    assert heads.box_predictor.cls_score.out_features == len(CLASSES) + 1
    calls = []
    built[0].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
    torch.manual_seed(0)
    module.train()
    module.training_step(synthetic_batch(), 0)
    assert calls == [len(CLASSES) + 1]


def test_overfitting_one_batch_drives_the_loss_down() -> None:
    """Neck, RPN and ROI head learn two images in 15 steps (the backbone frozen, to keep it quick)."""
    torch.manual_seed(0)
    module = make_module(backbone={**TINY_DETECTOR["backbone"], "frozen_stages": 5})
    module.train()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    batch = synthetic_batch()
    losses = []
    for step in range(15):
        loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_scheduler_interval_reaches_lightning() -> None:
    module = DetectionModule(
        detector=functools.partial(build_faster_rcnn, **TINY_DETECTOR),
        dataset=DATASET,
        optimizer=functools.partial(torch.optim.SGD, lr=0.001),
        scheduler=functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[15000, 30000]),
        scheduler_interval="step",
    )
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    with pytest.raises(ValueError, match="scheduler_interval"):
        DetectionModule(
            detector=functools.partial(build_faster_rcnn, **TINY_DETECTOR),
            dataset=DATASET,
            optimizer=functools.partial(torch.optim.SGD, lr=0.001),
            scheduler_interval="iteration",
        )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """One step of training, a validation with the visuals callback, a checkpoint, a test."""
    root = tmp_path_factory.mktemp("detection_run")
    torch.manual_seed(0)
    module = make_module(box_score_thresh=0.0)
    checkpoint = ModelCheckpoint(
        dirpath=root / "checkpoints", monitor="val/map_50", mode="max", save_last=True
    )
    trainer = quiet_trainer(
        root,
        max_steps=1,
        limit_val_batches=1,
        fast_dev_run=False,
        log_every_n_steps=1,
        callbacks=[checkpoint, DetectionVisualsCallback(num_images=2, score_threshold=0.0)],
        logger=CSVLogger(root, name="csv"),
    )
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    fit_metrics = dict(trainer.callback_metrics)
    module.eval()
    with torch.no_grad():
        preds = module(synthetic_batch()[0])
    test_metrics = trainer.test(module, dataloaders=loader(), verbose=False)[0]
    return SimpleNamespace(
        root=root,
        module=module,
        trainer=trainer,
        checkpoint=checkpoint,
        fit=fit_metrics,
        test=test_metrics,
        preds=preds,
    )


def test_training_logs_the_loss_and_each_loss_term(fitted) -> None:
    for name in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        value = fitted.fit[f"train/{name}_step"]
        assert math.isfinite(float(value)), name
    header = next(csv.reader((fitted.root / "csv" / "version_0" / "metrics.csv").open()))
    assert "train/loss_classifier_step" in header and "val/map_50" in header


def test_validation_and_test_log_map_and_per_class_metrics(fitted) -> None:
    for split, metrics in (("val", fitted.fit), ("test", fitted.test)):
        for name in (
            "map_50",
            "map",
            "mar_100",
            *(f"{k}/{c}" for k in ("ap_50", "recall", "ap") for c in CLASSES),
        ):
            key = f"{split}/{name}"
            assert key in metrics, (key, sorted(metrics))
            assert 0.0 <= float(metrics[key]) <= 1.0, key


def test_test_writes_the_confusion_matrix(fitted) -> None:
    directory = fitted.root / "test"
    rows = list(csv.reader((directory / "confusion_matrix.csv").open()))
    assert rows[0][1:] == [*CLASSES, "background"]
    assert [r[0] for r in rows[1:]] == [*CLASSES, "background"]
    counts = [[int(v) for v in r[1:]] for r in rows[1:]]
    # every true box lands in its class's row exactly once: matched, confused or missed
    truth = torch.cat([t["labels"] for _, targets in loader() for t in targets])
    assert [sum(r) for r in counts[:-1]] == [int((truth == c + 1).sum()) for c in range(len(CLASSES))]
    png = (directory / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_visuals_callback_writes_pngs(fitted) -> None:
    files = sorted((fitted.root / "visuals" / "epoch_000").glob("*.png"))
    assert [f.name for f in files] == ["00.png", "01.png"]
    from torchvision.io import read_image

    picture = read_image(str(files[0]))
    assert picture.shape == (3, SIZE, SIZE)
    # ground-truth boxes are drawn in lime (0, 255, 0): the plain image is grey
    assert bool(((picture[0] == 0) & (picture[1] == 255) & (picture[2] == 0)).any())


def test_checkpoint_reloads_to_the_same_predictions(fitted) -> None:
    path = Path(fitted.checkpoint.last_model_path)
    assert path.is_file()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt[CHECKPOINT_KEY]["task"] == "detection"
    assert ckpt["global_step"] == 1
    torch.manual_seed(123)  # different initial weights
    fresh = make_module(box_score_thresh=0.0)
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.eval()
    with torch.no_grad():
        preds = fresh(synthetic_batch()[0])
    assert sum(len(p["boxes"]) for p in fitted.preds) > 0
    for a, b in zip(fitted.preds, preds, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
        assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


# --- configs --------------------------------------------------------------------------------------


def test_pvel_experiment_has_the_ebba_paper_settings(make_cfg) -> None:
    cfg = make_cfg("train.yaml", ["experiment=faster_rcnn_pvel"])
    det = cfg.model.detector
    assert cfg.model._target_ == "elinspect.models.detection.DetectionModule"
    assert (cfg.data.classes, cfg.data.split, list(cfg.data.ratios), cfg.data.batch_size) == (
        "ebba2",  # Table 4: crack and finger
        "ratio",
        [0.6, 0.2, 0.2],
        1,
    )
    assert (
        list(det.fixed_size) == [600, 600]
        and det.backbone.name == "resnet101"
        and det.backbone.weights is None
    )
    assert det.rpn_fg_iou_thresh == 0.7 and det.box_detections_per_img == 1000
    assert cfg.model.optimizer.lr == 0.001 and list(cfg.model.scheduler.milestones) == [15000, 30000]
    assert cfg.model.scheduler_interval == "step" and cfg.trainer.max_steps >= 30000
    assert cfg.optimized_metric == "val/map_50"


def test_detection_callbacks_are_the_default_ones_plus_visuals(make_cfg) -> None:
    default = make_cfg("train.yaml", ["callbacks=default"])
    detection = make_cfg("train.yaml", ["callbacks=detection"])
    assert set(detection.callbacks) == {*default.callbacks, "detection_visuals"}


def test_any_detector_gets_the_warm_up_schedule_with_milestones_in_epochs() -> None:
    """The warm-up + step schedule is not RDDN's alone: every module fills in its steps per epoch."""
    module = make_module()
    module.scheduler_factory = functools.partial(warmup_multistep_lr, milestones=[3], warmup_iters=5)
    module.scheduler_interval = "step"
    module._trainer = SimpleNamespace(train_dataloader=[], num_training_batches=10, accumulate_grad_batches=1)
    config = module.configure_optimizers()
    decay = config["lr_scheduler"]["scheduler"]._schedulers[1]
    assert sorted(decay.milestones) == [30]  # epoch 3 at 10 steps per epoch
    # milestones already in steps, or a scheduler without steps_per_epoch: nothing is filled in
    module.scheduler_factory = functools.partial(
        warmup_multistep_lr, milestones=[7], warmup_iters=5, milestone_unit="step"
    )
    assert sorted(module.configure_optimizers()["lr_scheduler"]["scheduler"]._schedulers[1].milestones) == [7]
    module.scheduler_factory = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2])
    assert sorted(module.configure_optimizers()["lr_scheduler"]["scheduler"].milestones) == [2]
