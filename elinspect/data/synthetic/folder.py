"""Synthetic anomaly data in the ``data=folder`` layout, with MVTec-style mask names.

Normal images are a smooth random grey texture with fine sensor noise; a defect image is
a normal one with an elliptic spot, brighter (``bright_spot``) or darker (``dark_spot``)
than its surroundings, and its mask is exactly that ellipse::

    OUT/good/000.png                              normal images
    OUT/defect/{bright_spot,dark_spot}/000.png    defect images, one directory per type
    OUT/masks/{bright_spot,dark_spot}/000_mask.png   binary masks, 0 / 255

Read it with ``data=folder data.root=OUT data.mask_dir=masks`` (the defaults name
``good`` and ``defect``). Output is identical for the same arguments.

    python -m elinspect.data.synthetic folder --out DIR --num-normal 60 --num-defect 20 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

DEFECT_TYPES = ("bright_spot", "dark_spot")


def render_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free ``size``×``size`` uint8 image: smooth blotches plus fine noise."""
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), sigmaX=size / 16)
    coarse /= coarse.std() + 1e-9
    image = 120 + 12 * coarse + rng.normal(0, 4, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_spot(rng: np.random.Generator, image: np.ndarray, bright: bool) -> np.ndarray:
    """Draw an elliptic spot into ``image`` (in place); returns its 0/255 mask."""
    size = image.shape[0]
    axes = (int(rng.uniform(0.08, 0.15) * size), int(rng.uniform(0.08, 0.15) * size))
    margin = max(axes) + 1
    centre = (int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin)))
    mask = np.zeros_like(image)
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
    shift = 90 if bright else -80
    spot = np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    image[mask > 0] = spot[mask > 0]
    return mask


def write_folder_dataset(
    out: Path,
    num_normal: int,
    num_defect: int,
    seed: int = 0,
    image_size: int = 128,
    overwrite: bool = False,
) -> dict:
    """Write the dataset under ``out`` and return a summary: ``root``, ``normal_dir``,
    ``defect_dir``, ``mask_dir`` (paths), ``num_normal``, ``num_defect`` and ``defect_types``
    ({type: count}). Defect ``i`` is of type ``DEFECT_TYPES[i % 2]``."""
    if num_normal < 1 or num_defect < 0:
        raise ValueError(f"need num_normal >= 1 and num_defect >= 0, got {num_normal}, {num_defect}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out)
    dirs = {name: out / name for name in ("good", "defect", "masks")}
    if any(d.exists() for d in dirs.values()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a dataset (pass overwrite=True / --overwrite)")
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)

    streams = iter(np.random.SeedSequence(seed).spawn(num_normal + num_defect))
    dirs["good"].mkdir(parents=True)
    for i in range(num_normal):
        image = render_texture(np.random.default_rng(next(streams)), image_size)
        _write(dirs["good"] / f"{i:03d}.png", image)
    counts = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(num_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        number = counts[kind]
        counts[kind] += 1
        rng = np.random.default_rng(next(streams))
        image = render_texture(rng, image_size)
        mask = draw_spot(rng, image, bright=kind == "bright_spot")
        _write(dirs["defect"] / kind / f"{number:03d}.png", image)
        _write(dirs["masks"] / kind / f"{number:03d}_mask.png", mask)
    return {
        "root": out,
        "normal_dir": dirs["good"],
        "defect_dir": dirs["defect"],
        "mask_dir": dirs["masks"],
        "num_normal": num_normal,
        "num_defect": num_defect,
        "defect_types": {k: v for k, v in counts.items() if v},
    }


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


# --------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``folder`` subcommand on the synthetic-data dispatcher."""
    p = subparsers.add_parser(
        "folder",
        help="normal / defect / mask directories for data=folder (anomaly detection)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, required=True, help="dataset root (data.root)")
    p.add_argument("--num-normal", type=int, default=60)
    p.add_argument("--num-defect", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="side in pixels (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> None:
    summary = write_folder_dataset(
        args.out, args.num_normal, args.num_defect, args.seed, args.image_size, args.overwrite
    )
    types = ", ".join(f"{k} {v}" for k, v in summary["defect_types"].items()) or "none"
    print(
        f"folder: {summary['num_normal']} normal, {summary['num_defect']} defect images ({types}) "
        f"-> {summary['root']}; use data=folder data.root={summary['root']} data.mask_dir=masks"
    )
