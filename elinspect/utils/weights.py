"""Loading model weights: ``null`` (random init), a torchvision weights name, or a local file.

A torchvision name (``"ResNet18_Weights.IMAGENET1K_V1"``, or ``"DEFAULT"`` for a given
builder) is resolved through :func:`torchvision.models.get_weight`. When the file is not
in the torch hub cache, the download is attempted with a short socket timeout, and a
machine without network gets a :class:`WeightsUnavailableError` at once that says where to
put the file — never a hang.

Local files are read with ``torch.load(weights_only=True)``: a pickle that would run code
is refused. A Lightning checkpoint (a dict with ``state_dict``) is accepted too; a
``prefix`` selects the sub-module's keys from it.

Checkpoints are read through the same loader (:mod:`elinspect.utils.checkpoint`), so a
checkpoint carrying a malicious pickle is refused with an error that names the file, at
every entry: weights files, ``python -m elinspect.eval ckpt_path=…``, predict/export and
resuming. The
flag is always passed explicitly: ``torch.load``'s own default (``weights_only=None``) turns
unsafe when the environment sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import get_model_weights, get_weight

from elinspect.utils.errors import UserError

DOWNLOAD_TIMEOUT_S = 15.0


class WeightsUnavailableError(UserError, RuntimeError):
    """Weights were asked for but cannot be had (no network, missing file, bad name)."""


class UnsafeCheckpointError(WeightsUnavailableError):
    """A weights or checkpoint file holds objects that ``weights_only=True`` refuses to unpickle."""


def refusal_detail(err: BaseException) -> str:
    """The line of a ``weights_only`` refusal that names the object refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
    return detail.replace("WeightsUnpickler error: ", "").rstrip(".")


def safe_torch_load(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure named (``what``: "weights
    file", "checkpoint") — an :class:`UnsafeCheckpointError` for a pickle of code or objects.

    ``mmap`` maps the tensors' storage instead of reading it (a quick check of a big file; the
    legacy non-zip format cannot be mapped and is read in full).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = refusal_detail(err)
        raise UnsafeCheckpointError(
            f"{what} {path} refused: it holds pickled Python objects that weights_only=True does not "
            f"load, since unpickling them could run code ({detail}). Load only files you trust; a "
            "checkpoint written by elinspect holds tensors and plain data only"
        ) from err
    except Exception as err:  # corrupt or truncated files fail in many ways
        raise WeightsUnavailableError(
            f"{what} {path} could not be loaded safely (weights_only=True): {type(err).__name__}: {err}"
        ) from err


def resolve_torchvision_weights(name: str, builder: str | None = None):
    """Return a torchvision ``WeightsEnum`` member for ``name``.

    ``name`` is a full enum name (``"ResNet50_Weights.IMAGENET1K_V2"``) or, with the
    builder's name (``"resnet50"``), a member name such as ``"DEFAULT"``.
    """
    try:
        if "." in name:
            return get_weight(name)
        if builder is None:
            raise ValueError("a short weights name needs the model builder's name")
        return get_model_weights(builder)[name]
    except (KeyError, ValueError, AttributeError) as err:
        hint = ""
        if builder is not None:
            members = ", ".join(w.name for w in get_model_weights(builder))
            hint = f"; valid for {builder}: {members} (or the full 'Enum.MEMBER' name)"
        raise WeightsUnavailableError(f"unknown torchvision weights {name!r}{hint}") from err


def is_local_file(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".ckpt", ".bin"))


def load_state_dict_file(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Read a state dict (or a Lightning checkpoint) from ``path`` safely.

    Keys starting with ``prefix`` are kept with the prefix removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    obj = safe_torch_load(path, "weights file")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsUnavailableError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    if prefix:
        obj = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
        if not obj:
            raise WeightsUnavailableError(f"weights file {path} has no keys under prefix {prefix!r}")
    return dict(obj)


def download_torchvision_state_dict(weights) -> dict[str, torch.Tensor]:
    """Fetch a torchvision weights enum's state dict, failing fast without network."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # weights_only: torch.hub's default is False, and a file already in the cache is loaded
        # without checking its hash, so a planted file would otherwise run code
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"cached weights for {weights} refused: they hold pickled objects that weights_only=True "
            f"does not load ({refusal_detail(err)}). Delete the file in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} and download it again"
        ) from err
    except (URLError, OSError, TimeoutError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsUnavailableError(
            f"could not download {weights} from {weights.url} ({err}). Without network, "
            f"copy that file to {cache}, or set weights to a local file path, or to null "
            "for random initialisation."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def load_weights(
    model: nn.Module,
    weights: str | Path | None,
    builder: str | None = None,
    prefix: str = "",
    strict: bool = False,
) -> list[str]:
    """Load ``weights`` into ``model``; return the model keys left without weights.

    ``strict=False`` is the default because a classification head or a changed number of
    input channels legitimately differs from an ImageNet checkpoint: tensors whose shape
    does not match are left at their initial values and reported in the returned list.
    """
    if weights is None:
        return []
    weights = str(weights)
    if is_local_file(weights) or Path(weights).expanduser().is_file():
        state = load_state_dict_file(weights, prefix=prefix)
    else:
        state = download_torchvision_state_dict(resolve_torchvision_weights(weights, builder))
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if strict and len(compatible) != len(own):
        missing = sorted(set(own) - set(compatible))
        raise WeightsUnavailableError(
            f"weights {weights} do not cover {len(missing)} keys, e.g. {missing[:5]}"
        )
    if not compatible:
        raise WeightsUnavailableError(
            f"weights {weights} share no tensor of matching name and shape with {type(model).__name__}"
        )
    model.load_state_dict(compatible, strict=False)
    return sorted(set(own) - set(compatible))
