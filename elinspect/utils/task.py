"""Running a task (train, eval) the same way every time: extras first, loggers always
closed, and in a multirun a failing job logged without stopping the sweep."""

from __future__ import annotations

import functools
import logging
import math
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from elinspect.utils.rich_utils import print_config_tree

log = logging.getLogger(__name__)

FAILED_MARKER = "FAILED"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def extras(cfg: DictConfig) -> None:
    """Optional start-of-run utilities from ``cfg.extras`` (the config tree: :func:`print_config`)."""
    options = cfg.get("extras")
    if not options:
        return
    if options.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if rank_zero_only.rank != 0:  # DDP ranks > 0 re-run the command: rank 0 asks and prints
        return
    if options.get("enforce_tags") and not cfg.get("tags"):
        import sys

        if sys.stdin.isatty():
            tags = input("tags for this run (comma separated): ").strip()
            with open_dict(cfg):
                cfg.tags = [t.strip() for t in tags.split(",") if t.strip()]


def print_config(cfg: DictConfig) -> None:
    """The config tree (``extras.print_config``), printed by rank 0 and saved beside the run.
    The entry points call it once the data and model are built, so that a user's mistake found
    while building is reported alone (:mod:`elinspect.utils.errors`), not under the tree."""
    options = cfg.get("extras") or {}
    if not options.get("print_config") or rank_zero_only.rank != 0:
        return
    output_dir = cfg.get("paths", {}).get("output_dir")
    print_config_tree(cfg, save_to=Path(output_dir) / "config_tree.log" if output_dir else None)


def close_loggers() -> None:
    """Finish the W&B run if one is open (otherwise the next multirun job appends to it)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.finish()


def task_wrapper(
    task: Callable[[DictConfig], tuple[dict, dict]],
) -> Callable[[DictConfig], tuple[dict, dict]]:
    """Close loggers whatever happens. A failure re-raises in a single run; in a multirun
    it is logged (with a ``FAILED`` file in the job directory) and the sweep goes on."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        try:
            return task(cfg)
        except Exception as err:
            if not is_multirun():
                raise
            output_dir = Path(cfg.paths.output_dir)
            log.error("job %s failed: %s: %s", output_dir, type(err).__name__, err)
            (output_dir / FAILED_MARKER).write_text(traceback.format_exc())
            return {}, {}
        finally:
            close_loggers()

    return wrapped


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """The value returned to sweepers; NaN for a failed job, so a study goes on."""
    if not name:
        return None
    if name not in metrics:
        if not metrics:
            return math.nan
        raise KeyError(f"optimized_metric {name!r} was not logged; logged: {sorted(metrics)}")
    return float(metrics[name])
