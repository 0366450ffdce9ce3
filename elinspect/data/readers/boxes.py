"""Checks shared by the detection readers: box sanitising, image size, paths kept inside the root.

Every reader builds its boxes in ``x1, y1, x2, y2`` pixel coordinates and passes them
through :func:`sanitize_boxes` before making a :class:`~elinspect.data.records.DetectionRecord`,
so the same rules hold whatever the on-disk format.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.images import read_header

CLIPPED = "box clipped to image"
NON_FINITE = "box with non-finite coordinates"
NON_POSITIVE = "box with zero or negative area"
DUPLICATE = "identical duplicate box dropped"
OUTSIDE_ROOT = "path outside the dataset root"
SIZE_MISMATCH = "declared image size differs from the image (the image's is used)"


def sanitize_boxes(
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: np.ndarray | Sequence[int],
    difficult: np.ndarray | Sequence[bool],
    width: int | None,
    height: int | None,
    path: str | Path | None,
    tally: ErrorTally,
    *,
    numbers: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip boxes to the image and drop (or raise on) the ones that are not boxes at all.

    Rules, applied to ``x1, y1, x2, y2`` pixel boxes:

    * a box with a NaN or infinite coordinate is **bad** ("non-finite coordinates");
    * a box partly outside the image is clipped to ``[0, width] × [0, height]`` and counted
      in ``tally`` under ``"box clipped to image"`` (never fatal); with ``width`` or
      ``height`` ``None`` that axis is not clipped;
    * a box whose width or height is zero or negative after clipping is **bad** ("zero or
      negative area"): this covers degenerate boxes, swapped corners and boxes wholly
      outside the image;
    * a box identical to an earlier one of the same image (same label, same coordinates
      after clipping) is dropped and counted under ``"identical duplicate box dropped"``
      (never fatal: annotation tools export double clicks); the kept box is ``difficult``
      only if every copy was.

    A bad box goes to ``tally.report`` as a :class:`DatasetError` naming ``path`` and the
    box: under ``on_error="raise"`` the first one raises, under ``"skip"`` each is dropped
    and counted. ``numbers`` are the box numbers used in messages (e.g. the object's
    position in the annotation file); they default to ``0 .. N-1``.

    Returns ``(boxes float32 (M, 4), labels int64 (M,), difficult bool (M,))``.
    """
    raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    difficult = np.asarray(difficult, dtype=bool).reshape(-1)
    if not len(raw) == len(labels) == len(difficult):
        raise ValueError(f"{len(raw)} boxes, {len(labels)} labels and {len(difficult)} difficult flags")
    numbers = list(range(len(raw))) if numbers is None else list(numbers)

    clipped = raw.copy()
    if width is not None:
        clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    if height is not None:
        clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    out = clipped.astype(np.float32)
    # Checked on the float32 result too, so a finite float64 that overflows float32 is caught.
    finite = np.isfinite(raw).all(axis=1) & np.isfinite(out).all(axis=1)
    positive = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    good = finite & positive

    tally.count(CLIPPED, int((good & (clipped != raw).any(axis=1)).sum()))
    for i in np.flatnonzero(~good):
        coords = ", ".join(f"{v:g}" for v in raw[i])
        if not finite[i]:
            problem, reason = f"box #{numbers[i]} [{coords}] has non-finite coordinates", NON_FINITE
        else:
            where = f" after clipping to the {width}×{height} image" if (clipped[i] != raw[i]).any() else ""
            problem, reason = f"box #{numbers[i]} [{coords}] has zero or negative area{where}", NON_POSITIVE
        tally.report(DatasetError(path, problem), reason=reason)
    return _drop_duplicates(out[good], labels[good], difficult[good], tally)


def _drop_duplicates(
    boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray, tally: ErrorTally
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first of each group of identical ``(label, box)`` rows; ``difficult`` only if all are."""
    first: dict[tuple, int] = {}
    keep, all_difficult = [], []
    for i, (box, label, hard) in enumerate(
        zip(boxes.tolist(), labels.tolist(), difficult.tolist(), strict=True)
    ):
        key = (label, *box)
        if key in first:
            all_difficult[first[key]] &= hard
            continue
        first[key] = len(keep)
        keep.append(i)
        all_difficult.append(hard)
    if len(keep) == len(boxes):
        return boxes, labels, difficult
    tally.count(DUPLICATE, len(boxes) - len(keep))
    return boxes[keep], labels[keep], np.asarray(all_difficult, dtype=bool)


def image_size(image_path: str | Path) -> tuple[int, int]:
    """``(width, height)`` read from the image file's header, without decoding the pixels.

    Raises :class:`DatasetError` naming the image when it is missing, empty, not an image,
    or declares more pixels than the limit (a decompression bomb;
    :func:`elinspect.data.images.read_header`).
    """
    return read_header(image_path)


def path_inside(root: str | Path, relative: str) -> Path:
    """``root / relative`` as a normalised absolute path, refused if it leaves ``root``.

    The check is lexical (``..`` and absolute paths are caught; symlinks inside the tree
    are followed as usual, so a dataset assembled from links still works). Raises
    :class:`DatasetError` ("... outside the dataset root") for an escaping path or one
    containing a NUL character.
    """
    base = os.path.normpath(os.path.abspath(root))
    if "\x00" in relative:
        raise DatasetError(base, f"path {relative!r} contains a NUL character")
    full = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, full]) != base:
        raise DatasetError(base, f"path {relative!r} resolves to {full}, outside the dataset root")
    return Path(full)


def is_json_number(value: object) -> bool:
    """A JSON coordinate: an int or a float (not a bool) that fits a float (a huge int does not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True
