"""Which images of a batch are defect-free: what every anomaly model fits or calibrates on.

The SeMaCNN paper (§2.2.2): "A set of images without defects has been selected as a training
subset". A binary target can put doubtful cells in class 0 (ELPV at the 0.33 threshold: p = 1/3
is label 0 but is not defect-free), so a datamodule that knows more than the label says so per
sample under ``defect_free`` (ELPV: defect probability 0). Without that key, label 0 is
defect-free (a folder of normal images), and a batch without labels is all normal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def defect_free(batch: dict[str, Tensor]) -> Tensor:
    """A boolean mask over the batch: the images known to be free of defects."""
    if "defect_free" in batch:
        return batch["defect_free"].bool()
    if "label" in batch:
        return batch["label"] == 0
    return torch.ones(len(batch["image"]), dtype=torch.bool, device=batch["image"].device)


def normal_images(batch: dict[str, Tensor]) -> Tensor:
    """The batch's defect-free images (all of them for a batch without labels)."""
    return batch["image"][defect_free(batch)]


def unaugmented_normal_images(batch: dict[str, Tensor]) -> Tensor:
    """The batch's defect-free images as the evaluation transform gives them: a model that
    computes a statistic on its training images asks the datamodule for them
    (``extra_inputs = {"unaugmented"}``); a batch without them was not augmented."""
    return batch.get("image_unaugmented", batch["image"])[defect_free(batch)]
