"""Checkpoints and weight files carrying a malicious pickle are refused at every entry.

The payload's ``__reduce__`` would run ``touch <marker>`` through ``os.system`` when
unpickled; each entry must refuse the file with a clear error naming it, and the marker must
not exist afterwards: a weights file (``model.*.weights=<file>``), a file planted in torch's
hub cache under a torchvision weights name, ``python -m elinspect.eval ckpt_path=…``, a
resumed training run (``ckpt_path=last``), and GAN-AE's ``model.generator_ckpt``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from torch import nn

from elinspect.eval import evaluate
from elinspect.train import train
from elinspect.utils.checkpoint import CheckpointError, check_checkpoint, read_checkpoint, resolve_checkpoint
from elinspect.utils.weights import UnsafeCheckpointError, load_weights
from tests.conftest import FAST_DATA_OVERRIDES


class Payload:
    """Pickles as a call of ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def malicious_checkpoint(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A Lightning-looking checkpoint with the payload beside a real state dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else nn.Linear(2, 2).state_dict()
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0, "hyper_parameters": Payload(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the malicious pickle ran"


def test_the_payload_would_run_if_loaded_unsafely(tmp_path: Path) -> None:
    """The test's own check: an unsafe load does run it."""
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", tmp_path / "ran")
    torch.load(evil, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_a_weights_file_is_refused(tmp_path: Path, marker: Path, monkeypatch) -> None:
    evil = malicious_checkpoint(tmp_path / "weights.pth", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # explicit weights_only=True wins
    with pytest.raises(UnsafeCheckpointError, match=rf"weights file {evil} refused: .*posix\.system"):
        load_weights(nn.Linear(2, 2), evil)


def test_a_planted_file_in_the_torch_hub_cache_is_refused(tmp_path: Path, marker: Path, monkeypatch) -> None:
    """A file already in the hub cache is loaded without a hash check: it must still be safe."""
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    malicious_checkpoint(cached, marker)
    with pytest.raises(UnsafeCheckpointError, match="cached weights for .* refused: .*posix.system"):
        load_weights(nn.Linear(2, 2), "ResNet18_Weights.IMAGENET1K_V1")


def test_eval_refuses_the_checkpoint_before_building_anything(
    make_cfg, tmp_path: Path, marker, monkeypatch
) -> None:
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = make_cfg("eval.yaml", [f"ckpt_path={evil}", "logger=csv"])
    with pytest.raises(CheckpointError, match=rf"(?s)checkpoint {evil} refused: .*posix\.system"):
        evaluate(cfg)


def resume_cfg(make_cfg, marker: Path):
    cfg = make_cfg(
        "train.yaml", ["model=classifier", *FAST_DATA_OVERRIDES["elpv"], "logger=csv", "ckpt_path=last"]
    )
    evil = malicious_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", marker)
    with open_dict(cfg):
        cfg.test = False
    return cfg, evil


def test_resuming_from_a_malicious_last_checkpoint_is_refused(make_cfg, marker: Path) -> None:
    cfg, evil = resume_cfg(make_cfg, marker)
    with pytest.raises(CheckpointError, match=rf"(?s)checkpoint {evil} refused: .*posix\.system"):
        train(cfg)


def test_resuming_stays_safe_whatever_the_environment_says(make_cfg, tmp_path: Path, monkeypatch) -> None:
    ran = tmp_path / "RAN"
    cfg, _ = resume_cfg(make_cfg, ran)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception):  # noqa: B017 (whatever fails later, the payload must not run)
        train(cfg)
    assert not ran.exists(), "the malicious pickle ran"


def test_ganae_generator_checkpoint_is_refused(tmp_path: Path, marker: Path) -> None:
    from elinspect.models.anomaly.ganae_module import GanAeModule

    evil = malicious_checkpoint(tmp_path / "generator.ckpt", marker)
    with pytest.raises(Exception, match="Weights only load failed|refused") as info:
        GanAeModule.load_generator(object.__new__(GanAeModule), evil)
    assert "posix.system" in str(info.value)


def test_checkpoint_helpers(tmp_path: Path, marker: Path) -> None:
    good = tmp_path / "checkpoints" / "last.ckpt"
    good.parent.mkdir()
    torch.save({"state_dict": nn.Linear(2, 2).state_dict(), "global_step": 7}, good)
    assert read_checkpoint(good)["global_step"] == 7
    assert resolve_checkpoint("last", good.parent) == good
    assert (
        resolve_checkpoint("last", tmp_path / "nowhere") is None
        and resolve_checkpoint(None, tmp_path) is None
    )
    check_checkpoint("last", good.parent)
    check_checkpoint("last", tmp_path / "nowhere")  # Lightning starts afresh then
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"not a Lightning checkpoint \(no state_dict\): it is a dict"):
        read_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt could not be loaded safely"):
        read_checkpoint(tmp_path / "cut.ckpt")
    evil = malicious_checkpoint(tmp_path / "evil" / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match=rf"checkpoint {evil} refused"):
        check_checkpoint("last", evil.parent)
