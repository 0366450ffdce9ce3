"""Hydra launchers and sweepers with elinspect's configs: parallel local sweeps (joblib), SLURM
(submitit), Optuna searches whose failing trials do not stop the study, and DDP inside a
local multirun (ddp_spawn)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from elinspect.utils.task import FAILED_MARKER
from tests.conftest import REPO

# conf/hydra/launcher/ replaces the plugins' configs of the same names on purpose (train.py
# silences Hydra's warning about it the same way)
pytestmark = pytest.mark.filterwarnings(
    r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema"
)

OPTUNA_SEARCHES = {"optuna_detector": "val/map_50", "optuna_semacnn": "val/f1"}


def test_joblib_launcher_runs_two_jobs_at_a_time(make_cfg) -> None:
    cfg = make_cfg("train.yaml", ["hydra/launcher=joblib"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    assert hydra.utils.instantiate(launcher).joblib["n_jobs"] == 2


def test_submitit_slurm_launcher_sizes_jobs_from_the_trainer(make_cfg) -> None:
    """One SLURM task per DDP rank: tasks and GPUs per node follow trainer.devices."""
    cfg = make_cfg(
        "train.yaml", ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4"], fast=False
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["tasks_per_node"], params["gpus_per_node"], params["nodes"]) == (4, 4, 1)
    assert params["timeout_min"] > 0 and "partition" in params and "account" in params
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)  # builds, submits nothing
    assert launcher.params["tasks_per_node"] == 4


@pytest.mark.parametrize(("search", "metric"), OPTUNA_SEARCHES.items())
def test_optuna_searches_compose_over_existing_keys(make_cfg, search: str, metric: str) -> None:
    """The Optuna sweeper maximises the model's own monitored metric, over parameters that exist
    in the composed config (a typo would fail every trial)."""
    cfg = make_cfg("train.yaml", [f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.optimized_metric == cfg.model.monitor == metric and sweeper.direction == "maximize"
    assert sweeper.max_failure_rate == 1.0 and sweeper.sampler.seed is not None
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", (
            f"{search}: {key} is not in the config"
        )


# ------------------------------------------------------------------------ real sweeps (slow)


def run_sweep(tmp_path: Path, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "elinspect.train", *overrides, "logger=csv", "extras.print_config=false",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return sweep, done


def tiny(root: Path, model: str = "classifier") -> list[str]:
    data = [
        "data=folder",
        f"data.root='{root}'",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
    ]
    if model == "padim":
        return ["model=padim", "model.padim.feature_size=8", "model.padim.k=10", *data]
    return [f"model={model}", "data.train_normal_only=false", "trainer.max_epochs=1", *data]


def seed_drawing_both(choices: list[int], trials: int = 2) -> int:
    """A TPE seed whose first ``trials`` (random start-up) draws cover every choice, so a study
    of that many trials tries each — found the way the sweeper draws (ask, suggest, tell)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(100):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        drawn = set()
        for _ in range(trials):
            trial = study.ask()
            drawn.add(trial.suggest_categorical("model.padim.k", choices))
            study.tell(trial, 0.0)
        if drawn == set(choices):
            return seed
    raise AssertionError(f"no seed below 100 draws every one of {choices}")


@pytest.mark.slow
def test_optuna_study_goes_on_past_a_failing_trial(tmp_path: Path, folder_data_factory) -> None:
    """hparams_search=optuna_semacnn over one parameter, k in {6, 5000}: k = 5000 exceeds the
    feature channels, so that trial's job fails (FAILED in its directory) and returns None;
    Optuna records it as failed, the other trial completes, and the sweep writes its result."""
    choices = [6, 5000]
    sweep, _ = run_sweep(
        tmp_path,
        "hparams_search=optuna_semacnn",
        *tiny(folder_data_factory(), "semacnn"),
        "model.padim.feature_size=8",
        "model.classifier_epochs=1",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.sampler.seed={seed_drawing_both(choices)}",
        # the search space: k only (the other parameters fixed by these overrides)
        f"model.padim.k=choice({choices[0]},{choices[1]})",
        "model.optimizer.lr=0.001",
        "model.heatmap_with_image=false",
        "model.scale_quantile=0.99",
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2
    failed = [j for j in jobs if (j / FAILED_MARKER).exists()]
    assert len(failed) == 1 and "embedding size k must lie in" in (failed[0] / FAILED_MARKER).read_text()
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"model.padim.k": choices[0]}
    (ok,) = set(jobs) - set(failed)
    assert (ok / "csv" / "version_0" / "metrics.csv").is_file()
    assert isinstance(result["best_value"], float)


@pytest.mark.slow
def test_joblib_sweep_runs_its_jobs_in_worker_processes(tmp_path: Path, folder_data_factory) -> None:
    sweep, _ = run_sweep(tmp_path, "-m", "hydra/launcher=joblib", *tiny(folder_data_factory()), "seed=1,2")
    for job in ("0", "1"):
        assert (sweep / job / "csv" / "version_0" / "metrics.csv").is_file(), job
        assert not (sweep / job / FAILED_MARKER).exists()
    logs = [(sweep / job / "train.log").read_text() for job in ("0", "1")]
    assert all("instantiating trainer" in log for log in logs)
    assert (sweep / "multirun.yaml").is_file()


@pytest.mark.slow
def test_ddp_spawn_inside_a_local_multirun(tmp_path: Path, folder_data_factory) -> None:
    """Two DDP jobs one after the other in one sweep process (the basic launcher): the second
    must not inherit the first's rank environment."""
    sweep, _ = run_sweep(
        tmp_path,
        "-m",
        *tiny(folder_data_factory(), "padim"),
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "model.eps=0.01,0.1",
        "test=false",  # one spawn per job: the fit (and its validation)
    )
    for job in ("0", "1"):
        assert not (sweep / job / FAILED_MARKER).exists(), (sweep / job / FAILED_MARKER).read_text()
        assert "val/auroc" in (sweep / job / "csv" / "version_0" / "metrics.csv").read_text()
