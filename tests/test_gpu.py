"""GPU checks (``@pytest.mark.gpu``: skipped without CUDA by the conftest hook): every model
config runs on one GPU in bf16 mixed precision, with and without channels-last, a compiled
classifier trains, and a two-GPU DDP run (skipped with fewer than two GPUs) writes one set of
outputs and fits PaDiM as one GPU does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from elinspect.train import train
from elinspect.utils.compat import data_tasks, model_task
from tests.conftest import fast_model_overrides, group_options
from tests.test_ddp import assert_single_outputs, folder_overrides, logged_metrics, padim_buffers, run_train

pytestmark = pytest.mark.gpu

GPU_RUN = ["trainer=gpu", "trainer.fast_dev_run=true", "+trainer.enable_model_summary=false", "logger=csv"]


def first_dataset(make_cfg, model: str) -> str:
    """The first data config (alphabetically) that provides the task ``model`` needs, preferring
    those the tests generate (a lent GPU machine has no elpv-dataset package: make gpu-check)."""
    task = model_task(make_cfg("train.yaml", [f"model={model}"]).model)
    options = sorted(group_options("data"), key=lambda d: d == "elpv")
    return next(d for d in options if task in data_tasks(make_cfg("train.yaml", [f"data={d}"]).data))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("model", group_options("model"))  # every conf/model/*.yaml present
def test_every_model_runs_on_one_gpu(make_cfg, fast_data_overrides, model: str, channels_last: bool) -> None:
    data = first_dataset(make_cfg, model)
    overrides = [
        f"model={model}",
        f"data={data}",
        *GPU_RUN,
        f"trainer.speed.channels_last={str(channels_last).lower()}",
        *fast_data_overrides(data),
        *fast_model_overrides(model),
    ]
    cfg = make_cfg("train.yaml", overrides, fast=False)
    metrics, objects = train(cfg)
    trainer, module = objects["trainer"], objects["model"]
    assert trainer.state.finished and trainer.precision == "bf16-mixed"
    assert next(module.parameters()).device.type == "cuda"
    assert any(k.startswith("test/") for k in metrics), metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_compiled_classifier_trains_on_one_gpu(make_cfg, fast_data_overrides) -> None:
    overrides = [
        "model=classifier",
        "data=folder",
        *fast_data_overrides("folder"),
        "data.train_normal_only=false",
        *GPU_RUN,
        "trainer.speed.compile=true",  # inductor
        "trainer.speed.channels_last=true",
    ]
    metrics, objects = train(make_cfg("train.yaml", overrides, fast=False))
    assert objects["model"].net._compiled_call_impl is not None
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ddp_classifier_and_padim(tmp_path: Path, folder_data_factory) -> None:
    """trainer=ddp as shipped (2 GPUs, bf16-mixed, SyncBatchNorm): a classifier trains with one
    set of outputs; PaDiM's Gaussian fitted on two GPUs equals the one fitted on one GPU (bf16
    features in both; float64 sums reduced over the ranks)."""
    root = folder_data_factory()
    data = folder_overrides(root, "data.train_normal_only=false", "data.batch_size=4")
    classifier = run_train(tmp_path / "cls", "model=classifier", *data, "trainer=ddp", "trainer.max_epochs=2")
    assert_single_outputs(classifier)
    saved = sorted(p.name for p in (classifier / "checkpoints").iterdir())
    assert len(saved) == 2 and saved[-1] == "last.ckpt", saved  # the best epoch and the last
    assert "test/f1" in logged_metrics(classifier)

    padim = ["model=padim", "model.padim.feature_size=8", "model.padim.k=10", "trainer.max_epochs=1"]
    data = folder_overrides(root, "data.batch_size=4")
    one = run_train(tmp_path / "padim-1", *padim, *data, "trainer=gpu")
    two = run_train(tmp_path / "padim-2", *padim, *data, "trainer=ddp")
    expected, got = padim_buffers(one), padim_buffers(two)
    for key in ("padim.mean", "padim.inv_cholesky"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-3, msg=key)
