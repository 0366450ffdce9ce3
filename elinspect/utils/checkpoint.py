"""Reading checkpoints: the one safe reader behind eval, predict/export/explain and resuming.

Every checkpoint is read with ``torch.load(weights_only=True)`` (:func:`safe_torch_load`): a
file whose pickle would build Python objects is refused, never run, whatever the environment
says. What goes wrong gets a :class:`CheckpointError` that names the file: missing, a folder,
unreadable, unsafe, or not a Lightning checkpoint (then it says what the file is instead).

Whether a readable checkpoint is *elinspect's* (it holds the ``elinspect`` entry with the model
class and the run's config) is the caller's question: eval and resuming take any Lightning
checkpoint whose weights fit, :func:`elinspect.inference.load_model` needs the stored config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from elinspect.utils.errors import UserError
from elinspect.utils.weights import UnsafeCheckpointError, WeightsUnavailableError, safe_torch_load


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, unsafe or not a (fitting) elinspect checkpoint."""


def describe_foreign(obj: Any) -> str:
    """A short description of a loaded object that is not an elinspect checkpoint."""
    if isinstance(obj, Mapping):
        if "pytorch-lightning_version" in obj or "state_dict" in obj:
            version = obj.get("pytorch-lightning_version", "?")
            state = obj.get("state_dict")
            keys = list(state)[:3] if isinstance(state, Mapping) else []
            return f"a Lightning checkpoint (lightning {version}; weights such as {keys}) of another project"
        tensors = [k for k, v in obj.items() if torch.is_tensor(v)]
        if tensors and len(tensors) == len(obj):
            return f"a bare state dict of {len(tensors)} tensors (such as {tensors[:3]}), not a checkpoint"
        return f"a dict with keys {list(obj)[:6]}"
    return f"a {type(obj).__name__}"


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The whole Lightning checkpoint at ``ckpt_path``, read safely (``mmap``: map the tensors
    instead of reading them, a quick check of a big file)."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise CheckpointError(f"checkpoint {path} is a directory; give a .ckpt file{hint}")
    try:
        ckpt = safe_torch_load(path, "checkpoint", mmap=mmap)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from err
    except WeightsUnavailableError as err:
        raise CheckpointError(
            f"{err} (not a PyTorch file, or a truncated one; elinspect checkpoints are written by "
            "`python -m elinspect.train` into <run>/checkpoints/)"
        ) from err
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict): it is {describe_foreign(ckpt)}"
        )
    return dict(ckpt)


def resolve_checkpoint(ckpt_path: str | Path | None, checkpoint_dir: str | Path) -> Path | None:
    """The file ``ckpt_path`` names: ``last`` is the newest ``last*.ckpt`` in ``checkpoint_dir``
    (as Lightning resolves it; ``None`` when there is none), ``None`` stays ``None``."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) != "last":
        return Path(ckpt_path).expanduser()
    candidates = sorted(Path(checkpoint_dir).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def check_checkpoint(ckpt_path: str | Path | None, checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """Refuse to resume from an unsafe or unreadable checkpoint, before Lightning reads it.

    Call with the run's ``ckpt_path`` and its checkpoint directory; ``None`` (no resume) and a
    ``last`` without any ``last*.ckpt`` (Lightning then starts afresh) pass and give ``None``.
    Returns the checkpoint read (its tensors mapped, not loaded), e.g. for its stored config.
    """
    path = resolve_checkpoint(ckpt_path, checkpoint_dir)
    return None if path is None else read_checkpoint(path, mmap=True)
