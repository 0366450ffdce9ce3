"""W&B dashboards: runs grouped by experiment, typed by task, with config and report as artifacts (issue 8).

**Grouping** happens when the W&B run starts, so it is part of the logger's config
(``conf/logger/wandb.yaml``), computed by :func:`run_group` and :func:`run_job_type`
(``_target_`` nodes that Hydra calls when it instantiates the logger):

* ``group``: the experiment (``experiment=ebba_ablation``), with the multirun directory's name
  added in a multirun (``ebba_ablation/2026-01-02_10-00-00-000000``), or the multirun
  directory's name alone; a single run without an experiment is grouped by ``task_name``;
* ``job_type``: ``<task_name>-<model task>``, e.g. ``train-detection``, ``eval-classification``;
* ``tags``: the run's ``tags``, plus ``model:<choice>``, ``data:<choice>``, ``loss:<choice>``
  added by this callback.

**At the end of the run** :class:`WandbDashboardCallback` logs, to every
:class:`~lightning.pytorch.loggers.WandbLogger` of the trainer (rank zero only):

* after the first stage that ends (fit in ``train``, test in ``eval``) a ``config`` artifact
  ``config-<run id>``: the resolved ``config.yaml`` the entry point writes
  (:func:`~elinspect.build.save_resolved_config`) and Hydra's ``.hydra/{config,overrides,hydra}.yaml``;
* after a test, the run's report (:func:`elinspect.reporting.report` on the run directory:
  ``report.md``, ``report.csv``, ``plots/*.png``) and the test outputs
  (``test/predictions.csv`` or ``test/detections.jsonl``, ``test/confusion_matrix.*``) as a
  ``report`` artifact ``report-<run id>``, and each plot as an image panel under
  ``report/<name>``.

Validation pictures (detections, heatmaps, GAN samples) reach W&B through
:func:`elinspect.callbacks.pictures.save_and_log_pictures`. Without a WandbLogger this
callback does nothing. Offline (no API key: ``elinspect.wandb_offline``) everything lands in
``<run>/wandb/offline-run-*/`` and W&B's artifact staging directory (``$WANDB_DATA_DIR``);
``wandb sync <run>/wandb/offline-run-*`` uploads it later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from elinspect.reporting import PLOTS_DIR, report

log = logging.getLogger(__name__)

CONFIG_FILES = ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")
REPORT_FILES = ("report.md", "report.csv")
TEST_FILES = (
    "test/predictions.csv",
    "test/detections.jsonl",
    "test/classes.json",
    "test/confusion_matrix.csv",
    "test/confusion_matrix.png",
)
TAGGED_GROUPS = ("model", "data", "loss")


def is_multirun(mode: Any) -> bool:
    """``hydra.mode`` (a ``RunMode`` or its name) is ``MULTIRUN``."""
    return str(getattr(mode, "name", mode)).upper().endswith("MULTIRUN")


def run_group(
    task_name: str, experiment: str | None = None, mode: Any = None, sweep_dir: str | None = None
) -> str:
    """The W&B group of a run (see the module docstring); ``mode`` defaults to Hydra's ``hydra.mode``
    (read here, not interpolated in the config, so that no enum lands in the logged hyperparameters)."""
    if mode is None and HydraConfig.initialized():
        mode = HydraConfig.get().mode
    parts = [experiment] if experiment else []
    if is_multirun(mode) and sweep_dir:
        name = Path(str(sweep_dir)).name
        if name and name not in parts:
            parts.append(name)
    return "/".join(parts) or task_name


def run_job_type(task_name: str, model_target: str | None = None) -> str:
    """``<task_name>-<task of the model class>`` (``train-detection``); ``task_name`` when the
    model class declares no task."""
    task = None
    if model_target:
        try:
            task = getattr(get_class(model_target), "task", None)
        except Exception as err:  # an unimportable model fails later, with its own message
            log.debug("no task for %s: %s", model_target, err)
    return f"{task_name}-{task}" if task else task_name


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def choice_tags(pl_module: L.LightningModule) -> list[str]:
    """``model:<choice>``, ``data:<choice>``, ``loss:<choice>`` from the run config the module carries."""
    config = getattr(pl_module, "run_config", None) or {}
    choices = config.get("choices") or {}
    return [f"{group}:{choices[group]}" for group in TAGGED_GROUPS if choices.get(group)]


class WandbDashboardCallback(L.Callback):
    """Tags, config and report artifacts, report plots as panels (see the module docstring).

    Args:
        log_config: log the ``config`` artifact.
        log_report: after a test, write the run's report and log it as a ``report`` artifact.
        report_images: also log each report plot as an image panel.
        config_files: run-directory-relative files of the ``config`` artifact (missing ones skipped).
    """

    def __init__(
        self,
        log_config: bool = True,
        log_report: bool = True,
        report_images: bool = True,
        config_files: Sequence[str] = CONFIG_FILES,
    ) -> None:
        super().__init__()
        self.log_config = log_config
        self.log_report = log_report
        self.report_images = report_images
        self.config_files = tuple(config_files)
        self._config_logged = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for logger in wandb_loggers(trainer):
            run = logger.experiment
            tags = choice_tags(pl_module)
            if tags:
                run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))
            monitor = getattr(pl_module, "monitor", None)
            if monitor:
                mode = getattr(pl_module, "monitor_mode", "max")
                # the run summary keeps the best value; the x-axis stays Lightning's global step
                run.define_metric(
                    monitor, step_metric="trainer/global_step", summary="max" if mode == "max" else "min"
                )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        try:
            if self.log_config and not self._config_logged:
                self._config_logged = True
                for logger in loggers:
                    self._log_files(logger, "config", run_dir, self.config_files)
            if stage == "test" and self.log_report:
                self._log_report(trainer, loggers, run_dir)
        except Exception as err:  # the dashboard must not fail a finished run
            log.warning("W&B dashboard of %s incomplete: %s: %s", run_dir, type(err).__name__, err)

    @staticmethod
    def _log_files(logger: WandbLogger, kind: str, run_dir: Path, files: Sequence[str]) -> Any:
        import wandb

        present = [name for name in files if (run_dir / name).is_file()]
        if not present:
            log.warning("W&B %s artifact: none of %s in %s", kind, list(files), run_dir)
            return None
        run = logger.experiment
        artifact = wandb.Artifact(
            f"{kind}-{run.id}",
            type=kind,
            metadata={"run_dir": str(run_dir), "group": run.group, "job_type": run.job_type},
        )
        for name in present:
            artifact.add_file(str(run_dir / name), name=name)
        run.log_artifact(artifact)
        return artifact

    def _log_report(self, trainer: L.Trainer, loggers: list[WandbLogger], run_dir: Path) -> None:
        for logger in trainer.loggers:  # the report reads the CSV log, which Lightning flushes after teardown
            if isinstance(logger, CSVLogger):
                logger.save()
        try:
            report(run_dir, console=False)
        except Exception as err:  # a report problem must not fail the finished run
            log.warning("no report for the W&B dashboard of %s: %s", run_dir, err)
            return
        pictures = sorted((run_dir / PLOTS_DIR).glob("*.png"))
        files = [*REPORT_FILES, *TEST_FILES, *(f"{PLOTS_DIR}/{p.name}" for p in pictures)]
        for logger in loggers:
            self._log_files(logger, "report", run_dir, files)
            if self.report_images:
                for picture in pictures:
                    logger.log_image(key=f"report/{picture.stem}", images=[str(picture)])
