"""A real two-job multirun through the command line: jobs get their own directories, a
failing job is logged and the sweep goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from elinspect.reporting import report
from elinspect.utils.task import FAILED_MARKER
from tests.conftest import REPO


def test_multirun_keeps_going_past_a_failing_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "elinspect.train", "-m",
        "data.num_folds=4", "data.fold=0,7",  # fold 7 of 4 does not exist: job 1 fails
        "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "logger=csv", "extras.print_config=false",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sweep / "0" / "csv" / "version_0" / "metrics.csv").is_file()
    assert "test/f1" in (sweep / "0" / "csv" / "version_0" / "metrics.csv").read_text()
    assert not (sweep / "0" / FAILED_MARKER).exists()
    failure = (sweep / "1" / FAILED_MARKER).read_text()
    assert "fold must lie in 0..3" in failure
    assert (sweep / "multirun.yaml").is_file()
    # the report turns the sweep into one table, offline, from the CSV logs
    table = report(sweep, metrics=["test/f1", "test/acc"])
    assert list(table["n"]) == [1]  # the failed job is left out of the aggregate
    logged_f1 = pd.read_csv(sweep / "0" / "csv" / "version_0" / "metrics.csv")["test/f1"].dropna().iloc[-1]
    assert table["test/f1"].iloc[0] == f"{logged_f1:.4f}"
    assert "test/f1" in (sweep / "report.md").read_text()
    per_job = report(sweep, metrics=["test/f1"], per_job=True)
    assert set(per_job["status"]) == {"ok", "failed"}
