"""The report's plots: curve data with known answers, figures of a multirun linked from report.md,
and the test predictions a run leaves on disk for them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from elinspect.build import build_datamodule_and_model
from elinspect.callbacks.test_predictions import TestPredictionsCallback, image_rows
from elinspect.metrics.detection import DetectionMetrics, confusion_counts
from elinspect.plots import (
    classification_confusion,
    coco_average_precision,
    detection_pr_curve,
    detection_pr_curves,
    read_detections,
    roc_curve,
    training_history,
)
from elinspect.report import main
from elinspect.reporting import (
    ReportError,
    aggregate,
    aggregate_numbers,
    collect,
    final_metrics,
    job_plots,
    report,
)
from tests.conftest import FAST_DETECTOR_OVERRIDES, REPO


# ------------------------------------------------------------------------------ curve data
def test_roc_of_perfect_random_and_unbounded_scores() -> None:
    targets = np.array([0, 0, 0, 1, 1, 1])
    perfect = roc_curve([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], targets)
    assert perfect.area == pytest.approx(1.0)
    assert (perfect.x[perfect.y >= 1.0].min(), perfect.x[0], perfect.y[0]) == (0.0, 0.0, 0.0)  # passes (0, 1)
    rng = np.random.default_rng(0)
    random = roc_curve(rng.random(4000), rng.integers(0, 2, 4000))
    assert random.area == pytest.approx(0.5, abs=0.03)
    # anomaly distances: a sigmoid would tie 150 and 300; min-max scaling keeps their order
    assert roc_curve([10.0, 20.0, 150.0, 300.0], [0, 1, 0, 1]).area == pytest.approx(0.75)
    assert roc_curve([0.2, 0.8], [1, 1]) is None  # one class only: no ROC


def record(gt: list, det: list, difficult: list | None = None) -> dict:
    """gt: [(box, label)], det: [(box, label, score)]."""
    return {
        "image_id": 0,
        "gt": {
            "boxes": [b for b, _ in gt],
            "labels": [lab for _, lab in gt],
            "difficult": difficult or [False] * len(gt),
        },
        "detections": {
            "boxes": [b for b, _, _ in det],
            "labels": [lab for _, lab, _ in det],
            "scores": [s for _, _, s in det],
        },
    }


def test_pr_curve_of_known_matches() -> None:
    a, b, far = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]
    records = [
        # class 1: the 0.9 detection finds a, 0.8 finds nothing, 0.7 finds b, 0.6 repeats a (false positive)
        record([(a, 1), (b, 1)], [(a, 1, 0.9), (far, 1, 0.8), ([21, 21, 30, 30], 1, 0.7), (a, 1, 0.6)]),
        # a detection on a difficult box counts neither way; a class-2 box with a class-1 detection on it
        record([(a, 1), (b, 2)], [([0, 0, 10, 9], 1, 0.95), (b, 1, 0.5)], difficult=[True, False]),
    ]
    curve = detection_pr_curve(records, [1], "class 1")
    np.testing.assert_allclose(curve.x, [0.5, 0.5, 1.0, 1.0, 1.0])  # recall: 2 boxes of class 1
    np.testing.assert_allclose(curve.y, [1.0, 0.5, 2 / 3, 0.5, 0.4])  # precision after each detection
    assert curve.area == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)  # COCO: 101 recall points
    assert detection_pr_curve(records, [2]).area == 0.0  # its one box was never detected as class 2
    curves = detection_pr_curves(records, ["crack", "finger", "star_crack"])
    assert [c.label for c in curves] == ["crack", "finger"]  # star_crack has no box


def test_pr_curve_ap_agrees_with_the_logged_ap50() -> None:
    """On random detections the AP drawn equals torchmetrics' per-class AP@0.5 (the logged metric)."""
    gen = torch.Generator().manual_seed(3)
    preds, targets, records = [], [], []
    for _ in range(6):
        centres = torch.rand(4, 2, generator=gen) * 80
        gt_boxes = torch.cat([centres, centres + 15], dim=1)
        gt_labels = torch.randint(1, 3, (4,), generator=gen)
        jitter = torch.randn(7, 4, generator=gen) * 4
        det_boxes = torch.cat([gt_boxes, gt_boxes[:3]])[:7] + jitter
        det_boxes[:, 2:] = torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
        det_labels = torch.randint(1, 3, (7,), generator=gen)
        det_scores = torch.rand(7, generator=gen)
        targets.append(
            {"boxes": gt_boxes, "labels": gt_labels, "difficult": torch.zeros(4, dtype=torch.bool)}
        )
        preds.append({"boxes": det_boxes, "labels": det_labels, "scores": det_scores})
        records.append(
            {
                "gt": {"boxes": gt_boxes.tolist(), "labels": gt_labels.tolist(), "difficult": [False] * 4},
                "detections": {
                    "boxes": det_boxes.tolist(),
                    "labels": det_labels.tolist(),
                    "scores": det_scores.tolist(),
                },
            }
        )
    metrics = DetectionMetrics(["crack", "finger"])
    metrics.update(preds, targets)
    logged = metrics.compute()
    for curve in detection_pr_curves(records, ["crack", "finger"]):
        assert curve.area == pytest.approx(float(logged[f"ap_50/{curve.label}"]), abs=1e-6), curve.label
    assert coco_average_precision(np.array([]), np.array([])) == 0.0


