"""A default run prints no warning the user cannot act on (elinspect.utils.library_warnings).

The entry point runs in a fresh process, as from the command line, with ``warnings.showwarning``
recording what would be printed: every warning that gets past the filters the process has
(Python's, Lightning's, elinspect's). Libraries that print their warnings themselves (wandb's
"wandb: WARNING ...") are caught in the output. Any warning not in ALLOWED fails the test with
its text and origin, so a new library or a new fault of ours shows up here, not in a user's log.
A short real run (not fast_dev_run, which turns the loggers and checkpoints off), with the
default loggers (CSV and offline W&B) and callbacks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED

# Warnings a user may see, each with the reason it stays (regular expressions on
# "<Category>: <message>"). Keep this short: silence a library's harmless warning in
# elinspect/utils/library_warnings.py, fix our own at the cause.
ALLOWED: tuple[str, ...] = ()

RECORDER = """
import json, runpy, sys, warnings
shown = []
def record(message, category, filename, lineno, file=None, line=None):
    shown.append(f"{category.__name__}: {message} ({filename}:{lineno})")
warnings.showwarning = record
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print("SHOWN-WARNINGS " + json.dumps(shown))
"""

NEU_DET = SHARED / "datasets" / "NEU-DET"


# elinspect's own log records are meant for the user ("[time][elinspect.x][WARNING] - ...")
OWN_RECORD = re.compile(r"^\[[^]]+\]\[(elinspect\.[\w.]+|__main__)\]\[")
PRINTED_WARNING = re.compile(r"\bWARNING\b|\bWarning\b")
SHORT_RUN = [
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",  # else Lightning says two batches are fewer than its interval
]


def shown_warnings(tmp_path: Path, *overrides: str) -> list[str]:
    """Warnings that reach the user: through ``warnings`` and printed by libraries themselves."""
    done = subprocess.run(
        [sys.executable, "-c", RECORDER, "elinspect.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("SHOWN-WARNINGS "))
    printed = [
        f"printed: {text}"
        for text in (done.stdout + done.stderr).splitlines()
        if PRINTED_WARNING.search(text)
        and not OWN_RECORD.match(text)
        and not text.startswith("SHOWN-WARNINGS ")
    ]
    return json.loads(line.removeprefix("SHOWN-WARNINGS ")) + printed


def unexpected(shown: list[str]) -> list[str]:
    return [w for w in shown if not any(re.match(pattern, w) for pattern in ALLOWED)]


def test_the_default_job_shows_no_warning(tmp_path: Path) -> None:
    """``make train`` cut short: SeMaCNN on ELPV with the pretrained Lite0s, the fit epoch and
    one classifier epoch of two batches each, the default loggers and checkpoints."""
    shown = shown_warnings(tmp_path, *SHORT_RUN, "model.classifier_epochs=1", "data.image_size=96")
    assert unexpected(shown) == []


@pytest.mark.skipif(not NEU_DET.is_dir(), reason="needs ../shared/datasets/NEU-DET")
def test_a_detector_run_shows_no_warning(tmp_path: Path) -> None:
    shown = shown_warnings(
        tmp_path,
        "model=faster_rcnn",
        "data=voc",
        f"data.root={NEU_DET}",
        "data.image_size=200",
        "trainer.max_epochs=1",
        *SHORT_RUN,
    )
    assert unexpected(shown) == []
