"""Progress without a terminal: LogProgress writes a line per epoch and stage, and a line at
least every ``every_s`` seconds inside an epoch, with step/total, images/s and ETA."""

from __future__ import annotations

import logging
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn
from torch.utils.data import DataLoader

from elinspect.callbacks.progress import LogProgress, batch_images, clock, progress_bar


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def step(self, batch: dict) -> torch.Tensor:
        loss = self.layer(batch["image"]).pow(2).mean()
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.step(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.layer(batch["image"])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.layer(batch["image"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int) -> DataLoader:
    return DataLoader([{"image": torch.randn(4)} for _ in range(n)], batch_size=3)


def test_log_lines_for_each_epoch_within_epochs_and_the_test(caplog: pytest.LogCaptureFixture) -> None:
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LogProgress(every_s=0.0)],  # every step is "long enough" for a line
    )
    module = Tiny()
    with caplog.at_level(logging.INFO, logger="elinspect.callbacks.progress"):
        trainer.fit(module, loader(12), loader(6))
        trainer.test(module, loader(9))
    lines = [r.getMessage() for r in caplog.records if r.name == "elinspect.callbacks.progress"]
    # within epoch 1: steps 1..3 of 4 (the 4th is the epoch's own line), with the time left
    assert re.match(r"train epoch 1/2: step 1/4, \d+s, [\d.]+ images/s, ETA \d+s$", lines[0]), lines
    epoch_ends = [line for line in lines if line.startswith("train epoch") and "step 4/4" in line]
    assert len(epoch_ends) == 2 and all("; train/loss 0." in line for line in epoch_ends), lines
    assert "train epoch 2/2: step 4/4" in epoch_ends[1]
    assert sum(line.startswith("validate epoch") and "step 2/2" in line for line in lines) == 2
    assert lines[-1].startswith("test: step 3/3")


def test_no_line_inside_an_epoch_before_every_s(caplog: pytest.LogCaptureFixture) -> None:
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[LogProgress(every_s=3600.0)],
    )
    with caplog.at_level(logging.INFO, logger="elinspect.callbacks.progress"):
        trainer.fit(Tiny(), loader(12))
    lines = [r.getMessage() for r in caplog.records if r.name == "elinspect.callbacks.progress"]
    assert len(lines) == 1 and lines[0].startswith("train epoch 1/1: step 4/4"), lines


def test_a_bar_at_a_terminal_lines_otherwise() -> None:
    assert isinstance(progress_bar(terminal=True), RichProgressBar)
    chosen = progress_bar(every_s=12, terminal=False)
    assert isinstance(chosen, LogProgress) and chosen.every_s == 12


def test_images_are_counted_in_dict_and_detection_batches() -> None:
    assert batch_images({"image": torch.zeros(5, 3, 8, 8), "label": torch.zeros(5)}) == 5
    assert batch_images(([torch.zeros(3, 8, 8)] * 2, [{}, {}])) == 2
    assert batch_images(object()) == 0
    assert [clock(5), clock(65), clock(3725)] == ["5s", "1m05s", "1h02m"]
