"""Scaling out: the trainer configs (ddp, ddp_spawn, ddp_cpu, gpu), the speed knobs and loader
defaults, and DDP correctness on CPU with two gloo processes.

What "correct" means here, and why the two runs can be equal at all:

* every image counts once (elinspect.data.sharding): evaluation splits are dealt to the ranks
  without repeats, and the repeats that pad a training shard are left out of the statistics a
  model takes once over the split (PaDiM's fit, GAN-AE's threshold), so splits of any size
  compare (the ``ODD_*`` tests use odd ones); where a split is cut with ``limit_test_batches``,
  the DDP run takes k batches of B per rank and the single run 2k batches of B: the sampler
  deals the images round-robin, so both see the same first 2kB images;
* PaDiM's fit does not depend on the batching: its Gaussian comes from sums over the images,
  reduced over the ranks before it is finalised;
* for trained models the test metrics of one checkpoint are compared (``train=false
  ckpt_path=...``): a DDP fit averages the gradients of per-rank batches and, on CPU, keeps
  BatchNorm statistics per rank (torch's SyncBatchNorm needs CUDA), so a DDP fit is not
  expected to equal a single-process one;
* torchmetrics metrics (acc, F1, precision, recall, AUROC, mAP, the confusion matrix, the
  anomaly models' gathered scores) are synchronised over ranks. Plain ``self.log`` values
  without ``sync_dist`` — ``test/loss`` of the classifier, SeMaCNN and the detector — are
  rank 0's own mean and are not compared.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import OmegaConf, open_dict, read_write
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from elinspect.build import build_datamodule_and_model, build_trainer, trainer_arguments
from elinspect.callbacks.checkpoint import RunCheckpoint
from elinspect.data.folder import FolderDataModule
from elinspect.models.anomaly.padim import Padim
from elinspect.models.anomaly.padim_module import PadimModule
from elinspect.train import (
    DistributedLaunchError,
    best_checkpoint_score,
    check_distributed_launch,
    sweeper_value,
)
from elinspect.utils import speed
from elinspect.utils.ddp import DDPStrategy
from elinspect.utils.speed import SpeedCallback, auto_num_workers, auto_pin_memory, inference_modules
from tests.conftest import FAST_DETECTOR_OVERRIDES, REPO, data_config, group_options

# ------------------------------------------------------------------------ trainer configs


def test_ddp_configs_compose_and_resolve_for_cpu(make_cfg, caplog) -> None:
    ddp = make_cfg("train.yaml", ["trainer=ddp"], fast=False).trainer
    assert (ddp.strategy, ddp.accelerator, ddp.devices, ddp.num_nodes) == ("ddp", "gpu", 2, 1)
    assert ddp.sync_batchnorm and ddp.precision == "auto"
    assert make_cfg("train.yaml", ["trainer=ddp_spawn"], fast=False).trainer.strategy == "ddp_spawn"
    gpu = make_cfg("train.yaml", ["trainer=gpu"], fast=False).trainer
    assert gpu.precision == "bf16-mixed" and gpu.speed.float32_matmul_precision == "high"
    # the documented CPU command: precision auto → 32-true; SyncBatchNorm dropped (CUDA only)
    cpu_ddp = make_cfg("train.yaml", ["trainer=ddp", "trainer.accelerator=cpu"], fast=False).trainer
    with caplog.at_level(logging.WARNING):
        args, knobs = trainer_arguments(cpu_ddp)
    assert args.precision == "32-true" and args.sync_batchnorm is False and "speed" not in args
    assert "sync_batchnorm is ignored" in caplog.text
    assert knobs == dict(OmegaConf.to_container(cpu_ddp.speed))
    assert trainer_arguments(make_cfg("train.yaml", ["trainer=ddp_cpu"], fast=False).trainer)[
        0
    ].precision == ("32-true")


@pytest.mark.parametrize("option", ["ddp", "ddp_spawn"])
def test_ddp_trainers_build_on_cpu_with_elinspects_strategy(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"trainer={option}", "trainer.accelerator=cpu", "logger=csv"], fast=False)
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.world_size == 2 and trainer.strategy._layer_sync is None
    expected = {"ddp": "popen", "ddp_spawn": "spawn"}[option]
    assert trainer.strategy._start_method == expected
    assert trainer.precision == "32-true"


def test_strategy_ddp_refused_in_a_local_multirun(make_cfg) -> None:
    cfg = make_cfg("train.yaml", ["trainer=ddp_cpu"])
    with open_dict(cfg), read_write(cfg.hydra):
        cfg.trainer.devices = 2
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    with pytest.raises(DistributedLaunchError, match="trainer=ddp_spawn"):
        check_distributed_launch(cfg)
    with open_dict(cfg):
        cfg.trainer.strategy = "ddp_spawn"
    check_distributed_launch(cfg)  # spawn keeps the sweep in this process: fine


def test_the_sweepers_score_after_ddp_spawn_is_the_tested_checkpoints(tmp_path: Path) -> None:
    """After a ``ddp_spawn`` fit Lightning hands the main process the best checkpoint's path but
    not its score (``best_model_score`` stays None there); the score returned to a sweeper must
    still be that checkpoint's (read from it), not the last epoch's ``callback_metrics``."""
    from tests.test_resume import ScriptedScore, trainer

    checkpoint = RunCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", save_top_k=1)
    trainer(checkpoint, max_epochs=3, num_sanity_val_steps=0).fit(ScriptedScore())
    assert best_checkpoint_score(SimpleNamespace(checkpoint_callback=checkpoint)) == {
        "val/score": pytest.approx(0.9)
    }
    checkpoint.best_model_score = None  # what the spawn launcher leaves in the main process
    assert best_checkpoint_score(SimpleNamespace(checkpoint_callback=checkpoint)) == {
        "val/score": pytest.approx(0.9)
    }


def test_sweeper_value_turns_failures_and_nan_into_none() -> None:
    assert sweeper_value({"val/f1": 0.5}, "val/f1") == 0.5
    assert sweeper_value({"val/f1": float("nan")}, "val/f1") is None
    assert sweeper_value({}, "val/f1") is None  # the failed job of a multirun
    assert sweeper_value({"val/f1": 0.5}, None) is None
    # a run without validation (trainer.limit_val_batches=0) has no value, and is not an error
    assert sweeper_value({"test/f1": 0.5, "train/loss": 1.0}, "val/f1") is None
    # a misspelt name among logged metrics of its stage is an error naming what was logged
    with pytest.raises(KeyError, match=r"'val/f2' was not logged; logged: \['val/f1'\]"):
        sweeper_value({"val/f1": 0.5}, "val/f2")


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_prints_the_config_tree_and_asks_for_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """DDP's ranks > 0 re-run the command: the config tree is rank 0's to print (and save), the
    tag prompt rank 0's to ask."""
    from lightning.pytorch.utilities import rank_zero_only

    from elinspect.utils import task

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "a, b")
    cfg = OmegaConf.create(
        {
            "extras": {"print_config": True, "enforce_tags": True},
            "tags": [],
            "paths": {"output_dir": str(tmp_path)},
        }
    )
    task.extras(cfg)
    task.print_config(cfg)
    assert (tmp_path / "config_tree.log").is_file() == (rank == 0)
    assert (len(asked), list(cfg.tags)) == ((1, ["a", "b"]) if rank == 0 else (0, []))


