"""What every elinspect datamodule shares: one ``dataset(split)`` served as the train, val,
test and predict dataloaders with the config's batch size, workers and pinned memory, and the
bad-input policy. Those loader settings (:class:`LoaderArgs`, ``conf/data/common/loader.yaml``,
which every data config extends) pass through a datamodule's ``**loader`` to this base.

``num_workers: auto`` and ``pin_memory: auto`` (the data configs' defaults) are sized to the
machine when the loaders are made (:func:`~elinspect.utils.speed.auto_num_workers`: up to 4
workers, one CPU per training process left free; pinned memory only when batches go to a CUDA
device); workers persist across epochs whenever there are any.

Under DDP every image counts once (:mod:`elinspect.data.sharding`): the validation, test and
predict loaders deal each rank its share of the split without the repeats that Lightning's
sampler pads with, and the training loader, padded as Lightning would pad it, marks its repeats
(``repeat`` in each sample) for the statistics that a model computes once over the split."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, ClassVar, TypedDict

import lightning as L
from torch.utils.data import DataLoader, Dataset

from elinspect.data.errors import OnError
from elinspect.data.resumable import ResumableDataLoader
from elinspect.data.sharding import FlagRepeats, evaluation_sampler, training_sampler
from elinspect.utils.errors import ConfigError
from elinspect.utils.speed import auto_num_workers, auto_pin_memory


def shards_loaders(trainer: Any) -> bool:
    """Whether the trainer hands loaders distributed samplers (``use_distributed_sampler``,
    True unless the user turned it off)."""
    connector = getattr(trainer, "_accelerator_connector", None)
    return bool(getattr(connector, "use_distributed_sampler", True))


class LoaderArgs(TypedDict, total=False):
    """The settings every datamodule takes and hands to :class:`SplitDataModule`."""

    num_workers: int | str  # "auto": sized to the machine (module docstring); 0: the main process
    pin_memory: bool | str  # "auto": when batches go to a CUDA device
    on_error: OnError  # "raise" | "skip": what a reader does with bad input (elinspect.data.errors)


class SplitDataModule(L.LightningDataModule):
    """Subclasses implement :meth:`dataset`; their hparams hold ``batch_size``; they pass their
    ``**loader`` (:class:`LoaderArgs`) to this ``__init__``. The training split is shuffled;
    predict serves test."""

    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None
    servable_inputs: ClassVar[frozenset[str]] = frozenset({"unaugmented"})
    """What :meth:`request_inputs` can add to the batches. ``"unaugmented"``: training items
    also hold ``image_unaugmented``, the same image through the evaluation transform (no
    augmentation, no offline variant), for statistics that a model computes "on the training
    images" and then applies to unaugmented test images (GAN-AE's percentile threshold,
    SeMaCNN's heatmap scale)."""

    requested_inputs: frozenset[str] = frozenset()

    def __init__(
        self, num_workers: int | str = 0, pin_memory: bool | str = False, on_error: OnError = "raise"
    ) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_error = on_error

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def request_inputs(self, names: Collection[str]) -> None:
        """Serve the model's ``extra_inputs`` in every batch from now on (called by the run
        builder before any dataloader exists)."""
        unknown = frozenset(names) - type(self).servable_inputs
        if unknown:
            raise ValueError(
                f"unknown extra inputs {sorted(unknown)}; {type(self).__name__} serves "
                f"{sorted(type(self).servable_inputs)}"
            )
        self.requested_inputs = frozenset(names)

    def loader_settings(self) -> dict[str, Any]:
        """``num_workers``, ``pin_memory`` and ``persistent_workers`` of the loaders, with
        ``auto`` resolved for this machine and the attached trainer (its devices per node)."""
        trainer = self.trainer
        processes = trainer.num_devices if trainer is not None else 1
        workers = auto_num_workers(self.num_workers, processes)
        return {
            "num_workers": workers,
            "pin_memory": auto_pin_memory(self.pin_memory, trainer),
            "persistent_workers": workers > 0,
        }

    def check_sizes(self) -> None:
        """A batch size or image size below 1 is a config mistake: say so before a worker fails."""
        hp = self.hparams
        for key in ("batch_size", "image_size"):
            value = hp.get(key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"data.{key} must be a whole number >= 1, got {value!r}")

    def _loader(self, split: str) -> DataLoader:
        self.check_sizes()
        kwargs = {"batch_size": self.hparams.batch_size, "collate_fn": type(self).collate_fn}
        kwargs.update(self.loader_settings())
        trainer = self.trainer
        if split == "train" and (trainer is None or trainer.world_size == 1):
            # order, position and seed in every checkpoint: exact resume (elinspect.data.resumable);
            # under DDP the loaders are sharded instead (elinspect.data.sharding)
            return ResumableDataLoader(self.dataset(split), **kwargs)
        dataset = self.dataset(split)
        if trainer is not None and trainer.world_size > 1 and shards_loaders(trainer):
            ranks = {"world_size": trainer.world_size, "rank": trainer.global_rank}
            if split == "train":
                sampler = training_sampler(dataset, shuffle=not trainer.overfit_batches, **ranks)
                return DataLoader(FlagRepeats(dataset), sampler=sampler, **kwargs)
            sampler = evaluation_sampler(dataset, **ranks)
            if sampler is not None:
                return DataLoader(dataset, sampler=sampler, **kwargs)
        return DataLoader(dataset, shuffle=split == "train", **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
