"""Assembling a run's parts from the composed config: datamodule → loss → model → trainer.

The datamodule is set up first because the model is built from what it reads off the
training split (:class:`~elinspect.data.info.DatasetInfo`: classes, channels, class
counts) and a loss such as SDFL takes the class counts from it — never from a config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from elinspect.data.info import DatasetInfo
from elinspect.models.base import ElinspectModule
from elinspect.utils.compat import check_compatible
from elinspect.utils.instantiate import instantiate_callbacks, instantiate_loggers

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
STORED_GROUPS = ("model", "data", "loss")


def group_choices() -> dict[str, str]:
    """The option chosen in each config group (``model`` → ``classifier``), when known."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def effective_loss_config(cfg: DictConfig) -> DictConfig | None:
    """The ``loss`` group's choice; ``loss=auto`` (the default) means the model's own
    ``default_loss`` (cross-entropy for most models, SDFL for ``model=ebba``)."""
    loss_cfg = cfg.get("loss")
    if loss_cfg is not None and loss_cfg.get("auto"):
        return cfg.model.get("default_loss")
    return loss_cfg


def model_config(cfg: DictConfig) -> DictConfig:
    """``cfg.model`` without the keys that are not constructor arguments."""
    node = cfg.model.copy()
    with open_dict(node):
        node.pop("default_loss", None)
    return node


def build_loss(loss_cfg: DictConfig | None, info: DatasetInfo) -> nn.Module | None:
    """Instantiate the ``loss`` group; a loss that weighs classes gets the training counts."""
    if not loss_cfg:
        return None
    loss = hydra.utils.instantiate(loss_cfg)
    if hasattr(loss, "set_class_counts"):
        loss.set_class_counts(info.class_counts)
    return loss


def build_datamodule_and_model(cfg: DictConfig) -> tuple[L.LightningDataModule, ElinspectModule]:
    check_compatible(cfg, CONFIG_DIR, group_choices())
    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    info: DatasetInfo = datamodule.info
    loss = build_loss(effective_loss_config(cfg), info)
    log.info("instantiating model <%s>", cfg.model._target_)
    model: ElinspectModule = hydra.utils.instantiate(
        model_config(cfg), dataset=info.to_dict(), loss=loss, _convert_="all"
    )
    model.run_config = stored_config(cfg)
    extra_inputs = set(getattr(model, "extra_inputs", ()))
    if extra_inputs:  # e.g. RDDN's aligned templates or defect-free samples beside each image
        datamodule.request_inputs(extra_inputs)
    return datamodule, model


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    output_dir = cfg.paths.output_dir
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), output_dir)
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **overrides)


def stored_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved model/data/loss config (plain data, loadable with weights_only)."""
    out: dict[str, Any] = {
        g: OmegaConf.to_container(cfg[g], resolve=True) for g in STORED_GROUPS if cfg.get(g)
    }
    out["choices"] = {g: c for g, c in group_choices().items() if g in STORED_GROUPS}
    return out


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the fully resolved config of this run to ``<run>/config.yaml``."""
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
