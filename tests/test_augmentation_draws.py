"""Each random step of an augmentation draws on its own: with a horizontal and a vertical flip of
probability 0.5 every training image comes out unflipped, flipped one way, the other way or both,
about a quarter of the time each, in every datamodule.

albumentations' ``Compose.set_random_seed`` gives every transform the same seed, so the flips
(and the rotation) drew the same numbers and came out together: only "none" or "both". A
sample's seed now reaches the pipeline as one shared generator (``transforms.seed_pipeline``).
"""

from __future__ import annotations

from collections import Counter

import hydra
import numpy as np
import pytest
import torch

from elinspect.data.transforms import image_augmentation, seed_pipeline
from tests.conftest import group_options

FLIPS = {
    "classification": "{hflip: 0.5, vflip: 0.5, rotate_limit: 0}",
    "detection": "{hflip: 0.5, vflip: 0.5}",
}
DETECTION = ("pvel", "voc", "coco", "fabric", "aluminum")
DRAWS = 80  # a quarter is 20 draws; a fair pipeline puts at least 8 in each (p > 0.999)


def image_of(item) -> np.ndarray:
    image = item["image"] if isinstance(item, dict) else item[0]
    return image.float().mean(dim=0).numpy()


def flip_of(image: np.ndarray, plain: np.ndarray) -> str:
    """Which flip of ``plain`` ``image`` is: the nearest, which must be close."""
    candidates = {"none": plain, "h": plain[:, ::-1], "v": plain[::-1], "hv": plain[::-1, ::-1]}
    distance = {name: float(np.abs(image - c).mean()) for name, c in candidates.items()}
    nearest = min(distance, key=distance.get)
    assert distance[nearest] < 0.05 * max(float(np.abs(plain).max()), 1e-6), distance
    return nearest


@pytest.mark.parametrize("data", group_options("data"))
def test_the_two_flips_are_drawn_independently(make_cfg, fast_data_overrides, data: str) -> None:
    kind = "detection" if data in DETECTION else "classification"
    base = [f"data={data}", *fast_data_overrides(data)]
    augmented = hydra.utils.instantiate(make_cfg("train.yaml", [*base, f"data.augment={FLIPS[kind]}"]).data)
    plain = hydra.utils.instantiate(make_cfg("train.yaml", [*base, "data.augment=null"]).data)
    for dm in (augmented, plain):
        dm.setup("fit")
    reference = image_of(plain.dataset("train")[0])
    assert not np.allclose(reference, reference[:, ::-1]) and not np.allclose(reference, reference[::-1])
    dataset = augmented.dataset("train")
    seen = Counter()
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        seen[flip_of(image_of(dataset[0]), reference)] += 1
    assert all(seen[name] >= 8 for name in ("none", "h", "v", "hv")), (data, dict(seen))


def test_the_rotation_is_drawn_apart_from_the_flip() -> None:
    """A flip and the rotation (each p = 0.5) meet in all four ways, not only together."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    pipeline = image_augmentation(hflip=0.5, vflip=0.0, rotate_limit=90, rotate_p=0.5)
    seen = Counter()
    for seed in range(DRAWS):
        seed_pipeline(pipeline, seed)
        out = pipeline(image=image)["image"]
        flipped = np.array_equal(out, image[:, ::-1])
        seen["flip only" if flipped else "none" if np.array_equal(out, image) else "rotated"] += 1
    # rotated: with or without the flip, half the draws; untouched and flipped-only a quarter each
    assert seen["none"] >= 8 and seen["flip only"] >= 8 and seen["rotated"] >= 24, dict(seen)


def test_seeding_a_pipeline_repeats_its_draws() -> None:
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    pipeline = image_augmentation(hflip=0.5, vflip=0.5, rotate_limit=45, rotate_p=0.5)

    def draw(seed: int) -> bytes:
        seed_pipeline(pipeline, seed)
        return pipeline(image=image)["image"].tobytes()

    assert all(draw(seed) == draw(seed) for seed in range(10))
    assert len({draw(seed) for seed in range(20)}) > 4  # and other seeds draw otherwise