# -------------------------------------------------------------------- speed knobs, loaders


def speed_setup(
    make_cfg, fast_data_overrides, *knobs: str
) -> tuple[L.Trainer, SpeedCallback, L.LightningModule]:
    cfg = make_cfg(
        "train.yaml",
        [
            "model=classifier",
            "data=folder",
            *fast_data_overrides("folder"),
            "data.train_normal_only=false",
            "logger=csv",
            *knobs,
        ],
    )
    trainer = build_trainer(cfg)
    _, model = build_datamodule_and_model(cfg)
    return trainer, next(c for c in trainer.callbacks if isinstance(c, SpeedCallback)), model.eval()


def test_speed_knobs_reach_the_model(make_cfg, fast_data_overrides, monkeypatch) -> None:
    """build_trainer adds the SpeedCallback; at setup it converts the 4-D weights to channels-last
    (same outputs) and compiles the inference network in place, with the configured mode and
    backend (recorded here; the compiled forward: test_compiled_model_gives_the_same_outputs)."""
    compiled: list[tuple[type, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self), kw)))
    trainer, callback, model = speed_setup(
        make_cfg,
        fast_data_overrides,
        "trainer.speed.channels_last=true",
        "trainer.speed.compile=true",
        "trainer.speed.compile_mode=max-autotune",
    )
    assert [name for name, _ in inference_modules(model)] == ["net"]  # not the metrics, not the loss
    keys = set(model.state_dict())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    callback.setup(trainer, model, "fit")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert compiled == [(type(model.net), {"mode": "max-autotune", "backend": "inductor"})]
    assert set(model.state_dict()) == keys and callback.compiled == ["net"]
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(c, SpeedCallback) for c in build_trainer(make_cfg("train.yaml", [])).callbacks)


