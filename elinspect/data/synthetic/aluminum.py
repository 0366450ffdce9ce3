"""Synthetic Aluminum: brushed aluminium profile surfaces in the Tianchi 2018 round 2 layout.

Imitates the aluminium data of the RDDN paper (``rddn.txt`` §III.A, Fig. 1): a coated
profile surface (silver, champagne or dark grey) with brushing streaks, the light bands of
the profile's curvature and a specular stripe, 2560×1920 in the release (default here
320×240, the same aspect). About 31 % of the images are defect-free (the release has 1351 of
4356). Defects use the release's Chinese class names: 不导电 non-conductive patches at an edge,
擦花 scratches, 角位漏底 bare metal at a corner, 桔皮 orange-peel texture, 漏底 bare metal
patches, 喷流 jet-flow streaks, 漆泡 paint bubbles, 起坑 pits, 杂色 off-colour blotches and
脏点 dirt specks. Each defect is drawn through a mask and annotated with the mask's outline:
a labelme polygon (the convex hull of the mask) or a rectangle, written as 2 corners
(``shape_type: rectangle``) or, as older labelme files do, as 4 corners without a shape type.
Output is byte-identical for the same arguments.

    python -m elinspect.data.synthetic aluminum --out DIR --num-images 200 --seed 0

Layout written (the release's category directories)::

    DIR/guangdong_round2_train_20181011/单瑕疵图片/<class>/<name>.{jpg,json}   one defect class
    DIR/guangdong_round2_train_20181011/多瑕疵图片/<name>.{jpg,json}           several classes
    DIR/guangdong_round2_train_20181011/无瑕疵样本/<name>.jpg                   defect-free
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import cv2
import numpy as np

RELEASE_DIR = "guangdong_round2_train_20181011"
SINGLE_DIR, MULTI_DIR, NORMAL_DIR = "单瑕疵图片", "多瑕疵图片", "无瑕疵样本"
JPEG_QUALITY = 92

ALUMINUM_NAME_MAP: dict[str, str] = {
    "不导电": "non_conductive",
    "擦花": "scratch",
    "角位漏底": "corner_leak",
    "桔皮": "orange_peel",
    "漏底": "leak_bottom",
    "喷流": "jet_flow",
    "漆泡": "paint_bubble",
    "起坑": "pitting",
    "杂色": "mottling",
    "脏点": "dirty_spot",
}
"""The release's 10 defect names and their English names (``conf/data/aluminum.yaml`` holds the same)."""

COATINGS = (  # BGR base colours: silver, champagne, dark grey
    np.array([200, 200, 198], np.float32),
    np.array([165, 195, 215], np.float32),
    np.array([115, 115, 118], np.float32),
)


