"""Train a model, then test its best checkpoint.

    python -m elinspect.train                                  # conf/train.yaml defaults
    python -m elinspect.train model=classifier data=elpv loss=focal trainer.max_epochs=5
    python -m elinspect.train -m loss=ce,focal seed=1,2        # one job per combination
    python -m elinspect.train train=false ckpt_path=<file.ckpt>  # test a checkpoint only
    python -m elinspect.train trainer=ddp trainer.devices=4      # distributed (conf/trainer/ddp.yaml)

Returns the ``optimized_metric`` so Hydra sweepers (Optuna, ...) can optimise it: the
validation score of the checkpoint the job tests (the metric must be the one that picks it,
``model.monitor``); a job that
failed, or whose metric is NaN, returns None, which the Optuna sweeper records as a failed
trial (the study goes on; a NaN would stop it: optuna refuses NaN and the sweeper's fallback
``tell`` then raises).

Under DDP with ``strategy: ddp`` Lightning re-runs this command for ranks 1..N-1: they build
the same datamodule, model and trainer, and everything written outside the Trainer (config.yaml,
the config tree, the console tables) is written by rank 0 only; inside it, the loggers and
ModelCheckpoint are rank-0-only by Lightning's design.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from rich.console import Console

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.build import (
    apply_stored_config,
    build_datamodule_and_model,
    build_trainer,
    command_line_overrides,
    log_hyperparameters,
    save_resolved_config,
)
from elinspect.models.base import CHECKPOINT_KEY
from elinspect.utils.checkpoint import check_checkpoint, read_checkpoint
from elinspect.utils.errors import ConfigError, UserError, user_errors
from elinspect.utils.library_warnings import silence_library_warnings
from elinspect.utils.outputs import ensure_writable_dir, guard_output_dir
from elinspect.utils.rich_utils import metrics_table
from elinspect.utils.task import extras, is_multirun, metric_value, print_config, task_wrapper

log = logging.getLogger(__name__)

silence_library_warnings()


class DistributedLaunchError(UserError, RuntimeError):
    """A distributed setting that cannot work with the way this job was launched."""


def check_distributed_launch(cfg: DictConfig) -> None:
    """Refuse ``strategy=ddp`` on several devices inside a local multirun before anything runs.

    Lightning starts ranks 1..N-1 of ``strategy: ddp`` by re-running the command line, which in
    a multirun (``-m``) is the whole sweep, and the sweep's later jobs would find the first job's
    rank environment. A cluster that starts the ranks itself (SLURM through
    ``hydra/launcher=submitit_slurm``, torchrun) is fine; locally, ``trainer=ddp_spawn`` is.
    """
    trainer = cfg.get("trainer") or {}
    if trainer.get("strategy") != "ddp" or not is_multirun():
        return
    if trainer.get("devices") == 1 and trainer.get("num_nodes", 1) == 1:
        return
    if SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return
    launcher = HydraConfig.get().launcher.get("_target_", "") if HydraConfig.initialized() else ""
    raise DistributedLaunchError(
        f"trainer.strategy=ddp cannot run inside a local multirun (launcher {launcher.rsplit('.', 1)[-1]}): "
        "Lightning would re-run the whole sweep for every extra rank. Use trainer=ddp_spawn, or "
        "hydra/launcher=submitit_slurm (SLURM starts the ranks), or one device per job."
    )


def as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    output_dir = Path(cfg.paths.output_dir)
    check_distributed_launch(cfg)
    if cfg.get("train"):
        guard_output_dir(output_dir, cfg.get("ckpt_path"))
    ensure_writable_dir(output_dir)
    checkpoint = check_checkpoint(cfg.get("ckpt_path"), output_dir / "checkpoints")
    if cfg.get("train"):
        check_resumed_averaging(cfg, checkpoint)
    elif cfg.get("ckpt_path") and checkpoint is None:  # ckpt_path=last, and nothing to find
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: {output_dir / 'checkpoints'} holds no last.ckpt to test with "
            "train=false; give the checkpoint file (ckpt_path=<run>/checkpoints/<file>.ckpt)"
        )
    restored = use_checkpoint_config(cfg, checkpoint)
    del checkpoint  # the trainer reads it again
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg, output_dir)

    datamodule, model = build_datamodule_and_model(cfg, restored)
    trainer = build_trainer(cfg, model)
    if cfg.get("train"):
        check_optimized_metric(cfg.get("optimized_metric"), trainer)
    print_config(cfg)
    log_hyperparameters(trainer, model, cfg)

    if cfg.get("train"):
        log.info("training")
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = as_floats(trainer.callback_metrics)
    metrics.update(best_checkpoint_score(trainer))

    if cfg.get("test"):
        best = tested_checkpoint(cfg, trainer)
        if not best:
            log.warning(
                "no best checkpoint (fast_dev_run, train=false without ckpt_path, or no checkpoint "
                "callback): testing the current weights"
            )
        log.info("testing %s", best or "the current weights")
        carry_csv_columns(trainer)
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        test_metrics = as_floats(trainer.callback_metrics)
        metrics.update(test_metrics)
        label = "best checkpoint" if cfg.get("train") else "tested checkpoint"
        print_test_metrics(test_metrics, getattr(datamodule, "protocol", None), best and f"{label}: {best}")
    print_on_rank_zero(f"run outputs: {output_dir}")
    return metrics, {"trainer": trainer, "model": model, "datamodule": datamodule}


def check_resumed_averaging(cfg: DictConfig, checkpoint: dict[str, Any] | None) -> None:
    """Refuse to resume a fit of ``callbacks=[default,ema]`` without the average: its checkpoint
    holds the averaged weights as the model's and the raw ones aside (``current_model_state``),
    and without the callback training would go on from the average as if it were the raw
    weights, no longer averaging."""
    if checkpoint is None or "current_model_state" not in checkpoint:
        return
    nodes = (cfg.get("callbacks") or {}).values()
    targets = [str(node.get("_target_", "")) for node in nodes if isinstance(node, DictConfig)]
    if any(target.lower().endswith("emaweightaveraging") for target in targets):
        return
    raise ConfigError(
        f"{cfg.ckpt_path} was trained with an average of the weights: resume it with "
        "callbacks=[default,ema] (and the same callbacks.ema options), or test it with train=false"
    )


def use_checkpoint_config(cfg: DictConfig, checkpoint: dict[str, Any] | None) -> dict[str, str]:
    """A run given a checkpoint (a resumed fit, or ``train=false`` to test it) goes on with the
    model, data, loss and seed it was trained with, as eval does: the resume command names none
    of them, and the defaults would continue it on another split, target or (under DDP) data
    order. Groups, keys and a seed named on the command line still win. Returns the
    checkpoint's choices of the groups it set."""
    stored = ((checkpoint or {}).get(CHECKPOINT_KEY) or {}).get("config")
    if not stored:
        return {}
    restored = apply_stored_config(cfg, stored, command_line_overrides())
    log.info("model, data, loss and seed as stored in %s (with this command line's overrides)", cfg.ckpt_path)
    return restored