@pytest.mark.slow
def test_compiled_model_gives_the_same_outputs(make_cfg, fast_data_overrides) -> None:
    trainer, callback, model = speed_setup(
        make_cfg, fast_data_overrides, "trainer.speed.compile=true", "trainer.speed.compile_backend=eager"
    )
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        callback.setup(trainer, model, "fit")
        torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-5)


def test_auto_loader_settings_follow_the_machine(monkeypatch, folder_data_factory) -> None:
    monkeypatch.setattr(speed, "usable_cpus", lambda: 2)
    assert auto_num_workers("auto") == 1  # one core left to the training loop
    monkeypatch.setattr(speed, "usable_cpus", lambda: 16)
    assert auto_num_workers("auto") == 4 and auto_num_workers("auto", processes_per_node=8) == 1
    monkeypatch.setattr(speed, "usable_cpus", lambda: 1)
    assert auto_num_workers("auto") == 0 and auto_num_workers(3) == 3
    with pytest.raises(ValueError, match="num_workers"):
        auto_num_workers(-1)
    assert auto_pin_memory(True) is True and auto_pin_memory("auto") is torch.cuda.is_available()

    class OnCuda:
        accelerator = CUDAAccelerator()

    assert auto_pin_memory("auto", OnCuda()) is True
    monkeypatch.setattr(speed, "usable_cpus", lambda: 3)
    dm = FolderDataModule(
        root=str(folder_data_factory()), image_size=32, num_workers="auto", pin_memory="auto"
    )
    loader = dm.train_dataloader()
    assert (
        loader.num_workers == 2
        and loader.persistent_workers
        and loader.pin_memory is torch.cuda.is_available()
    )


def served_indices(dm: FolderDataModule, split: str, world: int) -> list[list[int]]:
    """The dataset indices each of ``world`` ranks' ``split`` loader serves (a stand-in trainer)."""
    served = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, num_devices=world, overfit_batches=0)
        loader = dm.predict_dataloader() if split == "predict" else getattr(dm, f"{split}_dataloader")()
        served.append([int(i) for batch in loader for i in batch["index"]])
    dm.trainer = None
    return served


