"""Which models fit which datasets: declared by the classes, checked before anything runs.

A LightningModule class declares ``task`` (what it needs); a datamodule class declares
``tasks`` (what it provides). ``model=faster_rcnn data=elpv`` is refused with a message
listing the datasets that would fit.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf


class IncompatibleConfigError(ValueError):
    """The chosen model, data and loss cannot work together."""


def model_task(model_cfg: DictConfig) -> str:
    return get_class(model_cfg._target_).task


def data_tasks(data_cfg: DictConfig) -> frozenset[str]:
    return get_class(data_cfg._target_).tasks


def group_options(config_dir: Path, group: str) -> dict[str, DictConfig]:
    return {p.stem: OmegaConf.load(p) for p in sorted((config_dir / group).glob("*.yaml"))}


def check_compatible(cfg: DictConfig, config_dir: Path, choices: dict[str, str] | None = None) -> None:
    """Raise :class:`IncompatibleConfigError` if ``cfg.model`` cannot train on ``cfg.data``."""
    need = model_task(cfg.model)
    have = data_tasks(cfg.data)
    if need in have:
        return
    choices = choices or {}
    fitting = [
        name
        for name, option in group_options(config_dir, "data").items()
        if "_target_" in option and need in data_tasks(option)
    ]
    model_name = choices.get("model", cfg.model._target_)
    data_name = choices.get("data", cfg.data._target_)
    raise IncompatibleConfigError(
        f"model={model_name} needs a {need!r} dataset, but data={data_name} provides "
        f"{', '.join(sorted(have))}. Datasets that fit model={model_name}: "
        f"{', '.join(fitting) or 'none yet'}."
    )
