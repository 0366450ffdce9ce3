"""The global random states in every checkpoint, put back when a run resumes.

Lightning's checkpoints restore the model, the optimiser and the loop counters, not torch's,
NumPy's and Python's global random generators. A resumed process starts them from the seed,
so augmentation draws, dropout masks and a plain ``DataLoader``'s shuffle after a resume differ
from those of the run it continues. :class:`RandomStateCheckpoint` stores the states at the
moment of saving and sets them back when training starts again, before the first batch is
fetched — where the interrupted run would have drawn its next random number. With
:class:`~elinspect.data.resumable.ResumableDataLoader` for the training split (the data order
and the position inside an epoch), a resumed run is bit-identical to an uninterrupted one
(``trainer.deterministic=true``, ``num_workers: 0``). With loader workers it is not: they are
persistent, and the random streams they draw augmentation from carry on from epoch to epoch
inside them, where no checkpoint can store them; the workers a resumed run starts draw from
the streams the run's first epoch began with (seeded, so a resume repeats itself, but not the
uninterrupted run's draws).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def random_states() -> dict[str, Any]:
    """torch, NumPy, Python (and CUDA) random states, as data ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Put back what :func:`random_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(L.Callback):
    """Saves the global random states in checkpoints and restores them on resume (module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return random_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the sanity check and the loaders' set-up, before the first batch is fetched
        if self._pending is not None:
            set_random_states(self._pending)
            self._pending = None
            log.info("random states restored from the checkpoint")


__all__ = ["RandomStateCheckpoint", "random_states", "set_random_states"]
