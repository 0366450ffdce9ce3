"""Runs that survive failure: non-finite losses, a killed process resumed, an unwritable
output directory.

* :class:`~elinspect.callbacks.finite_loss.FiniteLossGuard` stops at a NaN loss naming the
  step and the loss terms, or skips exactly that step (the weights do not move);
* a run interrupted and resumed with ``ckpt_path=last`` ends bit-identical to an
  uninterrupted one, from a mid-epoch and from an end-of-epoch checkpoint, with
  :class:`~elinspect.data.resumable.ResumableDataLoader` (data order and position) and
  :class:`~elinspect.callbacks.rng_state.RandomStateCheckpoint` (global random states); a
  plain shuffling loader is shown not to be (why: see :mod:`elinspect.data.resumable`). The
  slow test kills ``python -m elinspect.train`` with SIGKILL mid-epoch and resumes it;
* an output directory that cannot be written fails before anything is computed, naming the
  directory, and earlier outputs stay intact.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from elinspect.callbacks.checkpoint import RunCheckpoint
from elinspect.callbacks.finite_loss import SKIPPED_METRIC, FiniteLossGuard, NonFiniteLossError
from elinspect.callbacks.rng_state import RandomStateCheckpoint
from elinspect.callbacks.weight_averaging import EmaWeightAveraging
from elinspect.data.elpv import ElpvDataModule
from elinspect.data.resumable import ResumableDataLoader
from elinspect.train import train
from elinspect.utils.outputs import OutputDirError, ensure_writable_dir
from tests.conftest import CONFIG_DIR, FAST_DATA_OVERRIDES, REPO

# ------------------------------------------------------------------------ a tiny module


class NoisyPoints(Dataset):
    """Points whose every read draws noise from torch's global generator (as augmentation does)."""

    def __init__(self, n: int = 30) -> None:
        self.x = torch.linspace(-1, 1, n * 4).reshape(n, 4)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


class Tiny(L.LightningModule):
    """A linear model with dropout; ``nan_at``: global steps whose loss is made NaN."""

    def __init__(self, nan_at: set[int] = frozenset(), resumable: bool = False, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))
        self.nan_at, self.resumable = set(nan_at), resumable
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        ce = F.cross_entropy(self.net(x), y)
        if self.global_step in self.nan_at:
            ce = ce * float("nan")
        reg = 1e-3 * sum(p.pow(2).sum() for p in self.parameters())
        self.log("train/loss_ce", ce, on_step=True)
        self.log("train/loss_reg", reg, on_step=True)
        loss = ce + reg
        self.log("train/loss", loss, on_step=True, on_epoch=not self.automatic_optimization)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return None
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        # momentum and weight decay: a step with zeroed gradients would still move the weights
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    def train_dataloader(self):
        if self.resumable:
            return ResumableDataLoader(NoisyPoints(), batch_size=5)
        return DataLoader(NoisyPoints(), batch_size=5, shuffle=True)

    def val_dataloader(self):
        return DataLoader(NoisyPoints(10), batch_size=5)


class Snapshots(L.Callback):
    """The flattened parameters after every training step."""

    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


def trainer(*callbacks: L.Callback, max_epochs: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        **kwargs,
    )


# ------------------------------------------------------------------------ non-finite loss


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_loss_terms() -> None:
    L.seed_everything(0)
    model, guard = Tiny(nan_at={2}), FiniteLossGuard("raise")
    with pytest.raises(NonFiniteLossError) as info:
        trainer(guard, limit_val_batches=0).fit(model)
    message = str(info.value)
    assert "non-finite loss at global step 2 (epoch 0, batch 2): loss = nan" in message
    assert "train/loss_ce=nan" in message and "train/loss_reg=0." in message
    assert "gradient_clip_val" in message  # what to do
    assert "training_step" not in model.__dict__  # the wrapper is gone after the failure


def test_skip_leaves_the_weights_of_the_nan_step_untouched_and_counts_it() -> None:
    L.seed_everything(0)
    model, guard, snapshots = Tiny(nan_at={2, 5}), FiniteLossGuard("skip"), Snapshots()
    fit = trainer(guard, snapshots, limit_val_batches=0)
    fit.fit(model)
    after = snapshots.after
    assert len(after) == 6 and fit.global_step == 6
    assert torch.equal(after[2], after[1]) and torch.equal(after[5], after[4])  # skipped: nothing moved
    assert not torch.equal(after[3], after[2]) and not torch.equal(after[1], after[0])  # the others did
    assert all(torch.isfinite(a).all() for a in after)
    assert guard.skipped == 2 and fit.callback_metrics[SKIPPED_METRIC] == 2
    assert guard.state_dict() == {"skipped": 2}


