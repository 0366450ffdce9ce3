"""The run's checkpoint callback: Lightning's ``ModelCheckpoint``, quiet under ``fast_dev_run``.

``fast_dev_run`` is a smoke test: Lightning announces "Logging and checkpointing is suppressed"
and skips every periodic save. Lightning 2.6's ``ModelCheckpoint.on_train_end``, which writes
``last.ckpt`` when ``save_last`` is on and no save happened yet, does not check for it, so a
smoke run of a detector still writes a ~250 MB checkpoint (weights and optimiser state).
:class:`RunCheckpoint` keeps the announced behaviour; every other run saves as Lightning does.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes nothing at the end of a ``fast_dev_run`` fit."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)
