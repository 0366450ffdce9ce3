"""The run's output directory must be writable before anything is computed.

A read-only directory (a finished run's folder made read-only, a mounted results share), or
a path that runs through a file, would otherwise surface as a bare ``PermissionError`` /
``NotADirectoryError`` from whichever writer came first — the config dump, a logger, or the
first checkpoint after an epoch of training. :func:`ensure_writable_dir` checks at the start,
by creating (and removing) a probe file, and fails with an :class:`OutputDirError` that names
the directory and says what to do; nothing is written and earlier outputs stay as they are.
Likewise a new run never writes over an earlier one's outputs (:class:`OutputExistsError`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from elinspect.utils.errors import UserError


class OutputDirError(UserError, OSError):
    """The run's output directory cannot be created or written to."""


def ensure_writable_dir(path: str | Path, option: str = "paths.output_dir") -> Path:
    """Create ``path`` (with parents) if missing and check that files can be written in it.

    ``option`` names the setting that chose the directory, for the message. Returns the path.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".elinspect-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputDirError(
            f"cannot write to the output directory {path} ({reason}). Choose a writable directory "
            f"({option}=..., or hydra.run.dir=... on the command line), or make this one writable "
            "(chmod u+w). Nothing was written; earlier outputs there are untouched."
        ) from err
    return path


__all__ = ["OutputDirError", "OutputExistsError", "ensure_writable_dir", "guard_output_dir"]


class OutputExistsError(UserError, FileExistsError):
    """An output would overwrite an earlier run's (checkpoints, predictions, an exported file)."""


def guard_output_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to write a new run over checkpoints already in ``output_dir``."""
    ckpt_dir = output_dir / "checkpoints"
    if ckpt_path is None and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise OutputExistsError(
            f"{ckpt_dir} already holds checkpoints of an earlier run. Resume it with ckpt_path=last, "
            "or leave hydra.run.dir at its default (a new timestamped directory)."
        )
