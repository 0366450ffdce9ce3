"""Synthetic Fabric: printed fabric with aligned templates, in the Tianchi 2019 round 2 layout.

Imitates the fabric data of the RDDN paper (``rddn.txt`` §III.A, Fig. 1): a periodic printed
pattern (a random motif tile repeated with a half-drop, one or two ink colours on a light
ground) over a fine weave, 4096×1696 in the release (default here 512×212, the same aspect).
Each image folder holds the defect (or normal) image and its aligned template: the same print
without defects, with its own sensor noise. The image carries a small global offset (at most
``max_offset`` pixels, default 1) and a small gain change, the "few-pixel gap" the paper
observes between images and templates (§IV.A.2). Folders of one print share the template
name ``template_<print id>.jpg``, and the print id is part of the image stem, as in the release.

Defects use the release's Chinese class names: 沾污 stains (soft dark tinted blobs), 破洞 holes
(dark hard-edged ellipses with a frayed rim), 漏印 missing print (the ink lifted off a patch),
错花 broken pattern (the print shifted in a patch), 缝头 seams (a darker stitched band across the
width), 水印 water marks (faint large rings), 花毛 knots (tangled fibres), 虫粘 insects (small dark
specks) and 网折 crease marks (a long light line). Every defect is drawn through a mask and its
box is the mask's bounding rectangle. Output is byte-identical for the same arguments.

    python -m elinspect.data.synthetic fabric --out DIR --num-images 200 --seed 0

Layout written (the annotation list where the release puts it)::

    DIR/guangdong1_round2_train_part{1,2,3}_20190924/{defect,normal}/<stem>/{<stem>.jpg,template_<id>.jpg}
    DIR/guangdong1_round2_train_part1_20190924/Annotations/anno_train.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PARTS = tuple(f"guangdong1_round2_train_part{i}_20190924" for i in (1, 2, 3))
ANNOTATION_FILE = Path(PARTS[0]) / "Annotations" / "anno_train.json"
JPEG_QUALITY = 92

FABRIC_NAME_MAP: dict[str, str] = {
    "沾污": "stained",
    "错花": "broken_pattern",
    "水印": "water_mark",
    "花毛": "knots",
    "缝头": "seam_allowance",
    "缝头印": "seam_stencil_mark",
    "虫粘": "insect",
    "破洞": "broken_hole",
    "褶子": "pleats",
    "织疵": "weaving_flaw",
    "漏印": "misprint",
    "蜡斑": "wax_spot",
    "色差": "color_shade",
    "网折": "crease_mark",
    "其他": "others",
}
"""The release's 15 defect names and their English names (``conf/data/fabric.yaml`` holds the same)."""

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Print:
    """A printed design: ground colour, ink colours and their tiled coverage."""

    ident: str
    ground: np.ndarray  # (3,) BGR in [0, 255]
    inks: tuple[np.ndarray, ...]  # (3,) BGR each
    tiles: tuple[np.ndarray, ...]  # float32 coverage tile per ink, in [0, 1]
    drop: int  # half-drop: rows shift of every other tile column
    weave: float  # depth of the weave modulation
    weave_period: float


