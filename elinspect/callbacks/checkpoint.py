"""The run's checkpoint callback: Lightning's ``ModelCheckpoint`` with a ``last.ckpt`` that is
the last epoch, quiet under ``fast_dev_run``.

* **``last.ckpt`` after every save point.** Since Lightning 2.6, ``save_last=True`` writes
  ``last.ckpt`` only at a step where a top-k checkpoint is saved too. With the run's settings (a
  monitored metric, ``save_top_k: 1``) it was therefore a copy of the best checkpoint, and
  resuming an interrupted run from it (``ckpt_path=.../last.ckpt``) silently went back to the
  best epoch. :class:`RunCheckpoint` writes it wherever Lightning checks for a save (the end of
  validation, or of the training epoch when there is no validation) and has not saved at that
  step already.
* **Nothing at the end of a ``fast_dev_run`` fit.** ``fast_dev_run`` is a smoke test: Lightning
  announces "Logging and checkpointing is suppressed" and skips every periodic save, but its
  ``on_train_end`` writes ``last.ckpt`` when ``save_last`` is on and no save happened yet, so a
  smoke run of a detector would still write a ~250 MB checkpoint.
* **The ranking survives a resume into a new run directory.** The README's resume,
  ``ckpt_path=<old run>/checkpoints/last.ckpt``, writes into a new directory; Lightning then keeps
  only ``best_model_path`` and drops the best score, so the first epoch after the resume became
  "best" whatever its score, and the test loaded it. :class:`RunCheckpoint` carries the score
  and the top-k over (same monitor); an earlier run's best stays where it is (Lightning deletes
  no local checkpoint outside the callback's directory) and is tested if no later epoch beats it.
  Where that file is gone (the run directory moved or deleted), the ranking starts afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the last save point's, and silent in a
    ``fast_dev_run``."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # skipped when this step was saved already (the top-k save writes last.ckpt with it),
        # in a sanity check, outside fit and under fast_dev_run (Lightning's own conditions)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath", self.dirpath)
        if saved_dir == self.dirpath or state_dict.get("monitor") != self.monitor:
            super().load_state_dict(state_dict)
            return
        if not Path(state_dict["best_model_path"]).is_file():  # moved or deleted since: rank afresh
            log.warning(
                "resumed into %s: the earlier best checkpoint %s is gone; only epochs from here on rank",
                self.dirpath,
                state_dict["best_model_path"],
            )
            super().load_state_dict({**state_dict, "best_model_path": ""})
            return
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        log.info(
            "resumed into %s: the checkpoints of %s keep their ranking (best %s: %s)",
            self.dirpath,
            saved_dir,
            self.monitor,
            None if self.best_model_score is None else float(self.best_model_score),
        )
