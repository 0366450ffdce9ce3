"""The run builder: a run's parts from the composed config, datamodule → model → trainer.

Used by the entry points (train, eval); it sits beside them, above models, data and callbacks.

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
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from elinspect.data.info import DatasetInfo
from elinspect.models.base import ElinspectModule
from elinspect.models.build import build_model, effective_loss_config
from elinspect.utils.compat import check_compatible
from elinspect.utils.ddp import DDP_STRATEGIES, DDPStrategy
from elinspect.utils.instantiate import instantiate_callbacks, instantiate_loggers
from elinspect.utils.paths import CONFIG_DIR
from elinspect.utils.speed import on_gpu, resolve_precision, speed_callback

log = logging.getLogger(__name__)

STORED_GROUPS = ("model", "data", "loss")


def group_choices() -> dict[str, str]:
    """The option chosen in each config group (``model`` → ``classifier``), when known."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def command_line_overrides() -> list[str]:
    """This run's command-line overrides (``data.fold=2``, ``model=ebba`` …), when known."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def apply_stored_config(cfg: DictConfig, stored: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Replace each of model/data/loss by the checkpoint's unless chosen on the command line
    (``data=…``); a ``group.key=value`` override changes that field of the stored group. The
    run's ``seed`` is taken over too unless named (under DDP it orders the training split, which
    no checkpoint stores). Returns the checkpoint's choices (``{"model": "classifier", …}``) of
    the groups replaced ("" where the checkpoint does not name one)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if stored.get("seed") is not None and not any(o.key_or_group == "seed" for o in parsed):
        if cfg.get("seed") != stored["seed"]:
            log.info("seed %s, the checkpoint's run's (name seed= to change it)", stored["seed"])
        with open_dict(cfg):
            cfg.seed = stored["seed"]
    stored_choices = stored.get("choices") or {}
    restored: dict[str, str] = {}
    for group in STORED_GROUPS:
        if group not in stored:
            continue
        if any(o.key_or_group == group for o in parsed):
            log.info("%s: using the command line's choice, not the checkpoint's", group)
            continue
        restored[group] = stored_choices.get(group) or ""  # "": not known, not this run's choice
        node = OmegaConf.create(stored[group])
        for o in parsed:
            if o.key_or_group.startswith(group + "."):
                value = o.value()
                OmegaConf.update(
                    node,
                    o.key_or_group[len(group) + 1 :],
                    yaml.safe_load(str(value)) if isinstance(value, str) else value,
                    force_add=True,
                )
        with open_dict(cfg):
            cfg[group] = node
    return restored


def build_datamodule_and_model(
    cfg: DictConfig, restored_choices: dict[str, str] | None = None
) -> tuple[L.LightningDataModule, ElinspectModule]:
    """The datamodule and the model; ``restored_choices``: the groups a checkpoint's config
    replaced (:func:`apply_stored_config`), named as the checkpoint names them."""
    merged = {**group_choices(), **(restored_choices or {})}
    choices = {group: choice for group, choice in merged.items() if choice}
    check_compatible(cfg, CONFIG_DIR, choices)
    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    info: DatasetInfo = datamodule.info
    log.info("instantiating model <%s>", cfg.model._target_)
    model = build_model(cfg.model, effective_loss_config(cfg), info)
    extra_inputs = set(getattr(model, "extra_inputs", ()))
    if extra_inputs:  # e.g. RDDN's aligned templates or defect-free samples beside each image
        datamodule.request_inputs(extra_inputs)
        served: DatasetInfo = datamodule.info
        if served != info:  # images skipped for a missing input: count what the model trains on
            log.info(
                "rebuilding the model on the training split left after the skips (class counts %s, were %s)",
                list(served.class_counts),
                list(info.class_counts),
            )
            model = build_model(cfg.model, effective_loss_config(cfg), served)
    model.run_config = stored_config(cfg, choices)
    return datamodule, model


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


def fit_epochs(
    model: ElinspectModule, max_epochs: int | None, fast_dev_run: bool | int = False
) -> int | None:
    """``trainer.max_epochs`` for a fit of ``model``: the sum of the epochs its stages declare
    (:meth:`~elinspect.models.base.ElinspectModule.stage_epochs`; logged when it replaces
    ``max_epochs``), else ``max_epochs``. ``fast_dev_run`` keeps its one batch of each stage."""
    stages = model.stage_epochs()
    if stages is None or fast_dev_run:
        return max_epochs
    total = sum(stages.values())
    if max_epochs != total:
        parts = " + ".join(f"{epochs} {name}" for name, epochs in stages.items())
        log.info(
            "%s's stages take %s = %d epoch(s); trainer.max_epochs=%s is replaced by it",
            type(model).__name__,
            parts,
            total,
            max_epochs,
        )
    return total


def build_trainer(cfg: DictConfig, model: ElinspectModule | None = None, **overrides: Any) -> L.Trainer:
    """The Trainer of ``cfg.trainer``, with the configured callbacks and loggers; given the
    ``model`` it fits, ``max_epochs`` is the sum of the model's stage epochs where it declares
    them (:func:`fit_epochs`)."""
    output_dir = cfg.paths.output_dir
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), output_dir)
    trainer_cfg, speed = trainer_arguments(cfg.trainer)
    if model is not None:
        epochs = fit_epochs(model, trainer_cfg.get("max_epochs"), trainer_cfg.get("fast_dev_run", False))
        if epochs != trainer_cfg.get("max_epochs"):
            with open_dict(trainer_cfg):
                trainer_cfg.max_epochs = epochs
                trainer_cfg.min_epochs = min(trainer_cfg.get("min_epochs") or 0, epochs)
    speedup = speed_callback(speed)
    if speedup is not None:
        callbacks.append(speedup)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, str) and strategy in DDP_STRATEGIES and "strategy" not in overrides:
        overrides["strategy"] = DDPStrategy(**DDP_STRATEGIES[strategy])
    log.info("instantiating trainer <%s> (precision %s)", trainer_cfg._target_, trainer_cfg.get("precision"))
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, **overrides)


def stored_config(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved model/data/loss config (plain data, loadable with weights_only), the
    option each group came from (``choices``; by default this run's Hydra choices) and the seed."""
    out: dict[str, Any] = {
        g: OmegaConf.to_container(cfg[g], resolve=True) for g in STORED_GROUPS if cfg.get(g)
    }
    choices = group_choices() if choices is None else choices
    out["choices"] = {g: c for g, c in choices.items() if g in STORED_GROUPS}
    out["seed"] = cfg.get("seed")
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
