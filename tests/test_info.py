"""python -m elinspect.info: what a user pastes into a bug report."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from elinspect.info import main, report


def test_the_report_names_datasets_weights_device_and_versions(tmp_path: Path, capsys) -> None:
    (tmp_path / "PVEL-AD").mkdir()
    main(["--data-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert f"  pvel      found   {tmp_path / 'PVEL-AD'}" in text
    assert f"  voc       missing {tmp_path / 'VOC'}" in text
    assert "  elpv      installed (the elpv-dataset package)" in text
    assert "  folder    data.root=... (no default location)" in text
    assert "  efficientnet_lite0  imagenet: installed" in text
    assert "  resnet50            imagenet: " in text
    assert f"  torch {version('torch')}" in text and f"  torch build {torch.__version__}" in text
    assert ("CUDA: not available" in text) != torch.cuda.is_available()
    assert [line for line in text.splitlines() if not line.startswith(" ")] == [
        "datasets:",
        "pretrained weights (offline):",
        "device:",
        "versions:",
    ]


def test_without_a_data_dir_it_looks_below_the_project_data_dir() -> None:
    assert "/data/PVEL-AD" in report()
