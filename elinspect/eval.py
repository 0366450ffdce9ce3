"""Test a checkpoint.

    python -m elinspect.eval ckpt_path=logs/train/runs/<run>/checkpoints/epoch_004.ckpt
    python -m elinspect.eval ckpt_path=... data.root=/data/elpv-copy    # same model, other data

The model, data and loss settings (and the seed) stored in the checkpoint are used, so the
command needs nothing but the checkpoint. A group named on the command line (``data=...``)
replaces the stored one; ``group.key=value`` changes one field of the stored one.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from rich.console import Console

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.build import (
    apply_stored_config,
    build_datamodule_and_model,
    build_trainer,
    command_line_overrides,
    save_resolved_config,
)
from elinspect.data.info import DatasetInfo
from elinspect.models.base import CHECKPOINT_KEY
from elinspect.utils.checkpoint import read_checkpoint
from elinspect.utils.errors import ConfigError, user_errors
from elinspect.utils.library_warnings import silence_library_warnings
from elinspect.utils.outputs import ensure_writable_dir
from elinspect.utils.rich_utils import metrics_table
from elinspect.utils.task import extras, print_config, task_wrapper

log = logging.getLogger(__name__)
silence_library_warnings()


def check_dataset_facts(ckpt_path: str, trained: dict[str, Any] | None, evaluated: DatasetInfo) -> None:
    """Refuse data whose classes or channels are not the checkpoint's: the model is rebuilt from
    the evaluated data's facts, so other class names (a VOC copy whose classes are discovered in
    another order) would report per-class numbers under the wrong names. Another image size is
    allowed (a study of it), with a warning; so are labels made by another rule (ELPV evaluated
    at another threshold than it was trained at, whose classes are named alike)."""
    if not trained:
        return  # a checkpoint written without them: nothing to compare
    trained_info = DatasetInfo.from_dict(trained)
    if list(trained_info.class_names) != list(evaluated.class_names):
        raise ConfigError(
            f"{ckpt_path}: the checkpoint was trained on the classes {list(trained_info.class_names)}, "
            f"but the data gives {list(evaluated.class_names)}; evaluate it on data with the same "
            "classes in the same order (data.classes=[...])"
        )
    if trained_info.in_channels != evaluated.in_channels:
        raise ConfigError(
            f"{ckpt_path}: the checkpoint takes {trained_info.in_channels}-channel images, but the "
            f"data gives {evaluated.in_channels} (data.channels={trained_info.in_channels})"
        )
    if trained_info.labelling and evaluated.labelling and trained_info.labelling != evaluated.labelling:
        log.warning(
            "%s was trained on data labelled %s and is evaluated on data labelled %s (its test "
            "numbers score the model against other labels than it learnt; the checkpoint's own "
            "data settings apply unless data=... or data.* is given)",
            ckpt_path,
            trained_info.labelling,
            evaluated.labelling,
        )
    if (
        trained_info.image_size
        and evaluated.image_size
        and tuple(trained_info.image_size) != tuple(evaluated.image_size)
    ):
        log.warning(
            "%s was trained at image size %s and is evaluated at %s",
            ckpt_path,
            tuple(trained_info.image_size),
            tuple(evaluated.image_size),
        )


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    checkpoint = read_checkpoint(cfg.ckpt_path)
    meta = checkpoint.get(CHECKPOINT_KEY) or {}
    restored = (
        apply_stored_config(cfg, meta["config"], command_line_overrides()) if meta.get("config") else {}
    )
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ensure_writable_dir(cfg.paths.output_dir)
    save_resolved_config(cfg, cfg.paths.output_dir)
    datamodule, model = build_datamodule_and_model(cfg, restored)
    check_dataset_facts(
        cfg.ckpt_path, (checkpoint.get("hyper_parameters") or {}).get("dataset"), datamodule.info
    )
    del checkpoint  # the weights are loaded again by the trainer
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
