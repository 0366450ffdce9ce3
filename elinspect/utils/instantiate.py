"""Building callbacks and loggers from their config groups (``_target_`` nodes)."""

from __future__ import annotations

import logging

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Every ``_target_`` node under ``callbacks`` becomes a callback."""
    if not callbacks_cfg:
        return []
    if not isinstance(callbacks_cfg, DictConfig):
        raise TypeError("callbacks config must be a mapping of name → {_target_: ...}")
    return [
        hydra.utils.instantiate(node)
        for node in callbacks_cfg.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def instantiate_loggers(logger_cfg: DictConfig | None, output_dir: str) -> list[Logger]:
    """Every ``_target_`` node under ``logger`` becomes a logger; CSV is always present,
    because reports and the optimised metric are read from it offline."""
    loggers: list[Logger] = []
    if logger_cfg:
        if not isinstance(logger_cfg, DictConfig):
            raise TypeError("logger config must be a mapping of name → {_target_: ...}")
        loggers = [
            hydra.utils.instantiate(node)
            for node in logger_cfg.values()
            if isinstance(node, DictConfig) and "_target_" in node
        ]
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        log.info("adding a CSV logger (CSV metrics are always written)")
        loggers.append(CSVLogger(save_dir=output_dir, name="csv"))
    return loggers
