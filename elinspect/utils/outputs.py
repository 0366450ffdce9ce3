"""The run's output directory must be writable before anything is computed.

A read-only directory (a finished run's folder made read-only, a mounted results share), or
a path that runs through a file, would otherwise surface as a bare ``PermissionError`` /
``NotADirectoryError`` from whichever writer came first — the config dump, a logger, or the
first checkpoint after an epoch of training. :func:`ensure_writable_dir` checks at the start,
by creating (and removing) a probe file, and fails with an :class:`OutputDirError` that names
the directory and says what to do; nothing is written and earlier outputs stay as they are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class OutputDirError(OSError):
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


__all__ = ["OutputDirError", "ensure_writable_dir"]
