"""OmegaConf resolvers used by ``conf/`` (registered on import of :mod:`elinspect.utils.resolvers`)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

WANDB_HOST = "api.wandb.ai"


def project_root() -> str:
    """``$ELINSPECT_ROOT``, else the checkout that holds ``conf/`` beside the package, else cwd."""
    if os.environ.get("ELINSPECT_ROOT"):
        return os.environ["ELINSPECT_ROOT"]
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "conf" / "train.yaml").is_file():
        return str(checkout)
    return os.getcwd()


def wandb_has_api_key() -> bool:
    """True when W&B could log in without asking: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is set; ``WANDB_MODE`` wins when given."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    return not wandb_has_api_key()


def register() -> None:
    OmegaConf.register_new_resolver("elinspect.project_root", project_root, replace=True)
    OmegaConf.register_new_resolver("elinspect.wandb_offline", wandb_offline, replace=True)


register()
