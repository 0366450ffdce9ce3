"""What every elinspect datamodule shares: one ``dataset(split)`` served as the train, val,
test and predict dataloaders with the config's batch size, workers and pinned memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(L.LightningDataModule):
    """Subclasses implement :meth:`dataset`; their hparams hold ``batch_size``,
    ``num_workers`` and ``pin_memory``. The training split is shuffled; predict serves test."""

    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.dataset(split),
            batch_size=hp.batch_size,
            shuffle=split == "train",
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
            collate_fn=type(self).collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
