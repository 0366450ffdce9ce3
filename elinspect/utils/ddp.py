"""Distributed data parallel for every elinspect model: Lightning's DDP strategy, except where a
model has nothing to train or trains part of itself per step. ``build_trainer`` (the run
builder, :mod:`elinspect.build`) swaps it in for the trainer config's DDP strategy names."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy

log = logging.getLogger(__name__)


class DDPStrategy(LightningDDPStrategy):
    """Lightning's DDP, except that a model with nothing to train is not wrapped in
    ``DistributedDataParallel`` (which refuses a module without a parameter that requires a
    gradient). PaDiM's fit is such a model: its ranks only add streaming sums, reduced
    explicitly before the fit is finalised. Its ranks start from rank 0's parameters and
    buffers, as every rank does in Lightning's validate / test / predict.

    A model whose steps each train only part of it (GAN-AE: critic and generator, then the
    encoder) says so with ``ddp_find_unused_parameters = True``, and DDP looks for the unused
    parameters of each step instead of failing on them."""

    def configure_ddp(self) -> None:
        model = self.model
        if model is None or any(p.requires_grad for p in model.parameters()):
            if getattr(model, "ddp_find_unused_parameters", False) and not self._ddp_kwargs.get(
                "find_unused_parameters"
            ):
                log.info(
                    "DDP: %s trains part of itself per step: find_unused_parameters=True",
                    type(model).__name__,
                )
                self._ddp_kwargs["find_unused_parameters"] = True
            super().configure_ddp()
            return
        log.info("DDP: the model has no trainable parameter; not wrapping it in DistributedDataParallel")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in (*model.parameters(), *model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)


# strategy names of the trainer config that get elinspect's DDPStrategy (with these arguments)
DDP_STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {},
    "ddp_spawn": {"start_method": "spawn"},
    "ddp_fork": {"start_method": "fork"},
    "ddp_find_unused_parameters_true": {"find_unused_parameters": True},
}
