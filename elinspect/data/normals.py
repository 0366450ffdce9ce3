"""Which images of a batch are defect-free: what every anomaly model fits or calibrates on.

The SeMaCNN paper (§2.2.2): "A set of images without defects has been selected as a training
subset". A binary target can put doubtful cells in class 0 (ELPV at the 0.33 threshold: p = 1/3
is label 0 but is not defect-free), so a datamodule that knows more than the label says so per
sample under ``defect_free`` (ELPV: defect probability 0). Without that key, label 0 is
defect-free (a folder of normal images), and a batch without labels is all normal.

A statistic computed once over the training split (PaDiM's Gaussian, SeMaCNN's heatmap scale,
GAN-AE's threshold) asks for ``once=True``: under DDP it then leaves out the images that the
training loader serves a second time only to pad a rank (``repeat``, :mod:`elinspect.data.sharding`),
so every image counts once, as in one process. Gradient steps take the padding as Lightning
gives it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def defect_free(batch: dict[str, Tensor], once: bool = False) -> Tensor:
    """A boolean mask over the batch: the images known to be free of defects; with ``once``,
    not those a DDP training loader repeats to pad its rank."""
    if "defect_free" in batch:
        mask = batch["defect_free"].bool()
    elif "label" in batch:
        mask = batch["label"] == 0
    else:
        mask = torch.ones(len(batch["image"]), dtype=torch.bool, device=batch["image"].device)
    if once and "repeat" in batch:
        mask = mask & ~batch["repeat"].bool().to(mask.device)
    return mask


def normal_images(batch: dict[str, Tensor], once: bool = False) -> Tensor:
    """The batch's defect-free images (all of them for a batch without labels)."""
    return batch["image"][defect_free(batch, once)]


def unaugmented_normal_images(batch: dict[str, Tensor], once: bool = False) -> Tensor:
    """The batch's defect-free images as the evaluation transform gives them: a model that
    computes a statistic on its training images asks the datamodule for them
    (``extra_inputs = {"unaugmented"}``); a batch without them was not augmented."""
    return batch.get("image_unaugmented", batch["image"])[defect_free(batch, once)]