def render_surface(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A defect-free coated, brushed profile surface as float32 BGR."""
    base = COATINGS[int(rng.integers(len(COATINGS)))] * rng.uniform(0.9, 1.08)
    noise = rng.normal(0, 1, (height, width)).astype(np.float32)
    length = max(3, int(width * rng.uniform(0.05, 0.15)) | 1)
    streaks = cv2.GaussianBlur(noise, (length, 1), 0)  # brushing along x
    streaks *= 8.0 / max(float(streaks.std()), 1e-6) * rng.uniform(0.5, 1.0)
    y = np.arange(height, dtype=np.float32) / height
    bands = 1 + 0.08 * np.cos(2 * np.pi * y * rng.uniform(1, 3) + rng.uniform(0, 2 * np.pi))
    spec_y, spec_w = rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.08)
    specular = 1 + rng.uniform(0.05, 0.15) * np.exp(-(((y - spec_y) / spec_w) ** 2))
    shade = (bands * specular)[:, None]
    return base[None, None, :] * shade[..., None] + streaks[..., None]


# --------------------------------------------------------------------------- defects

MaskFn = Callable[[np.random.Generator, np.ndarray], np.ndarray]


def _ellipse(
    mask: np.ndarray, centre: np.ndarray, axes: np.ndarray, angle: float, value: float = 1.0
) -> None:
    c = tuple(int(v) for v in np.round(centre))
    a = tuple(max(1, int(v)) for v in np.round(axes))
    cv2.ellipse(mask, c, a, angle, 0, 360, value, -1, cv2.LINE_AA)


def _patch(rng: np.random.Generator, h: int, w: int, centre: np.ndarray, size: float) -> np.ndarray:
    mask = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        _ellipse(
            mask, centre + rng.normal(0, size / 4, 2), size * rng.uniform(0.2, 0.5, 2), rng.uniform(0, 180)
        )
    return mask


def non_conductive(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """不导电: a large uncoated, mottled patch along the top or bottom edge."""
    h, w = img.shape[:2]
    centre = np.array([rng.uniform(0.2, 0.8) * w, (0.05 if rng.random() < 0.5 else 0.95) * h])
    mask = cv2.GaussianBlur(_patch(rng, h, w, centre, min(h, w) * rng.uniform(0.3, 0.6)), (0, 0), 2)
    img[:] = img * (1 - mask[..., None]) + (img * 0.8 + np.array([10, 25, 40], np.float32)) * mask[..., None]
    return mask


def scratch(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """擦花: a few thin parallel strokes, lighter or darker than the coating."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    start = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    length = min(h, w) * rng.uniform(0.1, 0.3)
    for k in range(int(rng.integers(1, 4))):
        p = start + normal * 3 * k
        q = p + direction * length * rng.uniform(0.6, 1.0)
        cv2.line(mask, tuple(np.round(p).astype(int)), tuple(np.round(q).astype(int)), 1.0, 1, cv2.LINE_AA)
    img += mask[..., None] * rng.choice([-60.0, 60.0])
    return mask


def corner_leak(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """角位漏底: bare dark metal in a corner of the profile."""
    h, w = img.shape[:2]
    corner = np.array([0 if rng.random() < 0.5 else w - 1, 0 if rng.random() < 0.5 else h - 1], np.float64)
    mask = _patch(rng, h, w, corner, min(h, w) * rng.uniform(0.15, 0.3))
    img[:] = img * (1 - mask[..., None]) + np.array([70, 72, 75], np.float32) * mask[..., None]
    return mask


def orange_peel(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """桔皮: a region of bumpy, dimpled coating."""
    h, w = img.shape[:2]
    centre = np.array([rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h])
    mask = cv2.GaussianBlur(_patch(rng, h, w, centre, min(h, w) * rng.uniform(0.25, 0.5)), (0, 0), 3)
    bumps = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
    img += (mask * bumps * 60.0)[..., None]
    return mask


def leak_bottom(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """漏底: a patch where the coating is missing and the metal shows."""
    h, w = img.shape[:2]
    centre = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    mask = _patch(rng, h, w, centre, min(h, w) * rng.uniform(0.06, 0.15))
    img[:] = img * (1 - mask[..., None]) + np.array([85, 90, 95], np.float32) * mask[..., None]
    return mask


def jet_flow(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """喷流: a long vertical drip streak of heavier coating."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    x = rng.uniform(0.1, 0.9) * w
    y0 = rng.uniform(0.0, 0.4) * h
    length = h * rng.uniform(0.3, 0.6)
    _ellipse(mask, np.array([x, y0 + length / 2]), np.array([max(2, w * 0.01), length / 2]), rng.normal(0, 3))
    mask = cv2.GaussianBlur(mask, (0, 0), 1.5)
    img *= 1 - 0.25 * mask[..., None]
    return mask


def paint_bubble(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """漆泡: a small cluster of bubbles, lit from the top left."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    centre = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    for _ in range(int(rng.integers(1, 5))):
        c = centre + rng.normal(0, min(h, w) * 0.02, 2)
        r = max(1.5, min(h, w) * rng.uniform(0.008, 0.02))
        _ellipse(mask, c, np.array([r, r]), 0)
        hl = np.zeros((h, w), np.float32)
        _ellipse(hl, c - r / 3, np.array([r / 2, r / 2]), 0)
        img += (hl * 50.0 - (mask - hl).clip(0) * 25.0)[..., None]
    return mask


def pitting(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """起坑: one or a few dark pits with a light rim."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    centre = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    for _ in range(int(rng.integers(1, 3))):
        c = centre + rng.normal(0, min(h, w) * 0.015, 2)
        r = max(1.5, min(h, w) * rng.uniform(0.006, 0.015))
        rim = np.zeros((h, w), np.float32)
        _ellipse(rim, c, np.array([r + 1, r + 1]), 0)
        pit = np.zeros((h, w), np.float32)
        _ellipse(pit, c, np.array([r, r]), 0)
        img += ((rim - pit).clip(0) * 40.0 - pit * 90.0)[..., None]
        np.maximum(mask, rim, out=mask)
    return mask


def mottling(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """杂色: an off-colour blotch."""
    h, w = img.shape[:2]
    centre = np.array([rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h])
    mask = cv2.GaussianBlur(_patch(rng, h, w, centre, min(h, w) * rng.uniform(0.1, 0.25)), (0, 0), 2)
    tint = rng.uniform(-35, 35, 3).astype(np.float32)
    img += mask[..., None] * tint
    return mask


def dirty_spot(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """脏点: a tiny dark speck."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    r = max(1.2, min(h, w) * rng.uniform(0.004, 0.012))
    _ellipse(
        mask, np.array([rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h]), np.array([r, r * 1.3]), 0
    )
    img *= 1 - 0.6 * mask[..., None]
    return mask


DEFECTS: dict[str, tuple[MaskFn, float]] = {  # per-image weights, roughly the release's shares
    "不导电": (non_conductive, 0.08),
    "擦花": (scratch, 0.13),
    "角位漏底": (corner_leak, 0.09),
    "桔皮": (orange_peel, 0.05),
    "漏底": (leak_bottom, 0.14),
    "喷流": (jet_flow, 0.08),
    "漆泡": (paint_bubble, 0.07),
    "起坑": (pitting, 0.09),
    "杂色": (mottling, 0.11),
    "脏点": (dirty_spot, 0.16),
}


@dataclass(frozen=True)
class LabelmeShape:
    label: str
    points: tuple[tuple[float, float], ...]
    shape_type: str | None  # None: an old labelme file without shape types


def outline(rng: np.random.Generator, label: str, mask: np.ndarray) -> LabelmeShape | None:
    """The labelme shape of a defect mask: its convex hull as a polygon, or its bounding
    rectangle (2 corners, or 4 corners without a shape type); ``None`` for an empty mask."""
    ys, xs = np.nonzero(mask > 0.3 * float(mask.max())) if mask.max() > 0 else (np.array([]), np.array([]))
    if len(xs) == 0:
        return None
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)
    kind = rng.random()
    if kind < 0.55:
        corners = np.stack([np.concatenate([xs, xs + 1]), np.concatenate([ys, ys + 1])], 1).astype(np.int32)
        hull = cv2.convexHull(corners)[:, 0, :]
        if len(hull) >= 3:
            return LabelmeShape(label, tuple((float(x), float(y)) for x, y in hull), "polygon")
    if kind < 0.8:
        return LabelmeShape(label, ((x0, y0), (x1, y1)), "rectangle")
    return LabelmeShape(label, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), None)


def render_aluminum_image(
    rng: np.random.Generator, width: int, height: int, labels: list[str]
) -> tuple[np.ndarray, list[LabelmeShape]]:
    """One uint8 BGR surface with one defect of each name in ``labels`` and their shapes."""
    img = render_surface(rng, width, height)
    shapes = []
    for label in labels:
        mask = DEFECTS[label][0](rng, img)
        shape = outline(rng, label, mask)
        if shape is not None:
            shapes.append(shape)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), shapes


def labelme_json(shapes: list[LabelmeShape], image_name: str, width: int, height: int) -> str:
    """A labelme 3.x file: shapes, colours, ``imagePath`` beside it, no embedded image data."""
    items = []
    for s in shapes:
        item = {
            "label": s.label,
            "line_color": None,
            "fill_color": None,
            "points": [list(p) for p in s.points],
        }
        if s.shape_type is not None:
            item["shape_type"] = s.shape_type
            item["flags"] = {}
        items.append(item)
    data = {
        "version": "3.16.2",
        "flags": {},
        "shapes": items,
        "lineColor": [0, 255, 0, 128],
        "fillColor": [255, 0, 0, 128],
        "imagePath": image_name,
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


# --------------------------------------------------------------------------- writing


def write_aluminum_dataset(
    out: Path,
    num_images: int,
    seed: int,
    width: int = 320,
    height: int = 240,
    normal_fraction: float = 0.31,
    multi_fraction: float = 0.15,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic Aluminum under ``out/guangdong_round2_train_20181011`` and return a summary.

    ``round(num_images * normal_fraction)`` images are defect-free (no JSON), a
    ``multi_fraction`` of the others has 2–3 defect classes. An existing release directory is
    an error unless ``overwrite``. Summary keys: ``root`` (the release directory),
    ``num_images``, ``num_normal``, ``num_multi``, ``boxes`` ({Chinese label: count}),
    ``num_boxes``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if width < 64 or height < 48:
        raise ValueError(f"images must be at least 64x48, got {width}x{height}")
    for name, frac in (("normal_fraction", normal_fraction), ("multi_fraction", multi_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {frac}")
    root = Path(out) / RELEASE_DIR
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root} exists (pass overwrite=True / --overwrite)")
        shutil.rmtree(root)

    master = np.random.default_rng(seed)
    normal = set(master.choice(num_images, round(num_images * normal_fraction), replace=False).tolist())
    names = list(DEFECTS)
    p = np.array([w for _, w in DEFECTS.values()])
    p /= p.sum()
    counts, num_multi = Counter(), 0
    start = datetime(2018, 9, 1, 8, 0, 0)
    children = np.random.SeedSequence(seed).spawn(num_images)
    for i, child in enumerate(children):
        rng = np.random.default_rng(child)
        stamp = (start + timedelta(seconds=37 * i + int(rng.integers(0, 30)))).strftime("%Y%m%d%H%M%S")
        if i in normal:
            labels, folder, name = [], root / NORMAL_DIR, f"无瑕疵{stamp}"
        elif rng.random() < multi_fraction:
            k = int(rng.integers(2, 4))
            labels = [names[j] for j in rng.choice(len(names), size=k, replace=False, p=p)]
            folder, name = root / MULTI_DIR, f"多瑕疵{stamp}"
            num_multi += 1
        else:
            label = names[int(rng.choice(len(names), p=p))]
            labels = [label] * (1 + int(rng.random() < 0.2))  # sometimes two of a kind
            folder, name = root / SINGLE_DIR / label, f"{label}{stamp}"
        image, shapes = render_aluminum_image(rng, width, height, labels)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.jpg"
        if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {path}")
        if labels:
            text = labelme_json(shapes, path.name, width, height)
            (folder / f"{name}.json").write_text(text, encoding="utf-8", newline="\n")
            counts.update(s.label for s in shapes)
    return {
        "root": root,
        "num_images": num_images,
        "num_normal": len(normal),
        "num_multi": num_multi,
        "boxes": dict(counts.most_common()),
        "num_boxes": sum(counts.values()),
    }


# --------------------------------------------------------------------------- CLI


def summary_line(summary: dict) -> str:
    per_class = ", ".join(f"{ALUMINUM_NAME_MAP[k]} {v}" for k, v in summary["boxes"].items()) or "none"
    return (
        f"aluminum: {summary['num_images']} images ({summary['num_normal']} defect-free, "
        f"{summary['num_multi']} with several classes), {summary['num_boxes']} boxes ({per_class}) "
        f"-> {summary['root']}"
    )


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``aluminum`` subcommand on the synthetic-data dispatcher."""
    p = subparsers.add_parser(
        "aluminum",
        help="Tianchi-2018-like brushed aluminium surfaces with labelme JSON (Aluminum layout)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, required=True, help=f"dataset root; writes OUT/{RELEASE_DIR}")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--width", type=int, default=320, help="image width (default 320; the release has 2560)")
    p.add_argument("--height", type=int, default=240, help="image height (default 240; the release has 1920)")
    p.add_argument("--normal-fraction", type=float, default=0.31, help="share of defect-free images")
    p.add_argument(
        "--multi-fraction", type=float, default=0.15, help="share of defect images with several classes"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    summary = write_aluminum_dataset(
        args.out,
        args.num_images,
        args.seed,
        width=args.width,
        height=args.height,
        normal_fraction=args.normal_fraction,
        multi_fraction=args.multi_fraction,
        overwrite=args.overwrite,
    )
    print(summary_line(summary))
