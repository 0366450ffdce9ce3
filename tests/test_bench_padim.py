"""The PaDiM benchmark (experiments/bench_padim.py, issue 20 item 3): its AUROC and the layers it
gives each implementation."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from tests.conftest import experiment_script


@pytest.fixture(scope="module")
def bench():
    yield from experiment_script("bench_padim")


class SplitStandIn:
    """A datamodule stand-in: two test batches, normal then defective."""

    def test_dataloader(self):
        yield {"image": torch.zeros(4, 3, 8, 8), "label": torch.tensor([0, 0, 0, 1])}
        yield {"image": torch.ones(4, 3, 8, 8), "label": torch.tensor([1, 1, 0, 1])}


def test_auroc_ranks_mahalanobis_distances_of_any_size(bench) -> None:
    """PaDiM's image scores are distances in the tens to hundreds; torchmetrics squashes scores
    outside [0, 1] with a sigmoid, under which they all tie at 1.0 (AUROC 0.5 for any model)."""
    distances = iter([torch.tensor([150.0, 151.0, 152.0, 190.0]), torch.tensor([180.0, 200.0, 153.0, 210.0])])
    result = bench.evaluate(lambda images: next(distances), SplitStandIn(), limit=None)
    assert result["test_images"] == 8
    assert result["auroc"] == pytest.approx(1.0)


def test_an_efficientnet_lite_gets_the_same_strides_in_both(bench) -> None:
    args = Namespace(backbone="efficientnet_lite0", layers=["1", "2", "3"])
    assert bench.elinspect_layers(args) == [1, 2, 3]
    assert bench.anomalib_backbone(args) == ("tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"])
    resnet = Namespace(backbone="resnet18", layers=["layer1", "layer2", "layer3"])
    assert bench.elinspect_layers(resnet) == ["layer1", "layer2", "layer3"]
    assert bench.anomalib_backbone(resnet) == ("resnet18", ["layer1", "layer2", "layer3"])


@pytest.fixture(scope="module")
def update_bench():
    yield from experiment_script("bench_padim_update")


def test_the_update_bench_times_both_checkouts_and_gives_their_ratio(update_bench, capsys) -> None:
    from tests.conftest import REPO

    update_bench.main(["--checkouts", str(REPO), str(REPO), "--pairs", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    for row in rows:
        a, b, ratio = (float(cell) for cell in row.strip("|").split("|")[1:])
        assert a > 0 and b > 0 and ratio == pytest.approx(a / b, rel=0.01)
    assert "as fast as A (median of 2 pairs" in out


@pytest.fixture(scope="module")
def folding_bench():
    yield from experiment_script("bench_folding")


def test_the_folding_bench_times_both_bodies_on_the_same_outputs(folding_bench) -> None:
    args = ["--backbone", "resnet18", "--weights", "none", "--stages", "1", "2", "--image-size", "32"]
    args += ["--batch-size", "2", "--pairs", "3", "--warmup", "1"]
    result = folding_bench.measure(folding_bench.parse_args(args))
    assert result["built_s"] > 0 and result["folded_s"] > 0
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
    assert result["relative_difference"] < 1e-4  # the same maps, to float rounding
    row = folding_bench.table(folding_bench.parse_args(args), result).splitlines()[-1]
    assert row.startswith("| resnet18 (none), stages [1, 2]") and f"**{result['ratio']:.2f}×**" in row
