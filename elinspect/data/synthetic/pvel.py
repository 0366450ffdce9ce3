"""Synthetic PVEL-AD: electroluminescence images of solar cells in Pascal VOC 2007 layout.

Imitates the PVEL-AD dataset (Su et al., 1024×1024 near-infrared EL images of mono- and
polycrystalline cells): a bright cell body with grain texture (Voronoi grains for poly,
soft mottling and faint swirl rings for mono), 2–5 dark vertical busbars, thin horizontal
finger lines, vignetting and a per-image gain, saved as 3-channel grey JPEG. Defects use
PVEL-AD's class names with a long-tailed frequency (finger ≫ crack > black_core >
thick_line > star_crack ≫ corner, short_circuit) and realistic relative box sizes. Every
defect is drawn into its own mask, the image is darkened through the mask and the box is
the mask's bounding rectangle, so boxes enclose what was drawn and lie inside the image.

The on-disk quirks of the real release are reproduced where a parser can still read the
files: ``<depth>1</depth>`` on some XMLs although every JPEG has 3 channels, a Windows
path in ``<path>``, ``difficult`` flags, and no XML at all for defect-free images (which
are still listed in ``ImageSets/Main``). Output is byte-identical for the same arguments.

    python -m elinspect.data.synthetic pvel --out DIR --num-images 200 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

JPEG_QUALITY = 92
DIFFICULT_P = 0.05  # share of objects flagged difficult=1
DEPTH1_P = 0.15  # share of XMLs declaring depth 1 (the JPEG is 3-channel regardless)
WINDOWS_DIR = r"C:\data\PVEL\VOCdevkit\VOC2007\JPEGImages"

Box = tuple[int, int, int, int]  # x0, y0, x1, y1: 0-based, inclusive pixel indices


@dataclass(frozen=True)
class Cell:
    """Geometry of one rendered cell, which defects use to place themselves."""

    size: int
    busbars: tuple[int, ...]  # x centres
    fingers: np.ndarray  # y of each finger line
    thickness: int  # crack line thickness in pixels


# --------------------------------------------------------------------------- the cell


def _cell(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Cell]:
    """A defect-free EL cell as float32 grey levels in [0, 255], and its geometry."""
    s = size
    yy, xx = np.ogrid[:s, :s]
    body = rng.uniform(150, 205)
    if rng.random() < 0.5:  # polycrystalline: Voronoi grains of slightly different brightness
        seeds = np.full((s, s), 255, np.uint8)
        n = int(rng.integers(150, 400))
        seeds[rng.integers(0, s, n), rng.integers(0, s, n)] = 0
        _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
        texture = rng.normal(1.0, 0.06, labels.max() + 1).astype(np.float32)[labels]
    else:  # monocrystalline: soft mottling and faint concentric swirl rings
        coarse = rng.normal(1.0, 0.04, (6, 6)).astype(np.float32)
        texture = cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC)
        r = np.hypot(xx - s / 2, yy - s / 2) / s
        texture *= 1 + 0.02 * np.cos(2 * np.pi * r * rng.uniform(6, 14)).astype(np.float32)
    img = body * texture

    pitch = max(4.0, s / rng.uniform(55, 75))  # finger lines
    fingers = np.arange(rng.uniform(0, pitch), s, pitch).astype(int)
    img[fingers, :] *= rng.uniform(0.84, 0.92)

    n_bus = int(rng.integers(2, 6))  # busbars: evenly spaced dark vertical bands
    half = max(1, round(s * rng.uniform(0.006, 0.01)))
    busbars = tuple(round(s * (k + 0.5) / n_bus) for k in range(n_bus))
    bus = np.ones(s, np.float32)
    for x in busbars:
        bus[max(0, x - half) : x + half + 1] = rng.uniform(0.3, 0.5)
    img *= cv2.GaussianBlur(bus[None, :], (5, 1), 0)

    r2 = ((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (s * s / 2)  # 0 in the centre, 1 in corners
    img *= (1 - rng.uniform(0.15, 0.35) * r2**1.5) * rng.uniform(0.8, 1.15)  # vignetting, gain
    return img.astype(np.float32), Cell(s, busbars, fingers, max(2, round(s / 350)))


def _darken(img: np.ndarray, mask: np.ndarray, depth: float, blur: float = 0.0) -> Box | None:
    """Darken ``img`` by ``depth`` where the uint8 ``mask`` is drawn; return the mask's box."""
    m = mask.astype(np.float32) / 255.0
    if blur > 0:
        m = cv2.GaussianBlur(m, (0, 0), blur)
    peak = float(m.max())
    if peak <= 0:
        return None
    img *= 1.0 - depth * m
    x, y, w, h = cv2.boundingRect((m > 0.3 * peak).astype(np.uint8))
    s = img.shape[0]
    x0, y0 = min(x, s - 2), min(y, s - 2)  # at least 2 px wide, so xmin < xmax in VOC
    return x0, y0, max(x + w - 1, x0 + 1), max(y + h - 1, y0 + 1)