def test_a_detection_inside_a_difficult_box_is_ignored_by_the_curve_and_matrix_as_by_the_map() -> None:
    """The logged mAP passes difficult boxes as COCO crowd regions, which ignore a detection
    whose own area lies inside one by at least half, whatever their IoU (here 0.04). The PR
    curve, whose AP is drawn as the logged one, and the confusion matrix must ignore it too,
    not count a false positive."""
    target = {
        "boxes": torch.tensor([[0.0, 0, 100, 100], [200, 200, 250, 250]]),
        "labels": torch.tensor([1, 1]),
        "difficult": torch.tensor([True, False]),
    }
    pred = {
        "boxes": torch.tensor([[10.0, 10, 30, 30], [200, 200, 250, 250]]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.9, 0.8]),
    }
    metrics = DetectionMetrics(["crack"])
    metrics.update([pred], [target])
    logged = float(metrics.compute()["ap_50/crack"])
    assert logged == pytest.approx(1.0)
    as_record = record(
        [(b, 1) for b in target["boxes"].tolist()],
        [(b, 1, s) for b, s in zip(pred["boxes"].tolist(), pred["scores"].tolist(), strict=True)],
        difficult=[True, False],
    )
    assert detection_pr_curve([as_record], [1]).area == pytest.approx(logged)
    counts = confusion_counts(pred, target, num_classes=1)
    assert counts.tolist() == [[1, 0], [0, 0]]  # the normal box found; no false positive
    # a detection mostly outside the difficult box is a false positive for all three
    outside = {**pred, "boxes": torch.tensor([[80.0, 80, 130, 130], [200, 200, 250, 250]])}
    metrics = DetectionMetrics(["crack"])
    metrics.update([outside], [target])
    as_record["detections"]["boxes"] = outside["boxes"].tolist()
    assert detection_pr_curve([as_record], [1]).area == pytest.approx(float(metrics.compute()["ap_50/crack"]))
    assert confusion_counts(outside, target, num_classes=1).tolist() == [[1, 0], [1, 0]]


def test_image_rows_of_an_anomaly_model_use_its_threshold() -> None:
    batch = {
        "image": torch.zeros(3, 1, 4, 4),
        "label": torch.tensor([0, 1, 1]),
        "index": torch.tensor([7, 3, 5]),
    }
    rows = image_rows(
        batch, {"scores": torch.tensor([1.0, 5.0, 2.5])}, 0, threshold=2.5, class_names=["ok", "bad"]
    )
    assert [(r["index"], r["target"], r["score"], r["predicted"]) for r in rows] == [
        (7, 0, 1.0, 0),
        (3, 1, 5.0, 1),
        (5, 1, 2.5, 1),
    ]
    four = image_rows(
        {"image": torch.zeros(1, 1, 4, 4), "label": torch.tensor([2])},
        {"probs": torch.tensor([[0.1, 0.2, 0.6, 0.1]])},
        10,
        None,
        ["0", "1/3", "2/3", "1"],
    )[0]
    assert four["index"] == 10 and four["predicted"] == 2 and four["score"] == pytest.approx(0.9)
    assert four["prob_2/3"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="neither 'probs' nor 'scores'"):
        image_rows(batch, {"anomaly_maps": torch.zeros(3, 1, 4, 4)}, 0, None, [])


