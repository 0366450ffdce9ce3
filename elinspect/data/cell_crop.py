"""Cutting a solar cell out of a raw EL image: dark-border threshold, Douglas–Peucker, perspective crop.

SeMaCNN's pre-processing for raw HEPV images (``semacnn.txt`` §2.1.1 / §2.2.1): pixels
below 50 are the dark border around the cell; the cell's outline, skewed by the camera,
is reduced to a quadrilateral with the Douglas–Peucker algorithm (``cv2.approxPolyDP``),
and the quadrilateral is warped to an upright rectangle.

Two choices the paper leaves open: the outline is the largest bright contour's *convex
hull* (a dark notch on the cell edge, e.g. a broken corner, would otherwise keep the
polygon from shrinking to 4 points), and the Douglas–Peucker tolerance starts at 1 % of the
perimeter and grows until 4 corners remain. ``close`` (a kernel size in pixels, off by
default) bridges dark lines narrower than it, such as busbars or cracks that would split
the cell into several bright regions.
"""

from __future__ import annotations

import cv2
import numpy as np

EPSILON_FRACTIONS = tuple(np.round(np.arange(0.01, 0.2001, 0.005), 4))


def order_corners(points: np.ndarray) -> np.ndarray:
    """Four points as float32 (4, 2) (x, y) in the order top-left, top-right, bottom-right, bottom-left.

    Sorted by angle around their centroid (clockwise on screen, y pointing down), starting
    at the point with the smallest x + y.
    """
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if points.shape != (4, 2):
        raise ValueError(f"a quadrilateral has 4 corners, got {len(points)} points")
    centre = points.mean(axis=0)
    angles = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])
    clockwise = points[np.argsort(angles)]
    start = int(np.argmin(clockwise.sum(axis=1)))
    return np.roll(clockwise, -start, axis=0)


def find_cell_quadrilateral(image_u8: np.ndarray, threshold: int = 50, close: int = 0) -> np.ndarray:
    """The cell's corners in a raw EL image as float32 (4, 2) (x, y), ordered tl, tr, br, bl.

    ``image_u8``: H×W (or H×W×3, turned grey) uint8. Pixels below ``threshold`` are the dark
    border. Raises ValueError when nothing is bright or the outline is not a quadrilateral.
    """
    image = np.asarray(image_u8)
    if image.dtype != np.uint8:
        raise ValueError(f"find_cell_quadrilateral takes a uint8 image, got {image.dtype}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mask = (image >= threshold).astype(np.uint8)
    if close > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise ValueError(
            f"no bright region found: every pixel is below the border threshold {threshold} "
            f"(image max {int(image.max())})"
        )
    outline = cv2.convexHull(max(contours, key=cv2.contourArea))
    perimeter = cv2.arcLength(outline, True)
    count = len(outline)
    for fraction in EPSILON_FRACTIONS:
        approx = cv2.approxPolyDP(outline, fraction * perimeter, True)
        count = len(approx)
        if count == 4:
            return order_corners(approx)
        if count < 4:
            break
    raise ValueError(
        f"the largest bright region (area {cv2.contourArea(outline):.0f} px, threshold {threshold}) is "
        f"not a quadrilateral: Douglas–Peucker left {count} corners at epsilon {fraction:g} × perimeter"
    )


def crop_cell(
    image: np.ndarray, quad: np.ndarray, size: int | tuple[int, int], nearest: bool = False
) -> np.ndarray:
    """Warp the quadrilateral ``quad`` (4 (x, y) corners, any order) of ``image`` to an upright
    ``size`` = side or (width, height) image of the same dtype and channels (``nearest``
    interpolation for masks, bilinear otherwise)."""
    width, height = (size, size) if isinstance(size, int) else size
    source = order_corners(quad)
    target = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(source, target)
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpPerspective(
        image, matrix, (int(width), int(height)), flags=flags, borderMode=cv2.BORDER_REPLICATE
    )


def quadrilateral_size(quad: np.ndarray) -> tuple[int, int]:
    """(width, height) of the upright rectangle a quadrilateral maps to: the mean lengths of
    its opposite sides, so the cell keeps its resolution."""
    tl, tr, br, bl = order_corners(quad)
    width = (np.linalg.norm(tr - tl) + np.linalg.norm(br - bl)) / 2
    height = (np.linalg.norm(bl - tl) + np.linalg.norm(br - tr)) / 2
    return max(1, round(float(width))), max(1, round(float(height)))


def cut_out_cell(
    image: np.ndarray, mask: np.ndarray | None = None, threshold: int = 50, close: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """The cell of a raw EL image (and the same region of its mask), upright, at its own size.

    Raises ValueError (see :func:`find_cell_quadrilateral`) when no cell outline is found.
    """
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    quad = find_cell_quadrilateral(grey, threshold, close)
    size = quadrilateral_size(quad)
    cell = crop_cell(image, quad, size)
    return cell, None if mask is None else crop_cell(mask, quad, size, nearest=True)
