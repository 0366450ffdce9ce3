"""Building a model from its config: the one recipe that train, eval, predict, export, explain,
the profiler, the benchmarks and the tests share.

A model is built from three things: its config node (``cfg.model``), the loss config the run
chose (:func:`effective_loss_config`: ``loss=auto`` means the model's own ``default_loss``) and
what the datamodule read off the training split (:class:`~elinspect.data.info.DatasetInfo`:
classes, channels, class counts). A loss such as SDFL takes its class counts from that info,
never from a config.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, open_dict
from torch import nn

from elinspect.data.info import DatasetInfo
from elinspect.models.base import ElinspectModule


def effective_loss_config(cfg: DictConfig) -> DictConfig | None:
    """The ``loss`` group's choice; ``loss=auto`` (the default) means the model's own
    ``default_loss`` (cross-entropy for most models, SDFL for ``model=ebba``)."""
    loss_cfg = cfg.get("loss")
    if loss_cfg is not None and loss_cfg.get("auto"):
        return cfg.model.get("default_loss")
    return loss_cfg


def constructor_arguments(model_cfg: DictConfig) -> DictConfig:
    """A model node without ``default_loss`` (a choice of the loss group, not an argument)."""
    node = model_cfg.copy()
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


def build_model(model_cfg: DictConfig, loss_cfg: DictConfig | None, info: DatasetInfo) -> ElinspectModule:
    """The LightningModule of ``model_cfg`` for the dataset ``info``, with the loss of ``loss_cfg``.

    ``loss_cfg`` is the loss the run trains with (:func:`effective_loss_config` of the run's
    config); None: the model's own (models that take no loss, e.g. PaDiM).
    """
    loss = build_loss(loss_cfg, info)
    return hydra.utils.instantiate(
        constructor_arguments(model_cfg), dataset=info.to_dict(), loss=loss, _convert_="all"
    )