def test_skip_gives_up_after_max_skips() -> None:
    L.seed_everything(0)
    with pytest.raises(
        NonFiniteLossError, match=r"3 steps with a non-finite loss skipped, more than .*max_skips=2"
    ):
        trainer(FiniteLossGuard("skip", max_skips=2), limit_val_batches=0).fit(Tiny(nan_at=set(range(8))))


def test_manual_optimisation_refuses_skip_and_checks_logged_epoch_losses() -> None:
    L.seed_everything(0)
    with pytest.raises(ValueError, match="optimises manually .*on_nonfinite=raise"):
        trainer(FiniteLossGuard("skip"), limit_val_batches=0).fit(Tiny(manual=True))
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss in epoch 0 .*train/loss_epoch=nan"
    ):
        trainer(FiniteLossGuard("raise"), limit_val_batches=0).fit(Tiny(nan_at={3}, manual=True))


def test_the_callback_config_builds_the_guard() -> None:
    node = OmegaConf.load(CONFIG_DIR / "callbacks" / "finite_loss.yaml")
    guard = hydra.utils.instantiate(node.finite_loss)
    assert isinstance(guard, FiniteLossGuard) and guard.on_nonfinite == "raise"
    assert isinstance(
        hydra.utils.instantiate(OmegaConf.load(CONFIG_DIR / "callbacks" / "rng_state.yaml").rng_state),
        RandomStateCheckpoint,
    )
    with pytest.raises(ValueError, match="raise' or 'skip"):
        FiniteLossGuard("ignore")


def test_a_diverging_classifier_is_stopped_at_its_first_nan_step(make_cfg) -> None:
    """The real pipeline: a learning rate of 1e30 makes ResNet-18's loss NaN within a few steps."""
    cfg = make_cfg(
        "train.yaml",
        [
            "model=classifier",
            *FAST_DATA_OVERRIDES["elpv"],
            "data.image_size=32",
            "data.augment=null",
            "model.optimizer.lr=1e30",
            "callbacks=finite_loss",
            "logger=csv",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=6",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
        ],
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at global step \d \(epoch 0, batch \d\): loss = (nan|inf)"
    ):
        train(cfg)


# -------------------------------------------------------------------- last.ckpt


class Worsening(Tiny):
    """Validation gets worse every epoch: the best checkpoint is the first epoch's."""

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -float(self.current_epoch))


def test_last_ckpt_is_the_last_epoch_when_the_best_is_an_earlier_one(tmp_path: Path) -> None:
    """The run's checkpoint settings (a monitor, the top 1, ``save_last``). Lightning 2.6 writes
    ``last.ckpt`` only at a step where it also saves a top-k checkpoint, which made it a copy of
    the best one: resuming "the last checkpoint" silently went back to the best epoch."""
    node = OmegaConf.load(CONFIG_DIR / "callbacks" / "model_checkpoint.yaml").model_checkpoint
    node.dirpath, node.monitor, node.mode = str(tmp_path), "val/score", "max"
    checkpoint = hydra.utils.instantiate(node)
    L.seed_everything(0)
    fit = trainer(checkpoint, max_epochs=3)
    fit.fit(Worsening())
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert Path(checkpoint.best_model_path).name == "epoch_000.ckpt" and best["epoch"] == 0
    assert (last["epoch"], last["global_step"]) == (2, fit.global_step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]


# -------------------------------------------------------------------- resume, in process


class Crash(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class TinyClassifier(Tiny):
    task = "classification"  # what callbacks.ema accepts


def fit_tiny(
    directory: Path,
    resumable: bool,
    every_n_steps: int | None,
    crash: int | None = None,
    ckpt=None,
    ema: bool = False,
):
    """Two epochs of 6 steps from seed 1, as a fresh process would run them; the final weights
    (``ema``: with an EMA of the weights, whose average the model holds at the end)."""
    L.seed_everything(1, workers=True)
    model = TinyClassifier(resumable=resumable) if ema else Tiny(resumable=resumable)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=directory,
            save_last=True,
            every_n_train_steps=every_n_steps,
            save_top_k=0 if every_n_steps else 1,
        ),
        RandomStateCheckpoint(),
    ]
    if ema:
        callbacks.append(EmaWeightAveraging(decay=0.8))
    if crash is not None:
        callbacks.append(Crash(crash))
    run = trainer(*callbacks, max_epochs=2, num_sanity_val_steps=1)
    try:
        run.fit(model, ckpt_path=ckpt)
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), run.global_step


class ScriptedScore(Tiny):
    """Logs ``val/score`` = ``scores[epoch]``: its best epoch is known in advance."""

    scores = (0.9, 0.5, 0.4, 0.3)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.scores[self.current_epoch])


