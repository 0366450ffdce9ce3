"""Third-party warnings that a user of elinspect cannot act on, silenced by exact message and
module (never by category alone, so a new warning of the same kind still shows).

Each entry says why it is harmless. Warnings whose cause is ours are fixed at the cause, not
listed here (e.g. SeMaCNN's fit epoch no longer steps the learning-rate schedule before any
optimiser step). ``tests/test_warnings.py`` runs the default job and a detector and fails on any
warning that reaches the user and is not in its own short allow-list.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple


class LibraryWarning(NamedTuple):
    message: str  # a regular expression matched at the start of the warning's text
    category: type[Warning]
    module: str  # a regular expression matched against the module that emitted it ("": any)
    why: str


LIBRARY_WARNINGS: tuple[LibraryWarning, ...] = (
    LibraryWarning(
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        "Lightning 2.6 calls an API that torch >= 2.9 deprecated, once per fit; nothing a user "
        "of elinspect can change (Lightning's own code, fixed upstream in later releases)",
    ),
    LibraryWarning(
        r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
        UserWarning,
        r"",  # Hydra attributes it 11 frames up its own call stack, to whichever module is there
        "conf/hydra/launcher/{joblib,submitit_slurm}.yaml replace the plugins' configs of the same "
        "name on purpose (every field repeated); Hydra 1.3 still validates them against the "
        "plugin's schema and says so, while composing the config (so the entry points install "
        "these filters when they are imported)",
    ),
)


def silence_library_warnings() -> None:
    """Install the filters of :data:`LIBRARY_WARNINGS` (idempotent: ``warnings`` drops repeats)."""
    for entry in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=entry.message, category=entry.category, module=entry.module)
