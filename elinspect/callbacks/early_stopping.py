"""Early stopping that skips the epochs a model does not score.

Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` stops a run whose monitored
value is NaN (``check_finite``: a diverged run) and counts every epoch against its patience.
A model whose first epochs train something its monitor does not score logs a placeholder
there instead — SeMaCNN's PaDiM fit epoch logs ``val/f1`` as NaN, so that no checkpoint ranks
its untrained classifier — and Lightning's callback would end the fit right after it and test
the untrained classifier. This one leaves out the epochs for which the module's
``scores_monitor()`` is false (:meth:`elinspect.models.base.ElinspectModule.scores_monitor`):
they neither stop the run nor use up patience. A model that monitors nothing (``monitor: null``:
GAN-AE, the autoencoder) is refused with a config error before the fit starts.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

from elinspect.utils.errors import ConfigError


class EarlyStopping(LightningEarlyStopping):
    """Lightning's early stopping, blind to the epochs the module says it does not score."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is None:  # Lightning would fail after the first validation, with a traceback
            raise ConfigError(
                f"early stopping follows model.monitor, but model.monitor is null for "
                f"{type(pl_module).__name__} (it tests its last epoch): set model.monitor to a "
                "validation metric it logs, or leave early_stopping out of callbacks"
            )
        super().setup(trainer, pl_module, stage)

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        scores_monitor = getattr(trainer.lightning_module, "scores_monitor", None)
        if scores_monitor is not None and not scores_monitor():
            return
        super()._run_early_stopping_check(trainer)
