"""Which models fit which datasets: declared by the classes, checked before anything runs.

A LightningModule class declares ``task`` (what it needs); a datamodule class declares
``tasks`` (what it provides). ``model=faster_rcnn data=elpv`` is refused with a message
listing the datasets that would fit.

Likewise for losses: a model class declares ``loss_kind`` (``"classification"`` by default:
a loss on class logits; ``"reconstruction"`` for GAN-AE and the autoencoder) and a loss
class may declare ``loss_kind`` (``"classification"`` when it does not, as
``torch.nn.CrossEntropyLoss``). ``model=ganae loss=ce`` is refused with the losses that fit.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from elinspect.utils.errors import UserError


class IncompatibleConfigError(UserError, ValueError):
    """The chosen model, data and loss cannot work together."""


def model_task(model_cfg: DictConfig) -> str:
    return get_class(model_cfg._target_).task


def data_tasks(data_cfg: DictConfig) -> frozenset[str]:
    return get_class(data_cfg._target_).tasks


def group_options(config_dir: Path, group: str) -> dict[str, DictConfig]:
    return {p.stem: OmegaConf.load(p) for p in sorted((config_dir / group).glob("*.yaml"))}


DEFAULT_LOSS_KIND = "classification"


def model_loss_kind(model_cfg: DictConfig) -> str:
    return getattr(get_class(model_cfg._target_), "loss_kind", DEFAULT_LOSS_KIND)


def loss_kind(loss_cfg: DictConfig) -> str:
    return getattr(get_class(loss_cfg._target_), "loss_kind", DEFAULT_LOSS_KIND)


def chosen_loss(cfg: DictConfig) -> DictConfig | None:
    """The loss that would train: the ``loss`` group's choice, or with ``loss=auto`` the
    model's ``default_loss`` (the same rule as :func:`elinspect.models.build.effective_loss_config`)."""
    loss_cfg = cfg.get("loss")
    if loss_cfg is not None and loss_cfg.get("auto"):
        return cfg.model.get("default_loss")
    return loss_cfg


def check_compatible(cfg: DictConfig, config_dir: Path, choices: dict[str, str] | None = None) -> None:
    """Raise :class:`IncompatibleConfigError` if ``cfg.model`` cannot train on ``cfg.data``,
    or not with the chosen loss."""
    check_data_compatible(cfg, config_dir, choices)
    check_loss_compatible(cfg, config_dir, choices)


def check_loss_compatible(cfg: DictConfig, config_dir: Path, choices: dict[str, str] | None = None) -> None:
    """Raise :class:`IncompatibleConfigError` if the chosen loss is not of the model's ``loss_kind``."""
    loss_cfg = chosen_loss(cfg)
    if not loss_cfg or "_target_" not in loss_cfg:
        return
    need, have = model_loss_kind(cfg.model), loss_kind(loss_cfg)
    if need == have:
        return
    choices = choices or {}
    fitting = [
        name
        for name, option in group_options(config_dir, "loss").items()
        if "_target_" in option and loss_kind(option) == need
    ]
    default = cfg.model.get("default_loss")
    if default and "_target_" in default and loss_kind(default) == need:
        fitting.insert(0, "auto")
    model_name = choices.get("model", cfg.model._target_)
    loss_name = choices.get("loss", loss_cfg._target_)
    if loss_name == "auto":
        loss_name = f"auto (model.default_loss: {loss_cfg._target_})"
    raise IncompatibleConfigError(
        f"model={model_name} trains with a {need!r} loss, but loss={loss_name} is a {have!r} loss. "
        f"Losses that fit model={model_name}: {', '.join(fitting) or 'none yet'}."
    )


def check_data_compatible(cfg: DictConfig, config_dir: Path, choices: dict[str, str] | None = None) -> None:
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