@pytest.mark.parametrize("split", ["val", "test", "predict"])
def test_evaluation_loaders_under_ddp_serve_each_image_once(folder_data_factory, split: str) -> None:
    """Lightning's DistributedSampler pads the ranks to one size with images already served
    (7 images on 2 ranks: [0, 2, 4, 6] and [1, 3, 5, 0]), and every gathered metric — the
    classifier's accuracy and AUROC, pixel AUROC — would count those twice. Evaluation loaders
    deal each rank its share of the split instead: over the ranks, each image exactly once."""
    dm = FolderDataModule(
        root=str(folder_data_factory()), image_size=32, num_workers=0, batch_size=2,
        train_normal_only=False, val_fraction=0.25, test_fraction=0.25,
    )  # fmt: skip
    dm.setup()
    (whole,) = served_indices(dm, split, world=1)
    assert len(whole) % 2 == 1 and len(set(whole)) == len(whole)  # odd: padding would repeat one
    served = served_indices(dm, split, world=2)
    assert sorted(served[0] + served[1]) == sorted(whole)
    assert [len(part) for part in served] == [(len(whole) + 1) // 2, len(whole) // 2]


def test_the_training_loader_under_ddp_pads_as_lightning_does_and_flags_the_repeats(
    folder_data_factory, monkeypatch
) -> None:
    """Training keeps Lightning's padded shards (the same images in the same order, so every
    rank has as many batches), and marks the padding ``repeat`` for the statistics a model
    takes once over the split (PaDiM's fit, GAN-AE's threshold)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    dm = FolderDataModule(
        root=str(folder_data_factory()), image_size=32, num_workers=0, batch_size=4,
        train_normal_only=True, val_fraction=0.2, test_fraction=0.25,
    )  # fmt: skip
    dm.setup()
    dataset = dm.dataset("train")
    assert len(dataset) % 3 != 0  # 3 ranks cannot share it evenly
    once, repeats = [], []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, num_devices=3, overfit_batches=0)
        batches = list(dm.train_dataloader())
        served = [(int(i), bool(r)) for b in batches for i, r in zip(b["index"], b["repeat"], strict=True)]
        lightning = torch.utils.data.DistributedSampler(
            dataset, num_replicas=3, rank=rank, shuffle=True, seed=7
        )
        assert [dataset[i]["index"] for i in lightning] == [i for i, _ in served]
        once += [i for i, repeat in served if not repeat]
        repeats += [i for i, repeat in served if repeat]
    assert sorted(once) == sorted(dataset[i]["index"] for i in range(len(dataset)))
    assert len(repeats) == -len(dataset) % 3 and set(repeats) <= set(once)


def test_an_evaluation_split_smaller_than_the_world_keeps_lightnings_sampler(folder_data_factory) -> None:
    """Dealing 1 image to 2 ranks would leave one rank without a batch (DDP needs one on every
    rank): such a split keeps the plain loader, which Lightning shards (with a repeat)."""
    dm = FolderDataModule(
        root=str(folder_data_factory()), image_size=32, num_workers=0, batch_size=2,
        train_normal_only=False, val_fraction=0.25, test_fraction=0.25,
    )  # fmt: skip
    dm.setup()
    dm.trainer = SimpleNamespace(
        world_size=len(dm.dataset("test")) + 1, global_rank=0, num_devices=1, overfit_batches=0
    )
    assert not isinstance(dm.test_dataloader().sampler, torch.utils.data.DistributedSampler)


def test_every_data_config_sizes_its_loaders_to_the_machine() -> None:
    """One mechanism for every dataset: ``num_workers: auto`` and ``pin_memory: auto``."""
    for name in group_options("data"):
        node = data_config(name)
        assert (node.get("num_workers"), node.get("pin_memory")) == ("auto", "auto"), f"conf/data/{name}.yaml"


# ------------------------------------------------- PaDiM: sums reduced over two processes


class Images(Dataset):
    """Random 32-px images with given labels, as the anomaly datamodules serve them."""

    def __init__(self, labels: list[int], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(len(labels), 3, 32, 32, generator=generator)
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


# 8 normal and 2 defective images: 5 per rank, no padding; defective ones are not fitted
LABELS = [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]


class TrainImages(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Images(LABELS), batch_size=2, shuffle=True)


class SaveFit(L.Callback):
    """Each rank writes what it fitted."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: PadimModule) -> None:
        fitted = {k: getattr(pl_module.padim, k).clone() for k in ("mean", "inv_cholesky")}
        fitted["normal_images"] = float(trainer.callback_metrics["train/normal_images"])
        torch.save(fitted, self.out / f"rank{trainer.global_rank}.pt")


def small_padim() -> PadimModule:
    torch.manual_seed(0)
    padim = Padim(layers=("layer1", "layer2"), feature_size=4, k=8, blur_sigma=0)
    dataset = {
        "task": "anomaly",
        "class_names": ["normal", "defective"],
        "in_channels": 3,
        "class_counts": [8, 2],
    }
    return PadimModule(padim, dataset)


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """Lightning's launcher sets MASTER_ADDR / MASTER_PORT / ... in this process: undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_padim_fit_under_ddp_equals_the_single_process_fit(tmp_path: Path, restore_environ) -> None:
    """Two gloo processes (forked) each add their half of the images to the streaming sums; the
    sums are all-reduced before finalize, so both ranks hold the Gaussian of a single-process
    fit on all 8 normal images — not that of their own half."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork"),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveFit(tmp_path)],
    )
    trainer.fit(small_padim(), datamodule=TrainImages())

    whole, half = small_padim().padim, small_padim().padim
    data = Images(LABELS)
    normal = data.images[data.labels == 0]
    whole.update(normal)
    whole.finalize(0.01)
    half.update(normal[:4])
    half.finalize(0.01)
    assert (half.mean - whole.mean).abs().max() > 1e-2  # a fit on one rank's share would differ
    for rank in (0, 1):
        fitted = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert fitted["normal_images"] == 8  # logged with sync_dist: summed over the ranks
        # float64 sums in a different order, stored as float32; the features of 4 and of 8
        # images at once round differently, and L⁻¹ of an 8-image covariance (rank 7 + 0.01·I,
        # entries up to ~10) multiplies that by its condition number: compared to its scale
        torch.testing.assert_close(fitted["mean"], whole.mean, rtol=1e-5, atol=1e-6)
        scale = float(whole.inv_cholesky.abs().max())
        torch.testing.assert_close(fitted["inv_cholesky"], whole.inv_cholesky, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------- the train entry point, single vs two processes

CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]  # the documented command
COMMON = ["logger=csv", "extras.print_config=false"]
CLASSIFICATION_METRICS = ("acc", "f1", "precision", "recall", "auroc")


