"""W&B dashboards: grouping and job types from the config, and an offline run that holds the
config and report artifacts, the report's image panels and the test predictions they come from."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from elinspect.callbacks.wandb_dashboard import WandbDashboardCallback, run_group, run_job_type
from elinspect.models.classification.module import ClassifierModule
from elinspect.plots import roc_curve
from elinspect.train import train
from elinspect.utils.instantiate import instantiate_loggers
from tests.conftest import FAST_DATA_OVERRIDES
from tests.wandb_records import record_payloads


def no_second_pass(*args, **kwargs):
    raise AssertionError("predict_step was called during the test: test_step's outputs were not used")


def test_runs_are_grouped_by_experiment_and_typed_by_task(make_cfg) -> None:
    assert run_group("train") == "train"
    assert run_group("train", experiment="ebba_ablation") == "ebba_ablation"
    sweep = "logs/train/multiruns/2026-01-02_10-00-00-000001"
    assert run_group("train", None, RunMode.MULTIRUN, sweep) == "2026-01-02_10-00-00-000001"
    assert (
        run_group("train", "ebba_ablation", "MULTIRUN", sweep) == "ebba_ablation/2026-01-02_10-00-00-000001"
    )
    assert run_group("train", "ganae_ablation", RunMode.MULTIRUN, "logs/x/ganae_ablation") == "ganae_ablation"
    assert run_group("train", "ebba_pvel", RunMode.RUN, sweep) == "ebba_pvel"
    assert run_job_type("train", "elinspect.models.detection.DetectionModule") == "train-detection"
    assert run_job_type("eval", "elinspect.models.classification.ClassifierModule") == "eval-classification"
    assert run_job_type("predict", None) == "predict"
    # what conf/logger/wandb.yaml hands to the logger (the run itself starts later, offline)
    cfg = make_cfg("train.yaml", ["experiment=elpv_classifier", "logger=wandb"])
    wandb_logger = next(
        lg for lg in instantiate_loggers(cfg.logger, cfg.paths.output_dir) if isinstance(lg, WandbLogger)
    )
    init = wandb_logger._wandb_init
    assert (init["group"], init["job_type"], list(init["tags"])) == (
        "elpv_classifier",
        "train-classification",
        ["elpv", "classifier", "semacnn-table1"],
    )
    assert wandb_logger._offline


def test_dashboard_callback_is_a_no_op_without_wandb(tmp_path: Path) -> None:
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), enable_progress_bar=False)
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    callback = WandbDashboardCallback()
    callback.setup(trainer, L.LightningModule(), "fit")
    callback.teardown(trainer, L.LightningModule(), "test")
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "wandb").exists()


def test_a_tested_run_leaves_predictions_report_and_wandb_artifacts(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging stays in the test
    cfg = make_cfg(
        "train.yaml",
        [
            "model=classifier",
            *FAST_DATA_OVERRIDES["elpv"],
            "data.image_size=32",
            "data.augment=null",
            "trainer.num_sanity_val_steps=0",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=3",
            "logger=wandb",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.model_checkpoint=null",  # the test uses the trained weights as they are
        ],
    )
    # the test-predictions callback takes the probabilities test_step returns: no second forward pass
    monkeypatch.setattr(ClassifierModule, "predict_step", no_second_pass)
    metrics, _ = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    # test predictions on disk agree with the logged test metrics
    predictions = pd.read_csv(run_dir / "test" / "predictions.csv")
    assert list(predictions.columns[:4]) == ["index", "target", "score", "predicted"]
    assert len(predictions) == 24 and predictions["index"].is_unique  # 3 test batches of 8
    assert roc_curve(predictions["score"], predictions["target"]).area == pytest.approx(
        metrics["test/auroc"], abs=1e-6
    )
    accuracy = (predictions["predicted"] == predictions["target"]).mean()
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)

    # the run's report, written for the dashboard
    assert "test/auroc" in (run_dir / "report.md").read_text()
    plots = {p.stem for p in (run_dir / "plots").glob("*.png")}
    assert plots == {"training_curves", "roc", "confusion_matrix"}

    # the offline W&B run: group, job type, choice tags, both artifacts and the report panels
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = b"".join(record_payloads(next(runs[0].glob("*.wandb"))))
    run_id = runs[0].name.rsplit("-", 1)[-1]
    for expected in (b"train-classification", b"model:classifier", b"data:elpv", f"config-{run_id}".encode()):
        assert expected in records, expected
    assert f"report-{run_id}".encode() in records
    for name in (b"config.yaml", b"report.md", b"test/predictions.csv", b"plots/roc.png"):
        assert name in records, name
    panels = {
        re.sub(r"_\d+_[0-9a-f]+$", "", p.stem)
        for p in (runs[0] / "files" / "media" / "images" / "report").glob("*.png")
    }
    assert panels == plots
    staged = [p.read_bytes() for p in (tmp_path / "wandb-data").rglob("*") if p.is_file()]
    assert (run_dir / "config.yaml").read_bytes() in staged  # the config artifact's copy, synced later
    assert (run_dir / "test" / "predictions.csv").read_bytes() in staged
