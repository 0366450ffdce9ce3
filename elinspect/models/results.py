"""What one call of a method's torch model returns: a named result (anomalib's ``InferenceBatch``
idea), the same in training, evaluation, prediction and export.

Each is a ``NamedTuple`` of tensors, so a traced or exported model hands the fields over as
its outputs in order, and Python code reads them by name. Every image-level model returns one:

- :class:`Classification` — :class:`~elinspect.models.classification.ImageClassifier`;
- :class:`AnomalyResult` — PaDiM and the autoencoder (image score = the map's maximum or mean);
- :class:`Reconstruction` — GAN-AE (its score, |x − x̂| and x̂);
- :class:`HeatmapClassification` — SeMaCNN (PaDiM's map and the heatmap classifier's classes).

The detectors return torchvision's list of ``{"boxes", "labels", "scores"}`` per image.
"""

from __future__ import annotations

import typing
from typing import NamedTuple

from torch import Tensor, nn


class Classification(NamedTuple):
    """Class logits N×K and their softmax N×K."""

    logits: Tensor
    probabilities: Tensor


class AnomalyResult(NamedTuple):
    """Image anomaly scores N and anomaly maps N×1×H×W at the input's size."""

    score: Tensor
    anomaly_map: Tensor


class Reconstruction(NamedTuple):
    """Image anomaly scores N, anomaly maps N×1×H×W at the input's size, and the reconstructions
    N×C×h×w at the network's size."""

    score: Tensor
    anomaly_map: Tensor
    reconstruction: Tensor


class HeatmapClassification(NamedTuple):
    """Anomaly maps N×1×H×W, and the class logits N×K and probabilities N×K read off them."""

    anomaly_map: Tensor
    logits: Tensor
    probabilities: Tensor


def result_type(model: nn.Module) -> type | None:
    """The result type a torch model's ``forward`` is annotated to return, if it says (what
    export reads to find the outputs of a model no export family lists)."""
    try:
        return typing.get_type_hints(type(model).forward).get("return")
    except (NameError, TypeError):
        return None