def test_predictions_callback_never_fails_the_test(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Unreadable(L.LightningModule):
        def predict_step(self, batch: dict, batch_idx: int) -> None:
            raise RuntimeError("no predictions here")

    trainer = SimpleNamespace(world_size=1, is_global_zero=True, default_root_dir=str(tmp_path))
    module, callback = Unreadable(), TestPredictionsCallback()
    batch = {"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([0, 1])}
    callback.on_test_epoch_start(trainer, module)
    callback.on_test_batch_end(trainer, module, None, batch, 0)
    callback.on_test_batch_end(trainer, module, None, batch, 1)
    callback.on_test_epoch_end(trainer, module)
    assert not (tmp_path / "test").exists()
    assert "test predictions of Unreadable are not written: RuntimeError: no predictions here" in caplog.text


# --------------------------------------------------------------------- a multirun on disk
def write_job(job: Path, overrides: list[str], metrics: pd.DataFrame, test_files: dict[str, str]) -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "csv" / "version_0").mkdir(parents=True)
    metrics.to_csv(job / "csv" / "version_0" / "metrics.csv", index=False)
    for name, text in test_files.items():
        (job / "test").mkdir(exist_ok=True)
        (job / "test" / name).write_text(text)


def classifier_metrics(f1: float) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"epoch": 0, "step": 9, "train/loss_step": 0.9},
            {"epoch": 0, "step": 19, "train/loss_step": 0.7, "train/loss_epoch": 0.8},
            {"epoch": 0, "step": 19, "val/loss": 0.75, "val/f1": 0.5, "val/ap_50/crack": 0.1},
            {"epoch": 1, "step": 39, "train/loss_step": 0.5, "train/loss_epoch": 0.6},
            {"epoch": 1, "step": 39, "val/loss": 0.55, "val/f1": 0.6},
            {"epoch": 1, "step": 40, "test/f1": f1, "test/auroc": 0.8},
        ]
    )