def run_train(out: Path, *overrides: str) -> Path:
    """``python -m elinspect.train`` writing below ``out/logs``; returns the run directory (and
    checks that the run made exactly one)."""
    command = [sys.executable, "-m", "elinspect.train", *overrides, *COMMON, f"paths.log_dir={out / 'logs'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    runs = list((out / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # the DDP ranks share one run directory
    return runs[0]


def logged_metrics(run: Path) -> dict[str, float]:
    """The last logged value of each metric of the run's (only) CSV log."""
    versions = list((run / "csv").iterdir())
    assert [v.name for v in versions] == ["version_0"], versions
    frame = pd.read_csv(versions[0] / "metrics.csv")
    return {k: float(frame[k].dropna().iloc[-1]) for k in frame.columns if frame[k].notna().any()}


def assert_single_outputs(run: Path, checkpoints: set[str] | None = None) -> None:
    """One config.yaml, one .hydra, one CSV log; the checkpoints expected and nothing else."""
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert not list(run.rglob("train_ddp_process_*")) and len(list(run.rglob("config.yaml"))) == 2
    assert len(list(run.rglob("metrics.csv"))) == 1
    if checkpoints is not None:
        assert {p.name for p in (run / "checkpoints").iterdir()} == checkpoints


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory: pytest.TempPathFactory, folder_data_factory) -> dict:
    return {"root": folder_data_factory(), "tmp": tmp_path_factory.mktemp("ddp-runs"), "runs": {}}


def folder_overrides(root: Path, *extra: str) -> list[str]:
    # splits of the conftest folder data (20 normal, 8 defect): train_normal_only → train 12,
    # val 8, test 8; otherwise train 16, val 6, test 6 — all even, read whole
    return ["data=folder", f"data.root='{root}'", "data.image_size=32", "data.num_workers=0", *extra]


@pytest.mark.slow
def test_classifier_test_metrics_of_a_checkpoint_equal_under_ddp(folder_runs) -> None:
    root, tmp = folder_runs["root"], folder_runs["tmp"]
    data = folder_overrides(root, "data.train_normal_only=false", "data.batch_size=2")
    single = run_train(tmp / "cls-single", "model=classifier", *data, "trainer.max_epochs=1")
    best = single / "checkpoints" / "epoch_000.ckpt"
    ddp = run_train(
        tmp / "cls-ddp", "model=classifier", *data, "train=false", f"ckpt_path='{best}'", *CPU_DDP
    )
    expected, got = logged_metrics(single), logged_metrics(ddp)
    for name in CLASSIFICATION_METRICS:
        assert got[f"test/{name}"] == pytest.approx(expected[f"test/{name}"], abs=1e-6), name
    assert_single_outputs(ddp)
    assert not (ddp / "checkpoints").exists()  # an evaluation writes no checkpoint


