"""A training loader whose shuffle order and position survive a checkpoint.

Lightning restores the model, optimiser and loop counters from ``ckpt_path``, but not the
data order: a plain shuffling ``DataLoader`` draws each epoch's order from torch's global
generator (whose state is not in the checkpoint, and has moved on differently in a fresh
process), and after a mid-epoch checkpoint it starts the epoch's order afresh, so some
images are seen twice in that epoch and others never.

:class:`ResumableDataLoader` fixes that. Its :class:`EpochShuffleSampler` draws epoch ``e``'s
order from its own generator seeded by ``(seed, e)`` (``seed`` is drawn once from torch's
global generator when the loader is made, so ``seed_everything`` fixes it), and the loader
draws its iterators' base seeds from a private generator too, so making an iterator never
moves the global one. Its ``state_dict`` — which Lightning saves in every checkpoint for
loaders that have one, and hands back when resuming mid-epoch — holds the seed, the epoch and
the batches already served in it; resumed mid-epoch, the loader serves the rest of that
epoch's order. Together with :class:`~elinspect.callbacks.rng_state.RandomStateCheckpoint`
(the global random states, for augmentation and dropout) a resumed run is bit-identical to
one never interrupted, from an end-of-epoch or a mid-epoch checkpoint.

Limits: exactness of the augmentation needs ``num_workers: 0``, from an end-of-epoch
checkpoint too (the persistent worker processes keep random states of their own that no
checkpoint holds; the order and position are exact either way); one training process only
(under DDP Lightning's distributed sampler must shard the data, so this loader is not used
there).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from elinspect.utils.errors import ConfigError


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(num_items)`` per epoch, from a generator seeded by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at every epoch start. ``skip`` items of the next
    iteration are left out (set on resume: they were consumed before the checkpoint);
    ``skipped`` is how many the latest iteration left out.
    """

    def __init__(self, num_items: int, seed: int | None = None) -> None:
        self.num_items = num_items
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.epoch = 0
        self.skip = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        self.skipped, self.skip = self.skip, 0
        return iter(self.order()[self.skipped :])

    def __len__(self) -> int:
        return self.num_items


class _CountingIterator:
    """The loader's iterator, counting the batches it hands out in the sampler's epoch.

    The sampler draws its order after Lightning's ``set_epoch``: at the first batch without
    worker processes, when the iterator is made with them. Either way it has drawn it once the
    first batch is out, so the epoch and the resumed position are read then.
    """

    def __init__(self, loader: ResumableDataLoader, inner: Iterator[Any]) -> None:
        self.loader, self.inner, self.started = loader, inner, False

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        if not self.started:
            sampler: EpochShuffleSampler = self.loader.sampler  # type: ignore[assignment]
            # > 0 only when resumed mid-epoch
            self.loader.served = sampler.skipped // self.loader.batch_size
            self.loader.served_epoch = sampler.epoch
            self.started = True
        self.loader.served += 1
        return batch

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A shuffling ``DataLoader`` with ``state_dict`` / ``load_state_dict`` (module docstring).

    Takes the ``DataLoader`` arguments except ``shuffle``, ``sampler``, ``batch_sampler`` and
    ``generator``; ``seed`` fixes the shuffle seed (default: drawn from torch's global generator).
    """

    def __init__(self, dataset: Dataset, *, seed: int | None = None, **kwargs: Any) -> None:
        for taken in ("shuffle", "sampler", "batch_sampler", "generator"):
            if kwargs.get(taken) is not None and kwargs.get(taken) is not False:
                raise ConfigError(f"ResumableDataLoader chooses its own order; do not pass {taken}")
            kwargs.pop(taken, None)
        sampler = EpochShuffleSampler(len(dataset), seed)
        generator = torch.Generator().manual_seed(sampler.seed)  # iterator base seeds, not the global RNG
        super().__init__(dataset, sampler=sampler, generator=generator, **kwargs)
        self.served = 0  # batches served in the epoch ``served_epoch``
        self.served_epoch = 0

    def __iter__(self) -> _CountingIterator:
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        sampler: EpochShuffleSampler = self.sampler  # type: ignore[assignment]
        served = self.served if self.served_epoch == sampler.epoch else 0
        return {"seed": sampler.seed, "epoch": sampler.epoch, "served": served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume mid-epoch (Lightning calls this only then): the same order, minus what was served."""
        sampler: EpochShuffleSampler = self.sampler  # type: ignore[assignment]
        sampler.seed = int(state["seed"])
        sampler.epoch = int(state["epoch"])
        sampler.skip = int(state["served"]) * self.batch_size
        self.generator.manual_seed(sampler.seed)


__all__ = ["EpochShuffleSampler", "ResumableDataLoader"]