def predictions_csv(scores: list[float], targets: list[int]) -> str:
    frame = pd.DataFrame(
        {
            "index": range(len(scores)),
            "target": targets,
            "score": scores,
            "predicted": [int(s >= 0.5) for s in scores],
        }
    )
    return frame.to_csv(index=False)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two classifier jobs (seeds 1, 2 of one configuration) and a detector job, as a multirun leaves them."""
    root = tmp_path / "sweep"
    classes = json.dumps({"class_names": ["normal", "defective"], "task": "classification"})
    targets = [0, 0, 1, 1, 1, 0]
    write_job(
        root / "0",
        ["model=classifier", "seed=1"],
        classifier_metrics(0.7),
        {
            "predictions.csv": predictions_csv([0.1, 0.2, 0.9, 0.8, 0.6, 0.3], targets),
            "classes.json": classes,
        },
    )
    write_job(
        root / "1",
        ["model=classifier", "seed=2"],
        classifier_metrics(0.9),
        {
            "predictions.csv": predictions_csv([0.6, 0.2, 0.4, 0.8, 0.6, 0.3], targets),
            "classes.json": classes,
        },
    )
    detections = [
        record(
            [([0, 0, 10, 10], 1), ([20, 20, 30, 30], 2)],
            [([0, 0, 10, 10], 1, 0.9), ([40, 40, 50, 50], 2, 0.4)],
        ),
        record([([5, 5, 15, 15], 2)], [([5, 5, 15, 15], 2, 0.8)]),
    ]
    metrics = pd.DataFrame(
        [{"epoch": 0, "step": 5, "train/loss_step": 2.0}, {"epoch": 0, "step": 6, "test/map_50": 0.6}]
    )
    confusion = "true \\ predicted,crack,finger,background\ncrack,1,0,0\nfinger,0,1,1\nbackground,0,1,0\n"
    write_job(
        root / "2",
        ["model=faster_rcnn", "seed=1"],
        metrics,
        {
            "detections.jsonl": "\n".join(json.dumps(r) for r in detections) + "\n",
            "confusion_matrix.csv": confusion,
            "classes.json": json.dumps({"class_names": ["crack", "finger"], "task": "detection"}),
        },
    )
    return root


def assert_png(path: Path, min_side: int = 200) -> None:
    picture = cv2.imread(str(path))
    assert picture is not None, f"{path} is not a readable image"
    assert min(picture.shape[:2]) >= min_side and picture.std() > 5, (path, picture.shape)


def test_report_of_a_multirun_draws_per_job_and_comparison_plots(sweep: Path) -> None:
    table = report(sweep, console=False)
    assert list(table["n"]) == [2, 1]  # the classifier's two seeds are one configuration
    expected = {
        "0/plots": {"training_curves", "roc", "confusion_matrix"},
        "2/plots": {"training_curves", "pr_curves", "confusion_matrix"},
        "plots": {"metrics", "roc", "pr"},
    }
    for directory, names in expected.items():
        assert {p.stem for p in (sweep / directory).glob("*.png")} == names, directory
    markdown = (sweep / "report.md").read_text()
    assert markdown.startswith("| model ")  # the table comes first, as before
    links = re.findall(r"\]\(([^)]+\.png)\)", markdown)
    assert {
        "plots/metrics.png",
        "plots/roc.png",
        "plots/pr.png",
        "0/plots/roc.png",
        "2/plots/pr_curves.png",
    } <= set(links)
    for link in links:
        assert_png(sweep / link)
    # what the bars show: mean ± std over the two seeds
    mean, std, count = aggregate_numbers(collect(sweep), ["test/f1"], None)
    assert mean["test/f1"].iloc[0] == pytest.approx(0.8) and std["test/f1"].iloc[0] == pytest.approx(
        0.1414, abs=1e-4
    )
    # what the per-job plots were drawn from
    predictions = pd.read_csv(sweep / "0" / "test" / "predictions.csv")
    np.testing.assert_array_equal(classification_confusion(predictions, 2), [[3, 0], [0, 3]])
    history = training_history(pd.read_csv(sweep / "0" / "csv" / "version_0" / "metrics.csv"))
    assert list(history["loss"].columns) == ["step", "train/loss_step", "train/loss_epoch", "val/loss"]
    assert list(history["val"].columns) == ["epoch", "val/f1"]  # per-class values left out


def test_a_job_that_logged_no_test_metric_is_not_counted_in_its_mean(sweep: Path) -> None:
    """A job killed before its test (out of memory, a time limit, Ctrl-C: no ``FAILED`` file)
    leaves validation rows only; the mean of the others must not claim it among its replicates."""
    killed = classifier_metrics(0.0).iloc[:-1]  # everything but the test row
    write_job(sweep / "3", ["model=classifier", "seed=3"], killed, {})
    frame = collect(sweep)
    mean, std, count = aggregate_numbers(frame, ["test/f1", "val/f1"], None)
    row = list(mean.index).index("classifier")
    assert count["test/f1"].iloc[row] == 2 and count["val/f1"].iloc[row] == 3
    table = aggregate(frame, ["test/f1"], None).set_index("model")
    assert table.loc["classifier", "n"] == 3
    assert table.loc["classifier", "test/f1"] == "0.8000 ± 0.1414 (n=2)"


def loss_by_model_sweep(root: Path) -> pd.DataFrame:
    """Four jobs: loss ce / sdfl × model a / b, one seed each, test/f1 = 0.1 · (job number + 1)."""
    for i, (loss, model) in enumerate([("ce", "a"), ("ce", "b"), ("sdfl", "a"), ("sdfl", "b")]):
        metrics = pd.DataFrame([{"epoch": 0, "step": 1, "test/f1": 0.1 * (i + 1)}])
        write_job(root / str(i), [f"loss={loss}", f"model={model}", "seed=1"], metrics, {})
    return collect(root)


def test_a_by_that_pools_other_overrides_says_which(tmp_path: Path) -> None:
    """``--by loss`` on a loss × model sweep averages each loss over both models: the table
    must say that its rows pool ``model``, not pass the mix off as replicates of one setting."""
    frame = loss_by_model_sweep(tmp_path)
    table = aggregate(frame, ["test/f1"], ["loss"]).set_index("loss")
    assert table.loc["ce", "test/f1"] == "0.1500 ± 0.0707"
    assert table.loc["ce", "pooled over"] == "model" and table.loc["sdfl", "pooled over"] == "model"
    report(tmp_path, ["test/f1"], ["loss"], plots=False, console=False)
    assert "pooled over" in (tmp_path / "report.md").read_text()
    # grouped by every varying override, nothing is pooled and the table has no such column
    assert "pooled over" not in aggregate(frame, ["test/f1"], ["loss", "model"]).columns
    assert "pooled over" not in aggregate(frame, ["test/f1"], None).columns


def test_an_unknown_by_key_is_a_short_error(tmp_path: Path) -> None:
    loss_by_model_sweep(tmp_path)
    with pytest.raises(
        ReportError, match=r"--by: no job overrides \['lr'\]; the overrides are \['loss', 'model', 'seed'\]"
    ):
        report(tmp_path, ["test/f1"], ["loss", "lr"], plots=False, console=False)


def test_the_final_metrics_come_from_the_latest_csv_version(tmp_path: Path) -> None:
    """A run resumed ten times has ``version_10`` after ``version_9``, not after ``version_1``."""
    job = tmp_path / "job"
    for version, f1 in ((1, 0.1), (2, 0.2), (10, 0.9)):
        (job / "csv" / f"version_{version}").mkdir(parents=True)
        pd.DataFrame([{"epoch": version, "step": version, "test/f1": f1}]).to_csv(
            job / "csv" / f"version_{version}" / "metrics.csv", index=False
        )
    assert final_metrics(job)["test/f1"] == pytest.approx(0.9)


def test_a_later_fit_without_a_test_drops_the_earlier_tests_numbers(tmp_path: Path) -> None:
    """A run resumed in its own directory trains on (version_1) and stops before its test: the
    test numbers of version_0 belong to weights that no longer are the run's, and a report must
    not show them as its result. A later test (version_2) counts again."""
    job = tmp_path / "job"

    def version(number: int, rows: list[dict]) -> None:
        (job / "csv" / f"version_{number}").mkdir(parents=True)
        pd.DataFrame(rows).to_csv(job / "csv" / f"version_{number}" / "metrics.csv", index=False)

    version(0, [{"epoch": 0, "step": 9, "val/f1": 0.5}, {"epoch": 0, "step": 9, "test/f1": 0.6}])
    version(1, [{"epoch": 1, "step": 19, "val/f1": 0.7}])
    metrics = final_metrics(job)
    assert metrics["val/f1"] == pytest.approx(0.7) and "test/f1" not in metrics
    # the earlier test's files are not drawn as the job's either
    (job / "test").mkdir()
    pd.DataFrame({"target": [0, 1, 1, 0], "score": [0.1, 0.9, 0.8, 0.3], "predicted": [0, 1, 1, 0]}).to_csv(
        job / "test" / "predictions.csv", index=False
    )
    drawn = job_plots(job)
    assert "roc" not in drawn and "confusion_matrix" not in drawn and "training_curves" in drawn
    version(2, [{"epoch": 1, "step": 19, "test/f1": 0.8}])  # train=false ckpt_path=...: a test only
    assert final_metrics(job)["test/f1"] == pytest.approx(0.8)
    assert {"roc", "confusion_matrix"} <= set(job_plots(job))


def test_report_cli_keeps_its_table_only_mode(sweep: Path) -> None:
    main([str(sweep), "--no-plots", "--metrics", "test/f1", "--no-aggregate"])
    assert not list(sweep.rglob("*.png"))
    assert "## Plots" not in (sweep / "report.md").read_text()
    assert len(pd.read_csv(sweep / "report.csv")) == 3


def test_report_names_a_bad_test_file(sweep: Path) -> None:
    (sweep / "1" / "test" / "predictions.csv").write_text("index,score\n0,0.5\n")
    with pytest.raises(
        ReportError, match=r"1/test/predictions.csv: columns \['predicted', 'target'\] missing"
    ):
        job_plots(sweep / "1")
    (sweep / "2" / "test" / "detections.jsonl").write_text('{"gt": \n')
    with pytest.raises(ReportError, match="2/test/detections.jsonl, line 1: not JSON"):
        job_plots(sweep / "2")


# ------------------------------------------------------------ predictions of a real test run
def test_a_detector_test_run_writes_its_detections(make_cfg, fast_data_overrides, tmp_path: Path) -> None:
    cfg = make_cfg(
        "train.yaml",
        [
            "model=faster_rcnn",
            "data=pvel",
            "model.detector.neck.out_channels=32",
            "model.detector.box_score_thresh=0.0",
        ]
        + FAST_DETECTOR_OVERRIDES
        + ["model.detector.min_size=32", "model.detector.max_size=32"]  # boxes come back in the 64-px input
        + fast_data_overrides("pvel"),
    )
    datamodule, model = build_datamodule_and_model(cfg)
    run_dir = Path(cfg.paths.output_dir)
    trainer = L.Trainer(
        default_root_dir=run_dir,
        callbacks=[TestPredictionsCallback()],
        logger=False,
        limit_test_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(model, datamodule=datamodule)
    records = read_detections(run_dir / "test" / "detections.jsonl")
    dataset = datamodule.test_dataloader().dataset
    assert len(records) == 4  # 2 batches of 2
    for r in records:
        _, target = dataset[r["image_id"]]
        np.testing.assert_allclose(
            np.reshape(r["gt"]["boxes"], (-1, 4)), target["boxes"].numpy().reshape(-1, 4), atol=0.01
        )
        assert r["gt"]["labels"] == target["labels"].tolist()
        assert len(r["detections"]["boxes"]) == len(r["detections"]["scores"]) > 0
    classes = json.loads((run_dir / "test" / "classes.json").read_text())
    assert classes["task"] == "detection" and classes["class_names"] == list(model.class_names)
    drawn = job_plots(run_dir)
    assert "confusion_matrix" in drawn  # from the detector's own confusion_matrix.csv
    assert "pr_curves" in drawn or not any(r["gt"]["labels"] for r in records)


# ---------------------------------------------------------- the real multirun, end to end
@pytest.mark.slow
def test_report_of_a_real_two_job_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "elinspect.train", "-m", "model=classifier", "seed=1,2",
        "data.image_size=64", "data.batch_size=8", "data.num_workers=0", "data.augment=null",
        "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=3", "logger=csv", "extras.print_config=false",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        predictions = pd.read_csv(sweep / job / "test" / "predictions.csv")
        assert len(predictions) == 24  # 3 test batches of 8
        logged = (
            pd.read_csv(sweep / job / "csv" / "version_0" / "metrics.csv")["test/auroc"].dropna().iloc[-1]
        )
        assert roc_curve(predictions["score"], predictions["target"]).area == pytest.approx(logged, abs=1e-6)
    done = subprocess.run(
        [sys.executable, "-m", "elinspect.report", str(sweep)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    links = re.findall(r"\]\(([^)]+\.png)\)", (sweep / "report.md").read_text())
    assert {"plots/roc.png", "plots/metrics.png", "0/plots/roc.png", "1/plots/training_curves.png"} <= set(
        links
    )
    for link in links:
        assert_png(sweep / link)