ODD_TRAINING = ["data.val_fraction=0.2", "data.test_fraction=0.25"]  # 11 normals of 20 train (PaDiM)
ODD_SPLITS = {  # 28 images: val 7 and test 7 (train_normal_only=false), or val 9 and test 9 (true)
    "classifier": ["model=classifier", "trainer.max_epochs=1", "data.train_normal_only=false"],
    "padim": ["model=padim", "model.padim.feature_size=8", "model.padim.k=10", "data.mask_dir=masks"],
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["classifier", "padim"])
def test_a_checkpoint_tests_the_same_under_ddp_on_splits_of_odd_size(folder_runs, model: str) -> None:
    """Splits that 2 ranks cannot share evenly: Lightning's sampler would serve one validation
    and one test image twice and the gathered metrics would count it twice; each image counts
    once, so two processes evaluating a checkpoint give one process's numbers, pixel AUROC too."""
    root, tmp = folder_runs["root"], folder_runs["tmp"]
    data = folder_overrides(root, "data.batch_size=2", "data.val_fraction=0.25", "data.test_fraction=0.25")
    single = run_train(tmp / f"odd-{model}-single", *ODD_SPLITS[model], *data)
    last = ["train=false", f"ckpt_path='{single / 'checkpoints' / 'last.ckpt'}'"]
    ddp = run_train(tmp / f"odd-{model}-ddp", *ODD_SPLITS[model], *data, *last, *CPU_DDP)
    expected, got = logged_metrics(single), logged_metrics(ddp)
    names = [f"test/{name}" for name in CLASSIFICATION_METRICS]
    names += ["test/pixel_auroc"] if model == "padim" else []
    for name in names:  # the backbone's float rounding depends on the threads per process
        assert got[name] == pytest.approx(expected[name], abs=1e-5), name


def padim_buffers(run: Path) -> dict[str, torch.Tensor]:
    state = load_state(run / "checkpoints" / "last.ckpt")
    return {k: v for k, v in state.items() if k.split(".")[-1] in ("mean", "inv_cholesky", "threshold")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_padim_fit_and_test_metrics_equal_under_ddp(folder_runs, strategy: str) -> None:
    """The whole PaDiM run through the entry point: the fitted Gaussian in the checkpoint, the
    validation threshold (chosen on the gathered scores) and the test metrics."""
    root, tmp = folder_runs["root"], folder_runs["tmp"]
    # 11 training normals: the ranks' training shards are padded with a repeat, left out of the fit
    data = folder_overrides(root, "data.batch_size=4", "data.mask_dir=masks", *ODD_TRAINING)
    model = ["model=padim", "model.padim.feature_size=8", "model.padim.k=10", "trainer.max_epochs=1"]
    if "padim" not in folder_runs["runs"]:
        folder_runs["runs"]["padim"] = run_train(tmp / "padim-single", *model, *data)
    single = folder_runs["runs"]["padim"]
    ddp = run_train(tmp / f"padim-{strategy}", *model, *data, *CPU_DDP, f"trainer.strategy={strategy}")
    expected, got = padim_buffers(single), padim_buffers(ddp)
    assert expected.keys() == got.keys() and len(got) == 3
    # the channels-last backbone's convolutions (oneDNN) sum in an order that depends on the
    # process's threads (one per rank here): the features differ by float rounding (the means
    # by up to 4e-6), which the inverse Cholesky factor of an 11-image covariance lifts to 6e-5
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=2e-4, msg=key)
    expected, got = logged_metrics(single), logged_metrics(ddp)
    assert got["train/normal_images"] == expected["train/normal_images"] == 11
    for name in CLASSIFICATION_METRICS:
        assert got[f"test/{name}"] == pytest.approx(expected[f"test/{name}"], abs=1e-6), name
    # every pixel's score moves with the Gaussian's float sums (summed in another order across
    # ranks, equal to rtol 1e-4 above): the pixel AUROC of 9 test maps moves in the 6th decimal
    assert got["test/pixel_auroc"] == pytest.approx(expected["test/pixel_auroc"], abs=1e-5)
    assert_single_outputs(ddp, {"epoch_000.ckpt", "last.ckpt"})


