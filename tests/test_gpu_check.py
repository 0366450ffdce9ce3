"""make gpu-check DRY=1: the device check's script runs on the CPU at tiny sizes, so it cannot rot
between the sessions that hold a GPU (experiments/gpu_check.py, issue 19)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_the_dry_gpu_check_runs_every_row_and_prints_the_device_call(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "experiments/gpu_check.py", "--dry", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert 'run(command="OUT=$OUT bash scripts/gpu_check.sh", carry=["wheelhouse"]' in done.stdout
    table = (tmp_path / "gpu_check.md").read_text()
    assert "`pytest -m gpu tests/test_gpu.py`: exit 0" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    models = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert models == ["faster_rcnn", "ebba", "baf"] * 2 + ["padim", "semacnn", "ganae"], table
    assert not any("FAILED" in row for row in rows), table
    assert "the loader delivers" in table and "6.2 images/s on an RTX 3050" in table
