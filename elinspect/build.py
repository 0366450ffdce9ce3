"""Assembling a run's parts from the composed config: datamodule → model → trainer.

The datamodule is set up first because the model is built from what it reads off the
training split (:class:`~elinspect.data.info.DatasetInfo`: classes, channels, class
counts) and a loss such as SDFL takes the class counts from it — never from a config
(:func:`elinspect.models.build.build_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from elinspect.data.info import DatasetInfo
from elinspect.models.base import ElinspectModule
from elinspect.models.build import build_model, effective_loss_config
from elinspect.utils.compat import check_compatible
from elinspect.utils.instantiate import instantiate_callbacks, instantiate_loggers
from elinspect.utils.speed import on_gpu, resolve_precision, speed_callback

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
STORED_GROUPS = ("model", "data", "loss")


def group_choices() -> dict[str, str]:
    """The option chosen in each config group (``model`` → ``classifier``), when known."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def build_datamodule_and_model(cfg: DictConfig) -> tuple[L.LightningDataModule, ElinspectModule]:
    check_compatible(cfg, CONFIG_DIR, group_choices())
    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    info: DatasetInfo = datamodule.info
    log.info("instantiating model <%s>", cfg.model._target_)
    model = build_model(cfg.model, effective_loss_config(cfg), info)
    model.run_config = stored_config(cfg)
    extra_inputs = set(getattr(model, "extra_inputs", ()))
    if extra_inputs:  # e.g. RDDN's aligned templates or defect-free samples beside each image
        datamodule.request_inputs(extra_inputs)
    return datamodule, model


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


def trainer_arguments(trainer_cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """The ``trainer`` node as Trainer arguments (``precision: auto`` resolved for the chosen
    accelerator) and its ``speed`` node (elinspect's knobs, :mod:`elinspect.utils.speed`)."""
    node = trainer_cfg.copy()
    with open_dict(node):
        speed = node.pop("speed", None)
        if "precision" in node:
            node.precision = resolve_precision(node.precision, node.get("accelerator"))
        if node.get("sync_batchnorm") and not on_gpu(node.get("accelerator")):
            log.warning("trainer.sync_batchnorm is ignored off GPUs (torch's SyncBatchNorm needs CUDA)")
            node.sync_batchnorm = False
    return node, OmegaConf.to_container(speed, resolve=True) if speed is not None else {}


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    output_dir = cfg.paths.output_dir
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), output_dir)
    trainer_cfg, speed = trainer_arguments(cfg.trainer)
    speedup = speed_callback(speed)
    if speedup is not None:
        callbacks.append(speedup)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, str) and strategy in DDP_STRATEGIES and "strategy" not in overrides:
        overrides["strategy"] = DDPStrategy(**DDP_STRATEGIES[strategy])
    log.info("instantiating trainer <%s> (precision %s)", trainer_cfg._target_, trainer_cfg.get("precision"))
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, **overrides)


def stored_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved model/data/loss config (plain data, loadable with weights_only)."""
    out: dict[str, Any] = {
        g: OmegaConf.to_container(cfg[g], resolve=True) for g in STORED_GROUPS if cfg.get(g)
    }
    out["choices"] = {g: c for g, c in group_choices().items() if g in STORED_GROUPS}
    return out


@rank_zero_only
def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path | None:
    """Write the fully resolved config of this run to ``<run>/config.yaml`` (rank 0 only: the
    other DDP processes of a ``strategy=ddp`` run re-run the command with the same config)."""
    path = Path(output_dir) / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def log_hyperparameters(trainer: L.Trainer, model: ElinspectModule, cfg: DictConfig) -> None:
    """Send the resolved config and parameter counts to every logger."""
    if not trainer.loggers:
        return
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