SEMACNN = ["model=semacnn", "model.padim.feature_size=8", "model.padim.k=10", "model.classifier_epochs=1"]


def semacnn_single_run(folder_runs) -> Path:
    if "semacnn" not in folder_runs["runs"]:
        data = folder_overrides(folder_runs["root"], "data.train_normal_only=false", "data.batch_size=4")
        folder_runs["runs"]["semacnn"] = run_train(folder_runs["tmp"] / "sema-single", *SEMACNN, *data)
    return folder_runs["runs"]["semacnn"]


@pytest.mark.slow
def test_semacnn_checkpoint_test_metrics_equal_under_ddp(folder_runs) -> None:
    """Two processes evaluating the single-process SeMaCNN checkpoint give its test metrics."""
    single = semacnn_single_run(folder_runs)
    data = folder_overrides(folder_runs["root"], "data.train_normal_only=false", "data.batch_size=4")
    best = single / "checkpoints" / "epoch_001.ckpt"  # the fit epoch is never the best
    ddp = run_train(
        folder_runs["tmp"] / "sema-ddp-eval", *SEMACNN, *data, "train=false", f"ckpt_path='{best}'", *CPU_DDP
    )
    expected, got = logged_metrics(single), logged_metrics(ddp)
    for name in CLASSIFICATION_METRICS:
        assert got[f"test/{name}"] == pytest.approx(expected[f"test/{name}"], abs=1e-6), name


@pytest.mark.slow
def test_semacnn_padim_fit_equals_under_ddp(folder_runs) -> None:
    """SeMaCNN's stage 1 under DDP fits the same Gaussian as one process (the classifier is
    trained, so the module is wrapped in DistributedDataParallel, whose buffer broadcast must
    leave PaDiM's per-rank sums alone). The heatmap scale is the mean of the ranks' quantiles
    and stage 2 trains with per-rank batches, so the rest of a DDP fit is not compared."""
    single = semacnn_single_run(folder_runs)
    data = folder_overrides(folder_runs["root"], "data.train_normal_only=false", "data.batch_size=4")
    ddp = run_train(folder_runs["tmp"] / "sema-ddp", *SEMACNN, *data, *CPU_DDP)
    expected, got = padim_buffers(single), padim_buffers(ddp)
    for key in ("model.padim.mean", "model.padim.inv_cholesky"):  # SemaCnn's PaDiM
        # atol as in test_padim_fit_and_test_metrics_equal_under_ddp: channels-last rounding
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-4, msg=key)
    assert_single_outputs(ddp)


@pytest.mark.slow
def test_detector_test_metrics_of_a_checkpoint_equal_under_ddp(tmp_path: Path, detection_data) -> None:
    """Faster R-CNN (ResNet-18, 64 px): mAP and the confusion matrix of one checkpoint on the
    first 4 test images — 2 batches of 2 in one process, 1 batch of 2 on each of two."""
    common = [
        "model=faster_rcnn",
        *FAST_DETECTOR_OVERRIDES,
        "model.confusion_score_threshold=0.05",  # count the weak detections of a barely trained model
        "data=pvel",
        f"data.root='{detection_data.pvel_root}'",
        "data.image_size=64",
        "data.batch_size=2",
        "data.num_workers=0",
    ]
    single = run_train(
        tmp_path / "single",
        *common,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2",
    )
    best = single / "checkpoints" / "epoch_000.ckpt"
    ddp = run_train(
        tmp_path / "ddp",
        *common,
        "train=false",
        f"ckpt_path='{best}'",
        "trainer.limit_test_batches=1",
        *CPU_DDP,
    )
    expected, got = logged_metrics(single), logged_metrics(ddp)
    names = [k for k in expected if k.startswith("test/") and k != "test/loss"]
    assert "test/map_50" in names and len(names) > 5
    for name in names:
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name
    matrix = (single / "test" / "confusion_matrix.csv").read_text()
    assert (ddp / "test" / "confusion_matrix.csv").read_text() == matrix
    assert sum(int(v) for line in matrix.splitlines()[1:] for v in line.split(",")[1:]) > 0
    assert_single_outputs(ddp)


