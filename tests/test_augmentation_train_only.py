"""Augmentation touches the training split only, in every datamodule: validation and test
items equal those of the same datamodule built with ``augment: null``, while the training
items of an always-flipping augmentation differ from them."""

from __future__ import annotations

import hydra
import pytest
import torch

from tests.conftest import group_options

ALWAYS = {  # an augmentation that changes every training image
    "classification": "{hflip: 1.0, vflip: 1.0, rotate_limit: 0}",
    "detection": "{hflip: 1.0, vflip: 1.0}",
}


def image_of(item) -> torch.Tensor:
    return item["image"] if isinstance(item, dict) else item[0]


def boxes_of(item) -> torch.Tensor | None:
    return item[1]["boxes"] if isinstance(item, tuple) else None


@pytest.mark.parametrize("data", group_options("data"))
def test_val_and_test_items_equal_an_unaugmented_datamodules(
    make_cfg, fast_data_overrides, data: str
) -> None:
    base = [f"data={data}", *fast_data_overrides(data)]
    kind = "detection" if data in ("pvel", "voc", "coco", "fabric", "aluminum") else "classification"
    augmented = hydra.utils.instantiate(make_cfg("train.yaml", [*base, f"data.augment={ALWAYS[kind]}"]).data)
    plain = hydra.utils.instantiate(make_cfg("train.yaml", [*base, "data.augment=null"]).data)
    for dm in (augmented, plain):
        dm.setup("fit")
    for split in ("val", "test"):
        ours, reference = augmented.dataset(split), plain.dataset(split)
        assert len(ours) == len(reference) > 0, split
        for i in range(min(len(ours), 4)):
            torch.manual_seed(i)
            a = ours[i]
            torch.manual_seed(i)
            b = reference[i]
            assert torch.equal(image_of(a), image_of(b)), (data, split, i)
            if boxes_of(a) is not None:
                assert torch.equal(boxes_of(a), boxes_of(b)), (data, split, i)
    # the augmentation is live on the training split (else the comparison above proves nothing)
    torch.manual_seed(0)
    trained = image_of(augmented.dataset("train")[0])
    torch.manual_seed(0)
    assert not torch.equal(trained, image_of(plain.dataset("train")[0]))