def _crack_mask(mask: np.ndarray, lines: list[np.ndarray], thickness: int) -> None:
    """Draw crack polylines: a dark core plus a faint wider halo (the less active area
    around a real crack), which stays below ``_darken``'s box threshold."""
    halo = np.zeros_like(mask)
    cv2.polylines(halo, lines, False, 70, 4 * thickness, cv2.LINE_AA)
    cv2.polylines(mask, lines, False, 255, thickness, cv2.LINE_AA)
    np.maximum(mask, cv2.GaussianBlur(halo, (0, 0), thickness), out=mask)


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float) -> np.ndarray:
    """A random-walk polyline: ``steps`` segments of length ``step``, direction jittered."""
    pts = [start]
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.round(np.array(pts)).astype(np.int32)


# --------------------------------------------------------------------------- defects


def crack(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """A thin dark random-walk polyline, ~10–40 % of the side."""
    s = cell.size
    mask = np.zeros((s, s), np.uint8)
    start = rng.uniform(0.1 * s, 0.9 * s, 2)
    line = _walk(rng, start, rng.uniform(0, 2 * np.pi), int(rng.integers(4, 12)), s * rng.uniform(0.03, 0.05))
    _crack_mask(mask, [line], cell.thickness)
    return [_darken(img, mask, rng.uniform(0.5, 0.8), blur=0.6)]


def finger(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """Finger interruptions: 1–5 short dark gaps on finger lines, each ~2–5 % of the side."""
    s = cell.size
    cx, cy = rng.uniform(0.08 * s, 0.92 * s, 2)
    boxes: list[Box | None] = []
    for _ in range(min(5, 1 + int(rng.poisson(1.0)))):
        x = float(np.clip(cx + rng.normal(0, 0.06 * s), 0.05 * s, 0.95 * s))
        y_want = np.clip(cy + rng.normal(0, 0.08 * s), 0.05 * s, 0.95 * s)
        y = float(cell.fingers[np.abs(cell.fingers - y_want).argmin()])
        w, h = round(s * rng.uniform(0.02, 0.05)), round(s * rng.uniform(0.01, 0.025))
        x0, y0 = max(0, round(x - w / 2)), max(0, round(y - h / 2))
        ramp = np.linspace(255, 120, w + 1)[:: rng.choice([-1, 1])]  # darkest at the break
        mask = np.zeros((s, s), np.uint8)
        mask[y0 : y0 + h + 1, x0 : x0 + w + 1] = ramp.astype(np.uint8)
        boxes.append(_darken(img, mask, rng.uniform(0.3, 0.55), blur=max(0.5, s / 800)))
    return boxes


def black_core(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """A large soft dark blob in the centre region, ~30–50 % of the side."""
    s = cell.size
    mask = np.zeros((s, s), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre = np.round(s / 2 + rng.normal(0, 0.05 * s, 2)).astype(int)
        axes = np.round(s * rng.uniform(0.12, 0.22, 2)).astype(int)
        cv2.ellipse(mask, tuple(centre), tuple(axes), rng.uniform(0, 180), 0, 360, 255, -1)
    return [_darken(img, mask, rng.uniform(0.4, 0.65), blur=s * 0.03)]


def thick_line(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """A thick dark, nearly straight line along or across the fingers, 50–100 % long."""
    s = cell.size
    length = s * rng.uniform(0.5, 1.0)
    angle = np.deg2rad(rng.normal(0, 2)) + (np.pi / 2 if rng.random() < 0.3 else 0.0)
    d = np.array([np.cos(angle), np.sin(angle)])
    centre = np.array([rng.uniform(length / 2, s - length / 2), rng.uniform(0.1 * s, 0.9 * s)])
    if angle > np.pi / 4:
        centre = centre[::-1]
    p0, p1 = np.round(centre - d * length / 2).astype(int), np.round(centre + d * length / 2).astype(int)
    mask = np.zeros((s, s), np.uint8)
    cv2.line(mask, tuple(p0), tuple(p1), 255, max(2, round(s * rng.uniform(0.008, 0.02))), cv2.LINE_AA)
    return [_darken(img, mask, rng.uniform(0.45, 0.75), blur=0.8)]


def star_crack(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """3–6 short cracks radiating from one point, with a dark spot at the impact."""
    s = cell.size
    mask = np.zeros((s, s), np.uint8)
    centre = rng.uniform(0.2 * s, 0.8 * s, 2)
    n = int(rng.integers(3, 7))
    rays = [
        _walk(
            rng,
            centre,
            2 * np.pi * k / n + rng.normal(0, 0.3),
            int(rng.integers(2, 5)),
            s * rng.uniform(0.02, 0.04),
        )
        for k in range(n)
    ]
    _crack_mask(mask, rays, cell.thickness)
    cv2.circle(mask, tuple(np.round(centre).astype(int)), 2 * cell.thickness, 255, -1)
    return [_darken(img, mask, rng.uniform(0.5, 0.8), blur=0.6)]


def corner(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """A dark triangle cut off one corner, legs ~8–20 % of the side."""
    s = cell.size
    a, b = np.round(s * rng.uniform(0.08, 0.2, 2)).astype(int)
    tri = np.array([[0, 0], [a, 0], [0, b]])
    if rng.random() < 0.5:
        tri[:, 0] = s - 1 - tri[:, 0]
    if rng.random() < 0.5:
        tri[:, 1] = s - 1 - tri[:, 1]
    mask = np.zeros((s, s), np.uint8)
    cv2.fillPoly(mask, [tri.astype(np.int32)], 255)
    return [_darken(img, mask, rng.uniform(0.55, 0.85), blur=1.0)]


def short_circuit(rng: np.random.Generator, img: np.ndarray, cell: Cell) -> list[Box | None]:
    """A whole dark rectangle between two busbars (or busbar and edge), 40–100 % tall."""
    s = cell.size
    edges = (0, *cell.busbars, s - 1)
    k = int(rng.integers(0, len(edges) - 1))
    h = round(s * rng.uniform(0.4, 1.0))
    y0 = int(rng.integers(0, s - h + 1))
    mask = np.zeros((s, s), np.uint8)
    cv2.rectangle(mask, (edges[k], y0), (edges[k + 1], min(s - 1, y0 + h)), 255, -1)
    return [_darken(img, mask, rng.uniform(0.6, 0.85), blur=1.5)]


DefectFn = Callable[[np.random.Generator, np.ndarray, Cell], list[Box | None]]

# Per-event weights; finger events carry ~2 boxes each, so by boxes finger leads clearly.
DEFECTS: dict[str, tuple[DefectFn, float]] = {
    "finger": (finger, 0.28),
    "crack": (crack, 0.28),
    "black_core": (black_core, 0.22),
    "thick_line": (thick_line, 0.10),
    "star_crack": (star_crack, 0.06),
    "corner": (corner, 0.035),
    "short_circuit": (short_circuit, 0.035),
}
_ONCE = {"black_core", "short_circuit"}  # at most one per image


@dataclass(frozen=True)
class PvelObject:
    name: str
    box: Box
    difficult: bool


def render_pvel_image(
    rng: np.random.Generator, size: int, defective: bool = True
) -> tuple[np.ndarray, list[PvelObject]]:
    """One ``size``×``size`` uint8 grey EL image and its objects (empty when not defective)."""
    img, cell = _cell(rng, size)
    objects: list[PvelObject] = []
    if defective:
        names = list(DEFECTS)
        p = np.array([w for _, w in DEFECTS.values()])
        used: set[str] = set()
        for _ in range(min(4, 1 + int(rng.poisson(0.5)))):
            name = names[rng.choice(len(names), p=p / p.sum())]
            if name in used and name in _ONCE:
                continue
            used.add(name)
            for box in DEFECTS[name][0](rng, img, cell):
                if box is not None:
                    objects.append(PvelObject(name, box, bool(rng.random() < DIFFICULT_P)))
    img += rng.normal(0, rng.uniform(2, 5), img.shape).astype(np.float32)  # sensor noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------------------- writing


def _voc_xml(image_id: str, size: int, depth: int, objects: list[PvelObject]) -> str:
    """A labelImg-style VOC annotation; coordinates 1-based (pixel i is coordinate i+1)."""
    lines = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        f"\t<path>{WINDOWS_DIR}\\{image_id}.jpg</path>",
        "\t<source>\n\t\t<database>Unknown</database>\n\t</source>",
        f"\t<size>\n\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n\t\t<depth>{depth}</depth>\n\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for o in objects:
        x0, y0, x1, y1 = (v + 1 for v in o.box)
        lines += [
            "\t<object>",
            f"\t\t<name>{o.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{int(o.difficult)}</difficult>",
            f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>"
            f"\n\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>",
            "\t</object>",
        ]
    return "\n".join([*lines, "</annotation>", ""])


def write_pvel_dataset(
    out: Path,
    num_images: int,
    seed: int,
    image_size: int = 1024,
    test_fraction: float = 0.2,
    normal_fraction: float = 0.1,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic PVEL-AD under ``out/VOCdevkit/VOC2007`` and return a summary.

    ``round(num_images * normal_fraction)`` images are defect-free (no XML);
    ``round(num_images * test_fraction)`` ids, chosen by a seeded shuffle, go to
    ``test.txt``, the rest to ``trainval.txt``. An existing non-empty VOC2007 directory is
    an error unless ``overwrite``, which first deletes its Annotations, JPEGImages and
    ImageSets. Summary keys: ``root``, ``annotations``, ``images``, ``image_sets`` (paths),
    ``num_images``, ``num_defect_free``, ``splits`` ({"trainval": n, "test": n}),
    ``boxes`` ({class name: count}, most common first) and ``num_boxes``.

    Image ``i`` draws from its own stream spawned from ``seed``, and its defect-free cell
    comes first, so the same ``(seed, i, image_size)`` with ``normal_fraction=1`` gives
    each image's clean cell (with fresh sensor noise): a defect-free template.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    for name, frac in (("test_fraction", test_fraction), ("normal_fraction", normal_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {frac}")

    root = Path(out) / "VOCdevkit" / "VOC2007"
    ann_dir, img_dir, sets_dir = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty (pass overwrite=True / --overwrite)")
        for d in (ann_dir, img_dir, root / "ImageSets"):
            shutil.rmtree(d, ignore_errors=True)
    for d in (ann_dir, img_dir, sets_dir):
        d.mkdir(parents=True, exist_ok=True)

    width = max(6, len(str(num_images)))
    ids = [f"img{i:0{width}d}" for i in range(1, num_images + 1)]
    master = np.random.default_rng(seed)
    normal = set(master.choice(num_images, round(num_images * normal_fraction), replace=False).tolist())
    order = master.permutation(num_images)
    n_test = round(num_images * test_fraction)
    test = sorted(ids[i] for i in order[:n_test])
    trainval = sorted(ids[i] for i in order[n_test:])

    counts: Counter[str] = Counter()
    children = np.random.SeedSequence(seed).spawn(num_images)
    for i, (image_id, child) in enumerate(zip(ids, children, strict=True)):
        rng = np.random.default_rng(child)
        gray, objects = render_pvel_image(rng, image_size, defective=i not in normal)
        bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        if not cv2.imwrite(str(img_dir / f"{image_id}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {img_dir / f'{image_id}.jpg'}")
        if objects:
            depth = 1 if rng.random() < DEPTH1_P else 3
            (ann_dir / f"{image_id}.xml").write_text(
                _voc_xml(image_id, image_size, depth, objects), encoding="utf-8", newline="\n"
            )
            counts.update(o.name for o in objects)

    for split, split_ids in (("trainval", trainval), ("test", test)):
        (sets_dir / f"{split}.txt").write_text("".join(f"{x}\n" for x in split_ids), encoding="utf-8")
    return {
        "root": root,
        "annotations": ann_dir,
        "images": img_dir,
        "image_sets": sets_dir,
        "num_images": num_images,
        "num_defect_free": len(normal),
        "splits": {"trainval": len(trainval), "test": len(test)},
        "boxes": dict(counts.most_common()),
        "num_boxes": sum(counts.values()),
    }


# --------------------------------------------------------------------------- CLI


def summary_line(summary: dict) -> str:
    """One line: images, split sizes, boxes per class, where written."""
    per_class = ", ".join(f"{k} {v}" for k, v in summary["boxes"].items()) or "none"
    s = summary["splits"]
    return (
        f"pvel: {summary['num_images']} images ({summary['num_defect_free']} defect-free; "
        f"trainval {s['trainval']}, test {s['test']}), {summary['num_boxes']} boxes "
        f"({per_class}) -> {summary['root']}"
    )


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``pvel`` subcommand on the synthetic-data dispatcher."""
    p = subparsers.add_parser(
        "pvel",
        help="PVEL-AD-like EL solar-cell images in Pascal VOC 2007 layout",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, required=True, help="dataset root; writes OUT/VOCdevkit/VOC2007")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--image-size", type=int, default=1024, help="side in pixels (default 1024)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of ids in test.txt")
    p.add_argument("--normal-fraction", type=float, default=0.1, help="share of defect-free images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    summary = write_pvel_dataset(
        args.out,
        args.num_images,
        args.seed,
        image_size=args.image_size,
        test_fraction=args.test_fraction,
        normal_fraction=args.normal_fraction,
        overwrite=args.overwrite,
    )
    print(summary_line(summary))