def _detection_metrics_on_rank(rank: int, world: int, port: int, sampler: str, results: dict) -> None:
    import torch.distributed as dist

    from elinspect.metrics.detection import DetectionConfusionMatrix, DetectionMetrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective mismatch between the ranks fails within a minute, not gloo's default 30
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    box = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    no_box = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    metrics, confusion = DetectionMetrics(["crack"]), DetectionConfusionMatrix(num_classes=1)
    samplers = {"padded": DistributedSampler, "unrepeated": UnrepeatedDistributedSampler}
    for i in samplers[sampler](range(5), num_replicas=world, rank=rank, shuffle=False):
        target = {
            **(no_box if i == 0 else {"boxes": box + i, "labels": torch.tensor([1])}),
            "image_id": torch.tensor(i),
        }
        pred = {
            "boxes": box + i,
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9 if i == 0 else 0.6]),
        }
        metrics.update([pred], [target])
        confusion.update([pred], [target])
    results[rank] = (float(metrics.compute()["map_50"]), confusion.compute().tolist())
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["padded", "unrepeated"])
def test_detection_metrics_gathered_over_ranks_count_each_image_once(sampler: str) -> None:
    """Two gloo ranks over 5 images: torch's padded sampler serves [0, 2, 4] and [1, 3, 0];
    the evaluation loaders' unrepeated one (:mod:`elinspect.data.sharding`) serves [0, 2, 4]
    and [1, 3], so the ranks hold different numbers of images. Either way the gathered mAP and
    confusion counts are those of the 5 images (image 0 a false positive once)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_detection_metrics_on_rank, args=(2, port, sampler, results), nprocs=2)
        results = dict(results)
    for map_50, matrix in results.values():
        assert map_50 == pytest.approx(0.8)  # precision 4/5 at every recall, not 4/6
        assert matrix == [[4, 0], [1, 0]]  # 4 boxes found, 1 false positive


GANAE = ["model=ganae", "model.image_size=32", "model.base_channels=4"]
GANAE += ["model.generator_epochs=1", "model.encoder_epochs=1", "model.n_critic=1"]


@pytest.mark.slow
def test_ganae_trains_under_ddp_and_its_checkpoint_tests_the_same(folder_runs) -> None:
    """GAN-AE trains one part per stage (critic and generator, then the encoder), so DDP must
    look for unused parameters (the model asks for it); the decision threshold is set on the
    gathered scores, so evaluating a single-process checkpoint on two ranks gives its metrics."""
    data = folder_overrides(folder_runs["root"], "data.batch_size=4")
    single = run_train(folder_runs["tmp"] / "ganae-single", *GANAE, *data)
    ddp_fit = run_train(folder_runs["tmp"] / "ganae-ddp", *GANAE, *data, *CPU_DDP)
    assert_single_outputs(ddp_fit)
    fitted = load_state(ddp_fit / "checkpoints" / "last.ckpt")
    assert bool(fitted["generator_trained"]) and math.isfinite(float(fitted["net.threshold"]))
    assert math.isfinite(logged_metrics(ddp_fit)["test/f1"])

    last = ["train=false", f"ckpt_path='{single / 'checkpoints' / 'last.ckpt'}'"]
    single_eval = run_train(folder_runs["tmp"] / "ganae-single-eval", *GANAE, *data, *last)
    ddp_eval = run_train(folder_runs["tmp"] / "ganae-ddp-eval", *GANAE, *data, *last, *CPU_DDP)
    expected, got = logged_metrics(single_eval), logged_metrics(ddp_eval)
    for name in CLASSIFICATION_METRICS:
        assert got[f"test/{name}"] == pytest.approx(expected[f"test/{name}"], abs=1e-6), name
