"""Train a model, then test its best checkpoint.

    python -m elinspect.train                                  # conf/train.yaml defaults
    python -m elinspect.train model=classifier data=elpv loss=focal trainer.max_epochs=5
    python -m elinspect.train -m loss=ce,focal seed=1,2        # one job per combination

Returns the ``optimized_metric`` so Hydra sweepers (Optuna, ...) can optimise it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig
from rich.console import Console

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.utils.build import (
    build_datamodule_and_model,
    build_trainer,
    log_hyperparameters,
    save_resolved_config,
)
from elinspect.utils.rich_utils import metrics_table
from elinspect.utils.task import extras, metric_value, task_wrapper

log = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    """The run directory already holds checkpoints of another run."""


def guard_output_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to write a new run over checkpoints already in ``output_dir``."""
    ckpt_dir = output_dir / "checkpoints"
    if ckpt_path is None and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise OutputExistsError(
            f"{ckpt_dir} already holds checkpoints of an earlier run. Resume it with ckpt_path=last, "
            "or leave hydra.run.dir at its default (a new timestamped directory)."
        )


def as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    output_dir = Path(cfg.paths.output_dir)
    guard_output_dir(output_dir, cfg.get("ckpt_path"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg, output_dir)

    datamodule, model = build_datamodule_and_model(cfg)
    trainer = build_trainer(cfg)
    log_hyperparameters(trainer, model, cfg)

    if cfg.get("train"):
        log.info("training")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = as_floats(trainer.callback_metrics)

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning(
                "no best checkpoint (fast_dev_run, or no checkpoint callback): testing the current weights"
            )
        log.info("testing %s", best or "the current weights")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None)
        test_metrics = as_floats(trainer.callback_metrics)
        metrics.update(test_metrics)
        protocol = getattr(datamodule, "protocol", None)
        console = Console()
        console.print(
            metrics_table(
                {k: v for k, v in test_metrics.items() if k.startswith("test/")},
                title="test metrics",
                caption=protocol,
            )
        )
        if best:
            console.print(f"best checkpoint: {best}")
    Console().print(f"run outputs: {output_dir}")
    return metrics, {"trainer": trainer, "model": model, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    metrics, _ = train(cfg)
    if not cfg.get("train"):
        return None  # nothing was optimised
    value = metric_value(metrics, cfg.get("optimized_metric"))
    if value is not None and math.isnan(value):
        log.warning("the optimised metric %s is NaN for this job", cfg.get("optimized_metric"))
    return value


if __name__ == "__main__":
    main()
