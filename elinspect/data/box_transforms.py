"""Geometry of detection images with their boxes: resizing, box-aware flips (albumentations),
and the integer shifts of RDDN's misaligned templates.

Images are resized *before* they become tensors (``image_size``: the longer side, or a fixed
square), which bounds memory for 1024-px PVEL-AD images.
"""

from __future__ import annotations

from typing import Literal

import albumentations as A
import cv2
import numpy as np

Resize = Literal["longer", "square"]


def detection_augmentation(
    hflip: float = 0.5,
    vflip: float = 0.5,
    scale_limit: float = 0.0,
    scale_p: float = 0.5,
    with_template: bool = False,
) -> A.Compose:
    """Box-aware flips in Pascal VOC pixel boxes.

    Boxes follow the image (a horizontal flip maps ``x1, x2`` to ``W − x2, W − x1``); the
    label fields ``labels`` and ``difficult`` travel with them. EL cells have no preferred
    orientation, so both flips are label-preserving (as the SeMaCNN paper flips cells, §2.1).
    ``with_template`` adds a second image target ``template`` that gets exactly the image's
    flips (an aligned template must stay aligned).

    There is no random scale here: torchvision's ``GeneralizedRCNNTransform`` resizes every
    image to the detector's ``min_size`` / ``fixed_size``, so a rescaled image reaches the
    backbone at the same size (only blurred by an extra resampling). Multi-scale training is
    the detector's: ``model.detector.min_size=[...]``, one size drawn per training image.
    ``scale_limit`` > 0 is refused with that advice.
    """
    if scale_limit > 0 and scale_p > 0:
        raise ValueError(
            f"data.augment.scale_limit={scale_limit}: a random rescale before the detector does nothing "
            "(torchvision resizes every image to model.detector.min_size / fixed_size). For multi-scale "
            "training give the detector several sizes, e.g. model.detector.min_size=[480,560,640]"
        )
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(A.VerticalFlip(p=vflip))
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True)
    targets = {"template": "image"} if with_template else None
    return A.Compose(steps, bbox_params=bbox_params, additional_targets=targets)


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` at ``width``×``height``, interpolated as :func:`resize_with_boxes` does."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    shrink = width * height < w * h
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``image`` moved by ``dx`` pixels right and ``dy`` down (integers), borders replicated."""
    if dx == 0 and dy == 0:
        return image
    height, width = image.shape[:2]
    matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float64)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
    )


def random_shift(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
    """``(dx, dy)``, each of magnitude drawn uniformly in ``low..high`` with a random sign."""
    magnitude = rng.integers(low, high + 1, size=2)
    sign = rng.choice(np.array([-1, 1]), size=2)
    dx, dy = (int(v) for v in magnitude * sign)
    return dx, dy


def resize_with_boxes(
    image: np.ndarray, boxes: np.ndarray, size: int | None, mode: Resize = "longer"
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to a ``size``×``size`` square, or so that the longer side is ``size`` (aspect
    kept); boxes are scaled with the image. ``size=None`` leaves both as they are."""
    if size is None:
        return image, boxes
    height, width = image.shape[:2]
    if mode == "square":
        new_w, new_h = size, size
    elif mode == "longer":
        scale = size / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    else:
        raise ValueError(f"resize must be 'longer' or 'square', got {mode!r}")
    if (new_w, new_h) == (width, height):
        return image, boxes
    image = resize_to(image, new_w, new_h)
    factors = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    boxes = boxes * factors
    boxes = np.minimum(boxes, np.array([new_w, new_h] * 2, dtype=np.float32))
    return image, boxes.astype(np.float32)
