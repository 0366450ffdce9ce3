"""The NEU-DET speed-settings benchmark (experiments/bench_neu_det_settings.py, real_data.md
§5.3): each variant composes to the settings its name says. The interleaved rounds are
bench_detection.py's, tested in test_bench_detection.py."""

import pytest

from tests.conftest import experiment_script


@pytest.fixture(scope="module")
def bench():
    detection = experiment_script("bench_detection")  # imported by name by the script
    next(detection)
    yield from experiment_script("bench_neu_det_settings")
    next(detection, None)


def settings(cfg) -> tuple[int, int, int, int, int]:
    d = cfg.model.detector
    return (
        cfg.data.image_size,
        d.min_size,
        d.max_size,
        d.box_batch_size_per_image,
        d.backbone.frozen_stages,
    )


def test_each_variant_composes_to_the_settings_it_names(bench) -> None:
    expected = {  # image size, detector min / max size, RoIs per image, frozen stages
        "§5: 256 px, 128 RoIs, nothing frozen": (256, 256, 256, 128, 0),
        "200 px": (200, 200, 200, 128, 0),
        "64 RoIs": (256, 256, 256, 64, 0),
        "stem and stage 1 frozen": (256, 256, 256, 128, 2),
        "§5.3: all three": (200, 200, 200, 64, 2),
    }
    assert list(bench.VARIANTS) == list(expected)
    for name, overrides in bench.VARIANTS.items():
        cfg = bench.compose_config(overrides)
        assert settings(cfg) == expected[name], name
        assert cfg.model.detector.backbone.weights == "imagenet"  # experiment=neu_det's backbone