def make_print(rng: np.random.Generator, scale: float) -> Print:
    """A random motif tile and colours; ``scale`` is the image width / 512."""
    tw = int(rng.integers(28, 64) * scale)
    th = int(rng.integers(28, 64) * scale)
    tw, th = max(tw, 8), max(th, 8)
    ground = rng.uniform(185, 245, 3)
    inks, tiles = [], []
    for _ in range(int(rng.integers(1, 3))):
        tile = np.zeros((th, tw), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.integers(0, 3)
            centre = (int(rng.integers(0, tw)), int(rng.integers(0, th)))
            if kind == 0:  # dot or ellipse
                axes = (max(1, int(tw * rng.uniform(0.08, 0.25))), max(1, int(th * rng.uniform(0.08, 0.25))))
                cv2.ellipse(tile, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
            elif kind == 1:  # petal star
                n = int(rng.integers(4, 7))
                r = min(tw, th) * rng.uniform(0.15, 0.35)
                angles = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
                radii = np.where(np.arange(2 * n) % 2 == 0, r, r * 0.4)
                pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
                cv2.fillPoly(tile, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
            else:  # stripe
                thickness = max(1, int(min(tw, th) * rng.uniform(0.04, 0.12)))
                if rng.random() < 0.5:
                    cv2.line(tile, (0, centre[1]), (tw - 1, centre[1]), 255, thickness, cv2.LINE_AA)
                else:
                    cv2.line(tile, (centre[0], 0), (centre[0], th - 1), 255, thickness, cv2.LINE_AA)
        tiles.append(tile.astype(np.float32) / 255.0)
        inks.append(rng.uniform(20, 170, 3))
    return Print(
        ident="".join(f"{v:x}" for v in rng.integers(0, 16, 16)),
        ground=ground,
        inks=tuple(inks),
        tiles=tuple(tiles),
        drop=int(rng.integers(0, th)),
        weave=float(rng.uniform(0.02, 0.05)),
        weave_period=float(rng.uniform(2.2, 4.0)),
    )


def coverage(design: Print, ink: int, height: int, width: int, ox: int = 0, oy: int = 0) -> np.ndarray:
    """Ink ``ink``'s coverage over ``height``×``width`` pixels, the design moved by ``(ox, oy)``."""
    tile = design.tiles[ink]
    th, tw = tile.shape
    pair = np.concatenate([tile, np.roll(tile, design.drop, axis=0)], axis=1)  # half-drop repeat
    rows = (np.arange(height) - oy) % th
    cols = (np.arange(width) - ox) % (2 * tw)
    return np.ascontiguousarray(pair[np.ix_(rows, cols)])


def compose(design: Print, alphas: list[np.ndarray], ox: int = 0, oy: int = 0) -> np.ndarray:
    """The printed, woven fabric as float32 BGR from per-ink coverages."""
    height, width = alphas[0].shape
    img = np.broadcast_to(design.ground, (height, width, 3)).astype(np.float32).copy()
    for ink, alpha in zip(design.inks, alphas, strict=True):
        img = img * (1 - alpha[..., None]) + ink.astype(np.float32) * alpha[..., None]
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    p = design.weave_period
    weave = 1 + design.weave * np.sin(2 * np.pi * (xx - ox) / p) * np.sin(2 * np.pi * (yy - oy) / p)
    return img * weave[..., None]


# --------------------------------------------------------------------------- defects


@dataclass
class Canvas:
    """The defect image being drawn: design coverages (before compositing) and pixels (after)."""

    design: Print
    alphas: list[np.ndarray]
    ox: int
    oy: int
    img: np.ndarray | None = None


def _box(mask: np.ndarray, threshold: float = 0.3) -> Box | None:
    m = mask > threshold * float(mask.max()) if mask.max() > 0 else None
    if m is None or not m.any():
        return None
    x, y, w, h = cv2.boundingRect(m.astype(np.uint8))
    return x, y, x + max(w, 2), y + max(h, 2)


def _blob(rng: np.random.Generator, shape: tuple[int, int], size: float, soft: float) -> np.ndarray:
    """A random soft blob mask (float32 in [0, 1]) of about ``size`` pixels across."""
    h, w = shape
    mask = np.zeros((h, w), np.float32)
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    for _ in range(int(rng.integers(1, 4))):
        c = (int(cx + rng.normal(0, size / 4)), int(cy + rng.normal(0, size / 4)))
        axes = (max(1, int(size * rng.uniform(0.2, 0.5))), max(1, int(size * rng.uniform(0.2, 0.5))))
        cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(mask, (0, 0), max(0.5, soft)) if soft > 0 else mask


# Print-level defects act on the coverages before compositing.
def misprint(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """漏印: the ink lifted off an irregular patch (the ground shows through)."""
    h, w = c.alphas[0].shape
    mask = _blob(rng, (h, w), min(h, w) * rng.uniform(0.2, 0.45), 1.0)
    for i, a in enumerate(c.alphas):
        c.alphas[i] = a * (1 - mask)
    return [_box(mask)]


def broken_pattern(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """错花: the print shifted by a fraction of a tile inside a rectangular patch."""
    h, w = c.alphas[0].shape
    bw, bh = int(w * rng.uniform(0.12, 0.3)), int(h * rng.uniform(0.25, 0.6))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    th, tw = c.design.tiles[0].shape
    dx, dy = int(tw * rng.uniform(0.3, 0.6)), int(th * rng.uniform(0.3, 0.6))
    for i in range(len(c.alphas)):
        moved = coverage(c.design, i, h, w, c.ox + dx, c.oy + dy)
        c.alphas[i][y0 : y0 + bh, x0 : x0 + bw] = moved[y0 : y0 + bh, x0 : x0 + bw]
    return [(x0, y0, x0 + bw, y0 + bh)]


# Surface defects act on the composed pixels.
def stain(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """沾污: a soft dark, brownish blob."""
    h, w = c.img.shape[:2]
    mask = _blob(rng, (h, w), min(h, w) * rng.uniform(0.08, 0.3), min(h, w) * 0.02)
    tint = np.array([0.55, 0.65, 0.75], np.float32) * rng.uniform(0.7, 1.0)
    c.img *= 1 - mask[..., None] * (1 - tint)
    return [_box(mask)]


def hole(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """破洞: a dark hard-edged hole with a light frayed rim."""
    h, w = c.img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    centre = (int(rng.uniform(0.05, 0.95) * w), int(rng.uniform(0.1, 0.9) * h))
    axes = (max(2, int(h * rng.uniform(0.02, 0.06))), max(2, int(h * rng.uniform(0.02, 0.06))))
    angle = float(rng.uniform(0, 180))
    rim = np.zeros_like(mask)
    cv2.ellipse(rim, centre, (axes[0] + 2, axes[1] + 2), angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    c.img = c.img * (1 - rim[..., None]) + 250 * rim[..., None]
    c.img = c.img * (1 - mask[..., None]) + rng.uniform(15, 40) * mask[..., None]
    return [_box(rim)]


def seam(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """缝头: a darker band across the whole width with stitches."""
    h, w = c.img.shape[:2]
    bh = max(3, int(h * rng.uniform(0.04, 0.1)))
    y0 = int(rng.integers(0, h - bh))
    mask = np.zeros((h, w), np.float32)
    mask[y0 : y0 + bh] = 1.0
    c.img *= 1 - 0.35 * mask[..., None]
    step = max(4, bh)
    for x in range(int(rng.integers(0, step)), w, step):
        cv2.line(c.img, (x, y0 + bh // 2), (min(w - 1, x + step // 2), y0 + bh // 2), (60, 60, 60), 1)
    return [(0, y0, w, y0 + bh)]


def water_mark(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """水印: a faint large ring of lighter fabric."""
    h, w = c.img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    r = int(min(h, w) * rng.uniform(0.15, 0.35))
    centre = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.3, 0.7) * h))
    cv2.circle(mask, centre, r, 1.0, max(2, r // 4), cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (0, 0), 2.0)
    c.img += mask[..., None] * rng.uniform(25, 45)
    return [_box(mask)]


def knots(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """花毛: a tangle of short dark fibres."""
    h, w = c.img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.1, 0.9) * h
    spread = h * rng.uniform(0.03, 0.08)
    for _ in range(int(rng.integers(4, 10))):
        p = np.array([cx, cy]) + rng.normal(0, spread, 2)
        q = p + rng.normal(0, spread, 2)
        cv2.line(mask, tuple(np.round(p).astype(int)), tuple(np.round(q).astype(int)), 255, 1, cv2.LINE_AA)
    m = mask.astype(np.float32) / 255.0
    c.img *= 1 - 0.7 * m[..., None]
    return [_box(m)]


def insect(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """虫粘: a small dark speck with legs."""
    h, w = c.img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    centre = np.array([rng.uniform(0.05, 0.95) * w, rng.uniform(0.1, 0.9) * h])
    size = max(2.0, h * rng.uniform(0.01, 0.025))
    cv2.ellipse(mask, tuple(np.round(centre).astype(int)), (int(size), int(size * 0.6)), 0, 0, 360, 255, -1)
    for k in range(3):
        for side in (-1, 1):
            end = centre + np.array([(k - 1) * size, side * size * 1.4])
            cv2.line(mask, tuple(np.round(centre).astype(int)), tuple(np.round(end).astype(int)), 255, 1)
    m = mask.astype(np.float32) / 255.0
    c.img *= 1 - 0.85 * m[..., None]
    return [_box(m)]


def crease(rng: np.random.Generator, c: Canvas) -> list[Box | None]:
    """网折: a long light line, nearly vertical or nearly horizontal."""
    h, w = c.img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        x = int(rng.uniform(0.05, 0.95) * w)
        p, q = (x, 0), (x + int(rng.normal(0, 0.03 * w)), h - 1)
    else:
        y = int(rng.uniform(0.1, 0.9) * h)
        x0 = int(rng.uniform(0, 0.5) * w)
        p, q = (x0, y), (x0 + int(w * rng.uniform(0.3, 0.5)), y + int(rng.normal(0, 0.03 * h)))
    cv2.line(mask, p, q, 255, max(1, h // 100), cv2.LINE_AA)
    m = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 1.0)
    c.img += m[..., None] * rng.uniform(35, 60)
    return [_box(m)]


DefectFn = Callable[[np.random.Generator, Canvas], list[Box | None]]
# (function, weight, acts on the print coverages before compositing)
DEFECTS: dict[str, tuple[DefectFn, float, bool]] = {
    "沾污": (stain, 0.24, False),
    "错花": (broken_pattern, 0.16, True),
    "水印": (water_mark, 0.14, False),
    "花毛": (knots, 0.10, False),
    "缝头": (seam, 0.08, False),
    "虫粘": (insect, 0.08, False),
    "破洞": (hole, 0.07, False),
    "漏印": (misprint, 0.07, True),
    "网折": (crease, 0.06, False),
}


@dataclass(frozen=True)
class FabricObject:
    defect_name: str
    box: Box


def render_fabric_pair(
    rng: np.random.Generator, design: Print, width: int, height: int, defective: bool, max_offset: int
) -> tuple[np.ndarray, np.ndarray, list[FabricObject]]:
    """``(image, template, objects)`` as uint8 BGR; the template is the clean print."""
    alphas = [coverage(design, i, height, width) for i in range(len(design.inks))]
    template = compose(design, alphas) + rng.normal(0, 1.5, (height, width, 3)).astype(np.float32)

    ox, oy = (int(v) for v in rng.integers(-max_offset, max_offset + 1, 2))
    canvas = Canvas(
        design, [coverage(design, i, height, width, ox, oy) for i in range(len(design.inks))], ox, oy
    )
    objects: list[FabricObject] = []
    if defective:
        names = list(DEFECTS)
        p = np.array([w for _, w, _ in DEFECTS.values()])
        chosen = [
            names[i] for i in rng.choice(len(names), size=min(3, 1 + int(rng.poisson(0.6))), p=p / p.sum())
        ]
        for name in sorted(chosen, key=lambda n: not DEFECTS[n][2]):  # print defects first
            if DEFECTS[name][2]:
                objects += [FabricObject(name, b) for b in DEFECTS[name][0](rng, canvas) if b is not None]
        canvas.img = compose(design, canvas.alphas, ox, oy)
        for name in chosen:
            if not DEFECTS[name][2]:
                objects += [FabricObject(name, b) for b in DEFECTS[name][0](rng, canvas) if b is not None]
    else:
        canvas.img = compose(design, canvas.alphas, ox, oy)
    image = canvas.img * rng.uniform(0.97, 1.03) + rng.normal(0, 2.0, (height, width, 3)).astype(np.float32)
    as_u8 = lambda a: np.clip(a + 0.5, 0, 255).astype(np.uint8)  # noqa: E731
    return as_u8(image), as_u8(template), objects


# --------------------------------------------------------------------------- writing


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")


def write_fabric_dataset(
    out: Path,
    num_images: int,
    seed: int,
    width: int = 512,
    height: int = 212,
    normal_fraction: float = 0.12,
    max_offset: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic Fabric under ``out`` and return a summary.

    ``round(num_images * normal_fraction)`` images are defect-free (``normal/``; the release
    has 416 of 3522). Folders are spread over the three parts by a seeded draw; prints are
    shared by about four images each. Existing part directories are an error unless
    ``overwrite``. Summary keys: ``root``, ``annotations`` (path), ``num_images``,
    ``num_normal``, ``boxes`` ({defect_name: count}), ``num_boxes``, ``images`` (name → folder).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if width < 64 or height < 32:
        raise ValueError(f"images must be at least 64x32, got {width}x{height}")
    if not 0.0 <= normal_fraction <= 1.0:
        raise ValueError(f"normal_fraction must lie in [0, 1], got {normal_fraction}")
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    root = Path(out)
    existing = [root / p for p in PARTS if (root / p).exists()]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{existing[0]} exists (pass overwrite=True / --overwrite)")
        for path in existing:
            shutil.rmtree(path)

    master = np.random.default_rng(seed)
    scale = width / 512
    designs = [make_print(master, scale) for _ in range(max(1, round(num_images / 4)))]
    normal = set(master.choice(num_images, round(num_images * normal_fraction), replace=False).tolist())
    part_of = master.integers(0, len(PARTS), num_images)
    design_of = master.integers(0, len(designs), num_images)

    entries, counts, images = [], Counter(), {}
    children = np.random.SeedSequence(seed).spawn(num_images)
    for i, child in enumerate(children):
        rng = np.random.default_rng(child)
        design = designs[design_of[i]]
        defective = i not in normal
        image, template, objects = render_fabric_pair(rng, design, width, height, defective, max_offset)
        stamp = 20190903000000 + 1_000_000 * (i % 3) + 17 * i
        stem = f"20190904{1 + i % 2}_{design.ident}{i % 10}{stamp}{i % 7}OK"
        folder = root / PARTS[part_of[i]] / ("defect" if defective else "normal") / stem
        folder.mkdir(parents=True)
        _imwrite(folder / f"{stem}.jpg", image)
        _imwrite(folder / f"template_{design.ident}.jpg", template)
        images[f"{stem}.jpg"] = folder
        for o in objects:
            bbox = [float(v) for v in o.box]
            entries.append({"name": f"{stem}.jpg", "defect_name": o.defect_name, "bbox": bbox})
            counts[o.defect_name] += 1

    annotations = root / ANNOTATION_FILE
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(entries, indent=4) + "\n", encoding="utf-8", newline="\n")
    return {
        "root": root,
        "annotations": annotations,
        "num_images": num_images,
        "num_normal": len(normal),
        "boxes": dict(counts.most_common()),
        "num_boxes": sum(counts.values()),
        "images": images,
    }


# --------------------------------------------------------------------------- CLI


def summary_line(summary: dict) -> str:
    per_class = ", ".join(f"{FABRIC_NAME_MAP[k]} {v}" for k, v in summary["boxes"].items()) or "none"
    return (
        f"fabric: {summary['num_images']} images ({summary['num_normal']} normal), "
        f"{summary['num_boxes']} boxes ({per_class}) -> {summary['root']}"
    )


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``fabric`` subcommand on the synthetic-data dispatcher."""
    p = subparsers.add_parser(
        "fabric",
        help="Tianchi-2019-like printed fabric with aligned templates (Fabric layout)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--out", type=Path, required=True, help="dataset root; writes OUT/guangdong1_round2_train_part*"
    )
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--width", type=int, default=512, help="image width (default 512; the release has 4096)")
    p.add_argument("--height", type=int, default=212, help="image height (default 212; the release has 1696)")
    p.add_argument("--normal-fraction", type=float, default=0.12, help="share of defect-free images")
    p.add_argument("--max-offset", type=int, default=1, help="largest image-to-template offset in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    summary = write_fabric_dataset(
        args.out,
        args.num_images,
        args.seed,
        width=args.width,
        height=args.height,
        normal_fraction=args.normal_fraction,
        max_offset=args.max_offset,
        overwrite=args.overwrite,
    )
    print(summary_line(summary))
