"""The reader-independent description of one annotated detection image.

Every detection reader (PVEL-AD/VOC XML, COCO JSON, Aluminum labelme, Fabric JSON)
produces :class:`DetectionRecord` objects; datamodules, transforms and metrics only ever
see these, so a new on-disk format needs a reader and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DetectionRecord:
    """One image with its boxes.

    ``boxes`` are ``(N, 4)`` float32 pixel coordinates ``x1, y1, x2, y2`` in the stored
    image; ``labels`` are ``(N,)`` int64 indices into the dataset's class list **starting
    at 1** (0 is torchvision's background). ``width``/``height`` are what the annotation
    declares (``None`` when it declares nothing). ``template_path`` is the aligned
    defect-free reference image where the dataset has one (Fabric). ``annotated`` says that the
    dataset annotates a defect on the image (an annotation file or entry exists), whatever
    boxes survive class filtering and sanitising: an image is known defect-free only when it
    is not annotated at all (what RDDN's PTG takes its normal samples from).
    """

    image_path: Path
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    width: int | None = None
    height: int | None = None
    template_path: Path | None = None
    annotated: bool = False

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.labels.shape != (n,) or self.difficult.shape != (n,):
            raise ValueError(
                f"{self.image_path}: boxes {self.boxes.shape}, labels {self.labels.shape} and "
                f"difficult {self.difficult.shape} disagree"
            )

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)