def test_a_run_resumed_into_a_new_directory_keeps_the_best_epoch_before_the_resume(tmp_path: Path) -> None:
    """The README's resume (``ckpt_path=<old run>/checkpoints/last.ckpt``) writes into a new
    run directory; epoch 0 (score 0.9) stays the best, and the test loads it, as in an
    uninterrupted run. The earlier run's checkpoints are left where they are."""

    def fit(
        directory: Path, epochs: int, ckpt: str | None = None, scores=ScriptedScore.scores
    ) -> RunCheckpoint:
        checkpoint = RunCheckpoint(
            dirpath=directory, monitor="val/score", mode="max", save_top_k=1, save_last=True
        )
        module = ScriptedScore()
        module.scores = scores
        trainer(checkpoint, max_epochs=epochs, num_sanity_val_steps=0).fit(module, ckpt_path=ckpt)
        return checkpoint

    first = fit(tmp_path / "run1", 2)
    best_before = first.best_model_path
    assert Path(best_before).name == "epoch=0-step=6.ckpt"
    resumed = fit(tmp_path / "run2", 4, ckpt=str(tmp_path / "run1" / "last.ckpt"))
    assert resumed.best_model_path == best_before
    assert float(resumed.best_model_score) == pytest.approx(0.9)
    assert Path(best_before).is_file() and (tmp_path / "run1" / "last.ckpt").is_file()
    assert (tmp_path / "run2" / "last.ckpt").is_file()
    assert not list((tmp_path / "run2").glob("epoch=*"))  # no later epoch beat it
    # a later epoch that beats it becomes the best, in the new directory; the old file stays
    better = fit(
        tmp_path / "run3", 4, ckpt=str(tmp_path / "run1" / "last.ckpt"), scores=(0.9, 0.5, 0.4, 0.95)
    )
    assert Path(better.best_model_path) == tmp_path / "run3" / "epoch=3-step=24.ckpt"
    assert Path(best_before).is_file()
    # the earlier best deleted since: the epochs after the resume rank among themselves
    Path(best_before).unlink()
    afresh = fit(tmp_path / "run4", 4, ckpt=str(tmp_path / "run1" / "last.ckpt"))
    assert Path(afresh.best_model_path) == tmp_path / "run4" / "epoch=2-step=18.ckpt"


@pytest.mark.parametrize(
    ("every_n_steps", "where"),
    [(2, "mid-epoch checkpoint at step 8"), (None, "end-of-epoch checkpoint at step 6")],
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    tmp_path: Path, every_n_steps, where: str
) -> None:
    reference, steps = fit_tiny(tmp_path / "reference", True, every_n_steps)
    fit_tiny(tmp_path / "crashed", True, every_n_steps, crash=9)  # epoch 1, batch 3
    saved = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == int(where.rsplit(" ", 1)[1])
    resumed, resumed_steps = fit_tiny(tmp_path / "crashed", True, every_n_steps, ckpt="last")
    assert steps == resumed_steps == 12
    assert torch.equal(reference, resumed), where


def test_a_resumed_ema_run_ends_with_the_uninterrupted_runs_average(tmp_path: Path) -> None:
    """Resuming restores both the raw weights and their average (the checkpoint's state_dict
    is the average; the raw weights come back from current_model_state)."""
    reference, _ = fit_tiny(tmp_path / "reference", True, 2, ema=True)
    fit_tiny(tmp_path / "crashed", True, 2, crash=9, ema=True)
    resumed, steps = fit_tiny(tmp_path / "crashed", True, 2, ckpt="last", ema=True)
    assert steps == 12
    assert torch.equal(reference, resumed)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_loader_resumed_twice_in_one_epoch_serves_each_item_once(workers: int) -> None:
    """The position saved after a mid-epoch resume counts the batches served before it too, also
    with worker processes (whose iterator draws the sampler's order when it is made, before the
    first batch): a second interruption in the same epoch must not replay what was served."""
    from torch.utils.data import TensorDataset

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(TensorDataset(torch.arange(20)), seed=3, batch_size=2, num_workers=workers)

    def take(source: ResumableDataLoader, batches: int) -> list[int]:
        iterator = iter(source)
        return [int(x) for _ in range(batches) for x in next(iterator)[0]]

    epoch = [int(x) for (batch,) in loader() for x in batch]  # one uninterrupted epoch
    first = loader()
    served = take(first, 2)
    second = loader()
    second.load_state_dict(first.state_dict())
    served += take(second, 3)
    assert second.state_dict()["served"] == 5
    third = loader()
    third.load_state_dict(second.state_dict())
    served += [int(x) for (batch,) in third for x in batch]
    assert served == epoch and sorted(served) == list(range(20))


@pytest.mark.slow
def test_a_plain_shuffling_loader_does_not_resume_mid_epoch_exactly(tmp_path: Path) -> None:
    """Why the resumable loader exists: Lightning restarts a plain loader's epoch order afresh."""
    reference, _ = fit_tiny(tmp_path / "reference", False, 2)
    fit_tiny(tmp_path / "crashed", False, 2, crash=9)
    resumed, _ = fit_tiny(tmp_path / "crashed", False, 2, ckpt="last")
    assert not torch.equal(reference, resumed)


