"""Reading images from disk into uint8 arrays, with errors that name the file.

OpenCV decodes; anything it cannot decode (a zero-byte or truncated file, a text file
named ``.jpg``) is a :class:`~elinspect.data.errors.DatasetError`. 16-bit images are
scaled to 8 bits (the high byte), an alpha channel is dropped, colour is kept or turned
into grey as asked.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from elinspect.data.errors import DatasetError


def read_image(path: str | Path, grey: bool = True) -> np.ndarray:
    """Read ``path`` as ``H×W`` (``grey``) or ``H×W×3`` RGB uint8."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "image file does not exist")
    if path.stat().st_size == 0:
        raise DatasetError(path, "image file is empty (0 bytes)")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(path, "cannot decode image (corrupt, truncated, or not an image)")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DatasetError(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if grey:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return (
        cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    )


def to_tensor_layout(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``H×W`` or ``H×W×C`` → float32 ``channels×H×W`` in [0, 1] (grey repeated)."""
    image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    if image.shape[0] != channels:
        if image.shape[0] == 1:
            image = np.repeat(image, channels, axis=0)
        elif channels == 1:
            image = image.mean(axis=0, keepdims=True)
        else:
            raise ValueError(f"cannot turn a {image.shape[0]}-channel image into {channels} channels")
    return np.ascontiguousarray(image, dtype=np.float32) / 255.0
