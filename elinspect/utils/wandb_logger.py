"""Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, without the warning it makes wandb print.

Lightning 2.6 always passes ``anonymous`` to ``wandb.init`` (``None`` unless asked for), and
wandb >= 0.22 answers any ``anonymous`` with "WARNING The anonymous setting has no effect and
will be removed in a future version" on every run — a line no user can act on. The key is
dropped when it is ``None``; ``anonymous: true`` still reaches wandb (and its warning).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """``WandbLogger(**kwargs)`` whose ``wandb.init`` call leaves ``anonymous`` out when unset."""
    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger
