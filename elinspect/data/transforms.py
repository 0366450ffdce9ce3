"""Albumentations pipelines for image-level tasks, seeded for reproducible runs.

Albumentations draws from its own generators, not from torch's, so a pipeline is
reseeded per sample from torch's generator (``sample_seed``): under
``seed_everything(workers=True)`` every run with the same seed sees the same
augmentations, and successive epochs still see different ones.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import torch


def image_augmentation(
    hflip: float = 0.5, vflip: float = 0.5, rotate_limit: float = 90, rotate_p: float = 0.5
) -> A.Compose:
    """Flips and rotation about the centre, as the SeMaCNN paper augments EL cells (§2.1)."""
    steps = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(A.VerticalFlip(p=vflip))
    if rotate_limit > 0 and rotate_p > 0:
        steps.append(A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=rotate_p))
    return A.Compose(steps)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize (area interpolation when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = size < max(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def sample_seed() -> int:
    """A seed drawn from torch's global generator (seeded per worker by Lightning)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def seed_pipeline(pipeline: A.Compose, seed: int) -> None:
    """Seed ``pipeline``'s random draws for one sample: one generator, shared by its steps.

    Not ``Compose.set_random_seed``: albumentations 2 hands that seed to every step, which then
    draw the same numbers, so a horizontal and a vertical flip of p = 0.5 happen together or not
    at all (and a rotation of p = 0.5 only with them).
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def apply_seeded(pipeline: A.Compose, image: np.ndarray, seed: int) -> np.ndarray:
    seed_pipeline(pipeline, seed)
    return pipeline(image=image)["image"]
