"""A user's mistake gets a message, not a traceback.

Every error elinspect raises on purpose for something the user can fix — a missing dataset
(:class:`~elinspect.data.errors.DatasetError`), a checkpoint that cannot be read, an output
directory that holds another run, a model that does not fit the data, a missing weights file,
a config value out of range (:class:`ConfigError`) — derives from :class:`UserError`; so
does a required option left unset (OmegaConf's ``MissingMandatoryValue``, reported the same way). The
entry points run inside :func:`user_errors`: such an error is printed as one short block
(what kind of problem, the message that names the file or option and what to do) and the
process exits with status :data:`USAGE_EXIT_CODE`, before the config tree is printed.

``HYDRA_FULL_ERROR=1`` or ``verbose=true`` shows the traceback as well. Any other exception
is a bug, not a mistake, and keeps its traceback. In a multirun the job wrapper
(:func:`elinspect.utils.task.task_wrapper`) writes the failure to the job's ``FAILED`` file and
the sweep goes on, as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from omegaconf.errors import MissingMandatoryValue

USAGE_EXIT_CODE = 2
FULL_ERROR_VARIABLE = "HYDRA_FULL_ERROR"


class UserError(Exception):
    """Base of the errors that mean "the input or the config is wrong", not "the code is"."""


class ConfigError(UserError, ValueError):
    """A config option has a value that cannot work (out of range, unknown name, wrong shape)."""


def find_user_error(err: BaseException | None) -> UserError | None:
    """The :class:`UserError` that caused ``err``, looking through wrappers (Hydra's
    ``InstantiationException``, Lightning's re-raises) via ``__cause__``/``__context__``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        if isinstance(err, MissingMandatoryValue):  # a ``???`` option left unset
            key = err.full_key or "an option"
            return ConfigError(f"{key} must be given: add {key}=... to the command line")
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def wants_traceback(cfg: Mapping[str, Any] | None) -> bool:
    """True when the user asked for tracebacks: ``HYDRA_FULL_ERROR=1`` or ``verbose=true``."""
    if os.environ.get(FULL_ERROR_VARIABLE, "") not in ("", "0"):
        return True
    return bool(cfg is not None and cfg.get("verbose"))


def user_error_text(err: UserError) -> str:
    """The block printed for ``err``: its kind, its message, how to see the traceback."""
    kind = type(err).__name__
    message = str(err).strip() or kind
    return (
        f"error ({kind}): {message}\n"
        f"(a problem with the input or the config, not a crash; {FULL_ERROR_VARIABLE}=1 or "
        "verbose=true shows the traceback)"
    )


@contextmanager
def user_errors(cfg: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Run an entry point's body: a :class:`UserError` (or an exception caused by one) prints
    :func:`user_error_text` to stderr and exits with status 2; anything else propagates."""
    try:
        yield
    except Exception as err:
        found = find_user_error(err)
        if found is None or wants_traceback(cfg):
            raise
        print(user_error_text(found), file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT_CODE) from None
