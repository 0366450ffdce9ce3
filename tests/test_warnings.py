"""A default run prints no warning the user cannot act on (elinspect.utils.library_warnings).

The entry point runs in a fresh process, as from the command line, with ``warnings.showwarning``
recording what would be printed: every warning that gets past the filters the process has
(Python's, Lightning's, elinspect's). Any warning not in ALLOWED fails the test with its text and
origin, so a new library or a new fault of ours shows up here, not in a user's log.
"""

from __future__ import annotations

import json
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


def shown_warnings(tmp_path: Path, *overrides: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", RECORDER, "elinspect.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("SHOWN-WARNINGS "))
    return json.loads(line.removeprefix("SHOWN-WARNINGS "))


def unexpected(shown: list[str]) -> list[str]:
    return [w for w in shown if not any(re.match(pattern, w) for pattern in ALLOWED)]


def test_the_default_job_shows_no_warning(tmp_path: Path) -> None:
    """``make train`` as a one-batch run: SeMaCNN on ELPV with the pretrained Lite0s."""
    assert unexpected(shown_warnings(tmp_path, "trainer.fast_dev_run=true")) == []


@pytest.mark.skipif(not NEU_DET.is_dir(), reason="needs ../shared/datasets/NEU-DET")
def test_a_detector_run_shows_no_warning(tmp_path: Path) -> None:
    shown = shown_warnings(
        tmp_path,
        "model=faster_rcnn",
        "data=voc",
        f"data.root={NEU_DET}",
        "data.image_size=200",
        "trainer.fast_dev_run=true",
    )
    assert unexpected(shown) == []
