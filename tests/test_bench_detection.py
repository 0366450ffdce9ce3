"""The detection benchmark's protocol (experiments/bench_detection.py, issue 20 item 2): interleaved
rounds with the order reversed every other round, warm-up discarded, and ratios taken per round."""

from __future__ import annotations

import pytest

from tests.conftest import experiment_script


@pytest.fixture(scope="module")
def bench():
    yield from experiment_script("bench_detection")


def make(bench, name: str):
    return bench.Bench(name, "resnet18", None, module=None, optimizer=None, params_m=0.0)


class FakeClock:
    def __init__(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = wall, cpu


def test_rounds_alternate_the_order_discard_the_warm_up_and_keep_one_time_per_round(bench) -> None:
    group = [make(bench, "faster_rcnn"), make(bench, "ebba"), make(bench, "baf")]
    calls: list[str] = []
    # the machine slows down round by round: a drift that a ratio of two medians would misread
    scale = {"faster_rcnn": 1.0, "ebba": 1.5, "baf": 2.0}

    def call(b):
        calls.append(b.name)
        drift = 1 + (len(calls) - 1) // 3  # one machine state per round
        return FakeClock(scale[b.name] * drift, scale[b.name] * drift / 2)

    bench.interleaved(group, "train", call, warmup=1, repeats=4)

    names = ["faster_rcnn", "ebba", "baf"]
    assert calls == names + names[::-1] + names + names[::-1] + names
    assert [len(b.train["s"]) for b in group] == [4, 4, 4]  # the warm-up round is not kept
    assert bench.pair_ratios(group[1], group[0], "train", "s") == pytest.approx([1.5] * 4)
    assert bench.pair_ratios(group[2], group[0], "train", "cpu") == pytest.approx([2.0] * 4)


def test_per_round_ratios_pair_calls_of_the_same_round(bench) -> None:
    a, b = make(bench, "faster_rcnn"), make(bench, "ebba")
    a.infer["s"] = [1.0, 2.0, 4.0, 1.0]
    b.infer["s"] = [1.2, 2.6, 4.4, 1.4]
    assert bench.pair_ratios(b, a, "infer", "s") == pytest.approx([1.2, 1.3, 1.1, 1.4])
    q1, median, q3 = bench.quartiles(bench.pair_ratios(b, a, "infer", "s"))
    assert median == pytest.approx(1.25)  # the ratio of the medians would be 2.0 / 1.5 = 1.33
    assert q1 == pytest.approx(1.175) and q3 == pytest.approx(1.325)


def test_backbone_and_model_arguments_are_checked(bench) -> None:
    assert bench.parse_models(["ebba", "faster_rcnn", "ebba"]) == ["faster_rcnn", "ebba"]
    assert bench.parse_backbones(["resnet50", "efficientnet_lite0:imagenet"]) == [
        ("resnet50", None),
        ("efficientnet_lite0", "imagenet"),
    ]
    with pytest.raises(SystemExit, match="conf/model"):
        bench.parse_models(["yolo"])
    with pytest.raises(SystemExit, match="--backbones"):
        bench.parse_backbones(["resnet7"])