def carry_csv_columns(trainer: L.Trainer) -> None:
    """Let the test append its columns to the fit's metrics.csv under ``ddp_spawn``.

    A spawn strategy gives each stage's processes a fresh copy of this process's loggers, whose
    CSV writer has not seen the columns the fit's processes wrote; Lightning's writer then
    fails to add the test columns to the file ("dict contains fields not in fieldnames").
    Seeding the writer with the file's header makes it rewrite the file with every column.
    """
    if rank_zero_only.rank != 0:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        writer = logger.experiment
        path = Path(writer.metrics_file_path)
        if writer.metrics_keys or not path.is_file():
            continue
        with path.open(newline="") as file:
            writer.metrics_keys = sorted(next(csv.reader(file), []))


def check_optimized_metric(name: str | None, trainer: L.Trainer) -> None:
    """Refuse a sweep metric other than the one that picks the tested checkpoint: the value
    returned to the sweeper is the tested checkpoint's (:func:`best_checkpoint_score`), and a
    metric the checkpoint callback does not track is known only for the last epoch."""
    checkpoint = trainer.checkpoint_callback
    monitor = getattr(checkpoint, "monitor", None)
    if name and monitor and name != monitor:
        raise ConfigError(
            f"optimized_metric={name} but the tested checkpoint is chosen by {monitor}: a sweep "
            f"would rank jobs by another epoch's score than the one tested. Set "
            f"model.monitor={name} (the checkpoint and the sweep follow it), or leave "
            "optimized_metric unset."
        )


def best_checkpoint_score(trainer: L.Trainer) -> dict[str, float]:
    """``{monitor: score}`` of the fit's best checkpoint, the one the test loads (after a fit
    ``trainer.callback_metrics`` holds the last epoch's); empty without a monitored checkpoint,
    where the last epoch's weights are what is tested. After a ``ddp_spawn`` fit Lightning
    hands the main process the best checkpoint's path but not its score: it is read from the
    checkpoint, whose callback state holds it."""
    checkpoint = trainer.checkpoint_callback
    monitor = getattr(checkpoint, "monitor", None)
    if not monitor:
        return {}
    score = checkpoint.best_model_score
    if score is None and checkpoint.best_model_path:
        saved = read_checkpoint(checkpoint.best_model_path, mmap=True).get("callbacks") or {}
        score = (saved.get(checkpoint.state_key) or {}).get("best_model_score")
    return {} if score is None else {monitor: float(score)}


def tested_checkpoint(cfg: DictConfig, trainer: L.Trainer) -> str:
    """What the test loads: the fit's best checkpoint; without a fit (``train=false``), the
    given ``ckpt_path``; "" for the current weights."""
    if not cfg.get("train"):
        return str(cfg.get("ckpt_path") or "")
    return trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""


@rank_zero_only
def print_on_rank_zero(text: str) -> None:
    Console().print(text)


@rank_zero_only
def print_test_metrics(metrics: dict[str, float], protocol: str | None, checkpoint_line: str) -> None:
    console = Console()
    console.print(
        metrics_table(
            {k: v for k, v in metrics.items() if k.startswith("test/")},
            title="test metrics",
            caption=protocol,
        )
    )
    if checkpoint_line:
        console.print(checkpoint_line)


def sweeper_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The optimised metric for the sweeper; None when the job failed or the value is NaN.

    Hydra's Optuna sweeper marks a trial FAILED when the value is not a float (None) and the
    study goes on; a NaN would end the study instead (optuna refuses NaN values, and the
    sweeper's fallback ``tell`` with the same value raises outside its error handling).
    """
    if name and name not in metrics and not any(k.startswith(name.split("/")[0] + "/") for k in metrics):
        # no metric of its split was logged (e.g. trainer.limit_val_batches=0): the run itself
        # is complete, there is only nothing to report to a sweeper
        log.warning("the optimised metric %s was not logged (that stage did not run): returning None", name)
        return None
    value = metric_value(metrics, name)
    if value is not None and math.isnan(value):
        log.warning("the optimised metric %s is NaN for this job (or the job failed): returning None", name)
        return None
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        extras(cfg)
        metrics, _ = train(cfg)
    if not cfg.get("train"):
        return None  # nothing was optimised
    return sweeper_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