# ---------------------------------------------------------- resume after SIGKILL, real CLI


class ResumableElpv(ElpvDataModule):
    """ELPV with the resumable training loader (the kill test's ``data._target_``)."""

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(self.dataset("train"), batch_size=self.hparams.batch_size, num_workers=0)


class KillAtStep(L.Callback):
    """SIGKILL this process when a batch starts at ``step`` (after the checkpoints of step - 1)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveFinalWeights(L.Callback):
    """Write the weights at the end of fit (``last.ckpt`` is rewritten only when a checkpoint is
    saved, so it need not hold the final weights)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), self.path)


CLI_RUN = [
    "model=classifier",
    "data.image_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    f"data._target_={ResumableElpv.__module__}.ResumableElpv",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.deterministic=true",
    "seed=3",
    "logger=csv",
    "callbacks=model_checkpoint",
    "+callbacks.rng_state._target_=elinspect.callbacks.rng_state.RandomStateCheckpoint",
    f"+callbacks.final._target_={SaveFinalWeights.__module__}.SaveFinalWeights",
    "+callbacks.final.path=${paths.output_dir}/final_weights.pt",
    "extras.print_config=false",
]


def cli_train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "elinspect.train", *CLI_RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def final_metrics(run_dir: Path) -> dict[str, str]:
    """The last value of every val/ and test/ column across the run's CSV logs."""
    values: dict[str, str] = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                values.update({k: v for k, v in row.items() if v and k.startswith(("val/", "test/"))})
    return values


@pytest.mark.slow
@pytest.mark.parametrize(
    ("checkpointing", "kill_at"),
    [(["+callbacks.model_checkpoint.every_n_train_steps=2"], 6), ([], 6)],
    ids=["mid-epoch-checkpoint", "end-of-epoch-checkpoint"],
)
def test_sigkilled_training_resumes_to_the_same_final_metrics(
    tmp_path: Path, checkpointing, kill_at: int
) -> None:
    """Kill ``python -m elinspect.train`` at step 6 (epoch 1, batch 2), resume with ckpt_path=last."""
    reference = cli_train(tmp_path / "reference", *checkpointing)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killer = [
        f"+callbacks.killer._target_={KillAtStep.__module__}.KillAtStep",
        f"+callbacks.killer.step={kill_at}",
    ]
    killed = cli_train(tmp_path / "run", *checkpointing, *killer)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == (kill_at if checkpointing else 4)  # mid-epoch, or the end of epoch 0

    resumed = cli_train(tmp_path / "run", *checkpointing, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = final_metrics(tmp_path / "reference"), final_metrics(tmp_path / "run")
    assert "test/loss" in expected and got == expected
    ref_state = torch.load(tmp_path / "reference" / "final_weights.pt", weights_only=True)
    run_state = torch.load(tmp_path / "run" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(ref_state[k], run_state[k]) for k in ref_state)


# ---------------------------------------------------------------- unwritable output dir


def unwritable_dirs(tmp_path: Path) -> list[Path]:
    """A path below a regular file (fails even for root) and, unless root, a read-only directory."""
    (tmp_path / "file.txt").write_text("a file, not a directory")
    dirs = [tmp_path / "file.txt" / "run"]
    if os.geteuid() != 0:  # root ignores permission bits
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o500)
        dirs.append(read_only)
    return dirs


def test_an_unwritable_output_dir_is_named_with_what_to_do(tmp_path: Path) -> None:
    assert ensure_writable_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not list((tmp_path / "new" / "run").iterdir())  # the probe file is gone
    for directory in unwritable_dirs(tmp_path):
        with pytest.raises(
            OutputDirError, match=rf"cannot write to the output directory {directory} .*hydra\.run\.dir"
        ):
            ensure_writable_dir(directory)


def test_training_into_an_unwritable_dir_fails_before_any_work_and_keeps_earlier_outputs(
    make_cfg, tmp_path
) -> None:
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    (earlier / "config.yaml").write_text("earlier: true\n")
    targets = [tmp_path / "file.txt" / "run"]
    (tmp_path / "file.txt").write_text("a file")
    if os.geteuid() != 0:
        earlier.chmod(0o500)
        targets.append(earlier)
    for target in targets:
        cfg = make_cfg(
            "train.yaml", ["model=classifier", *FAST_DATA_OVERRIDES["elpv"], "logger=csv", "ckpt_path=last"]
        )
        cfg.paths.output_dir = str(target)
        with pytest.raises(OSError, match=str(target)):
            train(cfg)
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run"
    assert (earlier / "config.yaml").read_text() == "earlier: true\n"
