"""Reading images from disk into uint8 arrays, with errors that name the file.

Every image goes through the same checks, in this order, each failing with a
:class:`~elinspect.data.errors.DatasetError` that names the file and the problem:

1. the file exists and is not empty;
2. its **header** is readable (Pillow, which parses headers without decoding pixels):
   a text file named ``.jpg`` fails here;
3. the declared ``width × height`` is at most ``max_pixels`` (default: Pillow's
   ``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 M pixels; set that to allow bigger images).
   A decompression bomb — a small file declaring a huge image — is thus refused **before
   any pixel is decoded**. (OpenCV has its own limit too, the ``CV_IO_MAX_IMAGE_PIXELS``
   environment variable, 2³⁰ by default.)
4. a JPEG must reach its end-of-image marker: OpenCV fills a truncated JPEG with grey
   and says nothing, so the marker structure is walked first (:func:`jpeg_is_complete`);
5. OpenCV decodes; anything it cannot decode (a truncated PNG, garbage after a valid
   header) fails.

Then 16-bit images are scaled to 8 bits (the high byte: full scale maps to full scale; one
whose values all lie below 256 is an error, below 4096 it is logged once),
an alpha channel is dropped, and colour is kept (RGB) or turned into grey as asked.

Checks 1–3 are cheap (:func:`read_header`), so readers run them on every image at setup,
where ``data.on_error=skip`` can still drop a bad image; checks 4–5 need the pixels and
happen when an item is loaded, where a bad file always stops the run with its name.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from elinspect.data.errors import DatasetError

log = logging.getLogger(__name__)
_few_bits_reported = False  # a 16-bit image of ≤ 12 bits is logged once per process

_JPEG_SOI = b"\xff\xd8"
# markers that stand alone (no length field): TEM, RST0..7, SOI, EOI
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})


def max_image_pixels() -> int | None:
    """The default pixel limit: Pillow's ``MAX_IMAGE_PIXELS`` (``None``: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def read_header(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels.

    Raises :class:`DatasetError` naming ``path`` ("cannot read the image header: …") when the
    file is missing, empty or not an image Pillow can parse, and when it declares more than
    ``max_pixels`` pixels (``None``: the default of :func:`max_image_pixels`).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "cannot read the image header: the file does not exist")
    if path.stat().st_size == 0:
        raise DatasetError(path, "cannot read the image header: the file is empty (0 bytes)")
    return _parse_header(path, path, max_pixels, "cannot read the image header")


def _parse_header(
    path: Path, source: Path | io.BytesIO, max_pixels: int | None, unreadable: str
) -> tuple[int, int]:
    """Pillow's ``(width, height)`` of ``source``; ``unreadable`` starts the message of a parse error."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
    except Image.DecompressionBombError as error:
        raise DatasetError(path, f"refused as a decompression bomb before decoding: {error}") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        detail = str(error).replace(repr(source), repr(str(path)))  # Pillow names the buffer
        raise DatasetError(path, f"{unreadable} ({detail})") from error
    if limit is not None and width * height > limit:
        raise DatasetError(
            path,
            f"declares {width}×{height} = {width * height} pixels, more than the limit of {limit}: "
            "refused as a decompression bomb before decoding (raise PIL.Image.MAX_IMAGE_PIXELS "
            "if the image is genuine)",
        )
    return width, height


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG stream reaches its end-of-image marker (``FFD9``) at the top level.

    Segments are skipped by their length (so an EXIF thumbnail's own markers are not
    mistaken for the image's), entropy-coded data is scanned for the next marker (``FF00``
    stuffing, ``RSTn`` and fill bytes are not markers). Anything after the end marker,
    such as a video appended by a phone camera, is ignored.
    """
    pos, end = 2, len(data)
    while True:
        i = data.find(b"\xff", pos)
        if i < 0 or i + 1 >= end:
            return False
        marker = data[i + 1]
        if marker == 0xD9:
            return True
        if marker in (0x00, 0xFF) or marker in _STANDALONE:
            pos = i + 1 if marker == 0xFF else i + 2
            continue
        if i + 4 > end:
            return False
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return False
        pos = i + 2 + length


def _sixteen_to_eight_bits(path: Path, image: np.ndarray) -> np.ndarray:
    """The high byte (full scale to full scale). Values that all lie below 256 would all become
    0: an error; below 4096 (a 12-bit camera's, stored in 16 bits) they become 0..15: logged."""
    global _few_bits_reported
    top = int(image.max())
    if 0 < top < 256:
        raise DatasetError(
            path,
            f"a 16-bit image whose values all lie below 256 (max {top}) would read as black: 16 bits "
            "become 8 by the high byte; save it as 8-bit, or scaled to the 16-bit range",
        )
    if 0 < top < 4096 and not _few_bits_reported:
        _few_bits_reported = True
        log.warning(
            "%s: a 16-bit image whose values all lie below 4096 (max %d, e.g. a 12-bit camera's) reads "
            "as 0..%d of 255: 16 bits become 8 by the high byte. Scale such images to the 16-bit range "
            "(or save them as 8-bit) first; further ones are not reported",
            path,
            top,
            top >> 8,
        )
    return (image >> 8).astype(np.uint8)


def read_image(path: str | Path, grey: bool = True, max_pixels: int | None = None) -> np.ndarray:
    """Read ``path`` as ``H×W`` (``grey``) or ``H×W×3`` RGB uint8 (checks: module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "image file does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(path, f"cannot read the image file ({error})") from error
    if not data:
        raise DatasetError(path, "image file is empty (0 bytes)")
    _parse_header(
        path, io.BytesIO(data), max_pixels, "cannot decode image (not an image: its header is unreadable)"
    )
    if data.startswith(_JPEG_SOI) and not jpeg_is_complete(data):
        raise DatasetError(path, "truncated JPEG: the file ends before its end-of-image marker")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(path, "cannot decode image (corrupt, truncated, or not an image)")
    if image.dtype == np.uint16:
        image = _sixteen_to_eight_bits(path, image)
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
