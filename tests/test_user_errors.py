"""A user's mistake gets one short block and exit status 2, not a traceback under the config tree
(elinspect.utils.errors); a bug keeps its traceback; HYDRA_FULL_ERROR=1 / verbose=true show it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from elinspect.data.errors import DatasetError
from elinspect.export import export_checkpoint
from elinspect.inference import resolve_device
from elinspect.predict import predict_images
from elinspect.train import train
from elinspect.utils.errors import USAGE_EXIT_CODE, ConfigError, UserError, find_user_error, user_errors
from tests.conftest import REPO


def run_entry(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
    )


def test_a_missing_dataset_prints_one_short_block_and_exits_2(tmp_path: Path) -> None:
    """The issue's case: model=ebba data=pvel without PVEL-AD at hand printed 278 lines."""
    done = run_entry(
        "elinspect.train",
        "model=ebba",
        "data=pvel",
        f"paths.data_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    output = done.stdout + done.stderr
    assert done.returncode == USAGE_EXIT_CODE, output
    assert len(output.splitlines()) <= 15, output
    assert "Traceback" not in output
    assert "_target_" not in output  # the config tree is printed only once the data and model are built
    assert f"error (DatasetError): {tmp_path / 'PVEL-AD'}: does not exist" in done.stderr
    assert "python -m elinspect.data.synthetic pvel" in done.stderr  # what to do


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    done = run_entry(
        "elinspect.train",
        "model=ebba",
        "data=pvel",
        f"paths.data_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "raise DatasetError" in done.stderr


def test_a_required_option_left_unset_is_named(tmp_path: Path) -> None:
    done = run_entry("elinspect.predict", "input=x", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == USAGE_EXIT_CODE, done.stderr
    assert done.stderr.startswith("error (ConfigError): ckpt_path must be given: add ckpt_path=...")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("overrides", "kind", "words"),
    [
        (["ckpt_path=/nonexistent/last.ckpt"], "CheckpointError", "/nonexistent/last.ckpt does not exist"),
        (
            ["model=faster_rcnn", "data=elpv"],
            "IncompatibleConfigError",
            "Datasets that fit model=faster_rcnn",
        ),
        (["model.padim.embedding=bogus"], "ConfigError", "embedding must be semi_orthogonal"),
        (["model.net.arch=resnet7"], "ConfigError", "unknown backbone 'resnet7'"),
        (["data.threshold_rule=xx"], "ConfigError", "data.threshold_rule must be gt or ge"),
        (["model.net.weights=/nonexistent/w.pth"], "WeightsUnavailableError", "/nonexistent/w.pth"),
        (["data.image_size=-3"], "ConfigError", "data.image_size must be a whole number >= 1, got -3"),
    ],
)
def test_each_kind_of_mistake_is_reported_as_a_user_error(make_cfg, capsys, overrides, kind, words) -> None:
    cfg = make_cfg("train.yaml", overrides)
    with pytest.raises(SystemExit) as stopped, user_errors(cfg):
        train(cfg)
    assert stopped.value.code == USAGE_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith(f"error ({kind}):") and words in err, err


def test_an_output_directory_with_checkpoints_is_reported(make_cfg, capsys) -> None:
    cfg = make_cfg("train.yaml", [])
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"an earlier run")
    with pytest.raises(SystemExit), user_errors(cfg):
        train(cfg)
    assert capsys.readouterr().err.startswith("error (OutputExistsError):")
    assert (checkpoints / "last.ckpt").read_bytes() == b"an earlier run"


def test_a_user_error_wrapped_by_hydra_instantiate_is_found() -> None:
    cause = DatasetError("/data/x.xml", "malformed XML")
    try:
        try:
            raise cause
        except DatasetError as err:
            raise InstantiationException("Error in call to target 'X'") from err
    except InstantiationException as wrapped:
        assert find_user_error(wrapped) is cause


def test_a_bug_keeps_its_traceback_and_verbose_shows_user_errors(capsys) -> None:
    with pytest.raises(RuntimeError, match="a bug"), user_errors({}):
        raise RuntimeError("a bug")
    with pytest.raises(ConfigError), user_errors({"verbose": True}):
        raise ConfigError("k must be 1")
    assert capsys.readouterr().err == ""
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: export_checkpoint("x.ckpt", "tflite"), "format must be one of"),
        (lambda: export_checkpoint("x.ckpt", "onnx", exporter="x"), "exporter must be one of"),
        (lambda: predict_images("x.ckpt", "in", "out", batch_size=0), "batch_size must be >= 1, got 0"),
        (lambda: resolve_device("cuda"), "device=cuda was asked for, but no CUDA device"),
        (lambda: resolve_device("gpu0"), "device='gpu0' is not a device"),
    ],
)
def test_a_bad_export_or_predict_option_is_a_user_error(call, words, capsys, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped, user_errors({}):
        call()
    assert stopped.value.code == USAGE_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith("error (ConfigError):") and words in err, err
