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


def test_train_help_describes_every_config_group() -> None:
    """``python -m elinspect.train --help``: a line on what each group of conf/ is for, then its options."""
    import re
    import subprocess
    import sys

    from tests.conftest import CONFIG_DIR, REPO

    done = subprocess.run(
        [sys.executable, "-m", "elinspect.train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    described_block = done.stdout.partition("Config groups")[2].split("\n\n")[0]
    described = set()
    for line in described_block.splitlines()[1:]:  # "  data            the dataset, ..."
        described.update(re.split(r"\s{2,}", line.strip())[0].split(", "))
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    assert groups <= described, sorted(groups - described)
    assert (
        "model: autoencoder, baf, classifier, ebba, faster_rcnn, ganae, padim, rddn, semacnn" in done.stdout
    )
