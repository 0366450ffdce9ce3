"""Test a checkpoint.

    python -m elinspect.eval ckpt_path=logs/train/runs/<run>/checkpoints/epoch_004.ckpt
    python -m elinspect.eval ckpt_path=... data.root=/data/elpv-copy    # same model, other data

The model, data and loss settings stored in the checkpoint are used, so the command needs
nothing but the checkpoint. A group named on the command line (``data=...``) replaces
the stored one; ``group.key=value`` changes one field of the stored one.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.build import (
    STORED_GROUPS,
    build_datamodule_and_model,
    build_trainer,
    save_resolved_config,
)
from elinspect.models.base import CHECKPOINT_KEY
from elinspect.utils.checkpoint import read_checkpoint
from elinspect.utils.errors import user_errors
from elinspect.utils.library_warnings import silence_library_warnings
from elinspect.utils.outputs import ensure_writable_dir
from elinspect.utils.rich_utils import metrics_table
from elinspect.utils.task import extras, print_config, task_wrapper

log = logging.getLogger(__name__)
silence_library_warnings()


def apply_stored_config(cfg: DictConfig, stored: dict[str, Any], overrides: list[str]) -> None:
    """Replace each of model/data/loss by the checkpoint's unless chosen on the command line."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    for group in STORED_GROUPS:
        if group not in stored:
            continue
        if any(o.key_or_group == group for o in parsed):
            log.info("%s: using the command line's choice, not the checkpoint's", group)
            continue
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


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    meta = read_checkpoint(cfg.ckpt_path).get(CHECKPOINT_KEY) or {}
    if meta.get("config"):
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        apply_stored_config(cfg, meta["config"], overrides)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ensure_writable_dir(cfg.paths.output_dir)
    save_resolved_config(cfg, cfg.paths.output_dir)
    datamodule, model = build_datamodule_and_model(cfg)
    trainer = build_trainer(cfg)
    print_config(cfg)
    trainer.test(model=model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if rank_zero_only.rank == 0:  # every DDP rank holds the synchronised metrics; one prints them
        Console().print(
            metrics_table(
                metrics,
                title=f"test metrics of {cfg.ckpt_path}",
                caption=getattr(datamodule, "protocol", None),
            )
        )
    return metrics, {"trainer": trainer, "model": model, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        extras(cfg)
        evaluate(cfg)


if __name__ == "__main__":
    main()
