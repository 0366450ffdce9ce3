"""Errors raised for bad dataset input, and the tally kept when bad items are skipped.

Every reader follows one policy, chosen by ``data.on_error``:

* ``raise`` (default): the first bad item stops the run with a :class:`DatasetError`
  naming the file and what is wrong with it;
* ``skip``: the item is dropped, the reason is logged once per item and counted in an
  :class:`ErrorTally`, whose summary the datamodule logs at setup.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Literal

from elinspect.utils.errors import ConfigError, UserError

OnError = Literal["raise", "skip"]

log = logging.getLogger(__name__)


class DatasetError(UserError, ValueError):
    """A dataset file is missing, unreadable or malformed. The message names the file."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class ErrorTally:
    """Applies the ``on_error`` policy and counts what was skipped, by reason."""

    def __init__(self, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error: OnError = on_error
        self.counts: Counter[str] = Counter()

    def report(self, error: DatasetError, reason: str | None = None) -> None:
        """Raise ``error`` or, under ``skip``, log it and count it under ``reason``."""
        if self.on_error == "raise":
            raise error
        key = reason or error.problem
        self.counts[key] += 1
        log.warning("skipped: %s", error)

    def count(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped items that are never fatal (e.g. boxes clipped away)."""
        if n:
            self.counts[reason] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        return ", ".join(f"{n} × {reason}" for reason, n in self.counts.most_common())
