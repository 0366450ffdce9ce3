"""Fabric-size images (4096×1696) train with bounded memory: each image is resized before it
becomes a tensor, and no full-resolution copy outlives the item (experiments/large_images.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from elinspect.data.detection_dataset import DetectionDataset
from elinspect.data.records import DetectionRecord
from tests.conftest import REPO

FABRIC = (4096, 1696)  # width, height of the Tianchi 2019 fabric images
FULL_RGB = FABRIC[0] * FABRIC[1] * 3  # bytes of one decoded full-resolution image


def fabric_like_jpeg(path: Path, size: tuple[int, int] = FABRIC) -> Path:
    width, height = size
    x = np.linspace(0, 8 * np.pi, width, dtype=np.float32)
    y = np.linspace(0, 3 * np.pi, height, dtype=np.float32)[:, None]
    pattern = (127 + 60 * np.sin(x) * np.cos(y)).astype(np.uint8)
    image = np.stack([pattern, pattern[:, ::-1], np.roll(pattern, 100, axis=1)], axis=2)
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def test_a_fabric_size_image_is_resized_before_it_becomes_a_tensor(tmp_path: Path) -> None:
    path = fabric_like_jpeg(tmp_path / "fabric.jpg")
    record = DetectionRecord(
        path, np.array([[2048, 848, 3072, 1272]], np.float32), np.array([1]), np.array([False]), *FABRIC
    )
    dataset = DetectionDataset([record], image_size=256, resize="longer")
    tracemalloc.start()
    image, target = dataset[0]
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tuple(image.shape) == (3, 106, 256)
    np.testing.assert_allclose(target["boxes"].numpy(), [[128, 53, 192, 79.5]], atol=0.5)
    # the decode needs a couple of full-resolution buffers while the item is made (BGR, RGB) ...
    assert peak < 3 * FULL_RGB, f"peak {peak / 2**20:.0f} MiB"
    # ... and keeps none: what is left is the small tensor
    assert retained < FULL_RGB / 20, f"retained {retained / 2**20:.1f} MiB"


PEAK_RSS = (
    "import resource, runpy, sys\n"
    "sys.argv = ['elinspect.train', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('elinspect.train', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    if e.code not in (0, None): raise\n"
    "print(f'PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}')\n"
)
TRAIN = [
    "model=faster_rcnn",
    "data=fabric",
    "data.test_size=2",
    "data.val_fraction=0.2",
    "data.image_size=256",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.augment=null",
    "model.detector.backbone.name=resnet18",
    "model.detector.min_size=256",
    "model.detector.max_size=256",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "logger=csv",
    "callbacks=none",
    "extras.print_config=false",
]


def peak_rss_mb(root: Path, run_dir: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    command = [sys.executable, "-c", PEAK_RSS, *TRAIN, f"data.root={root}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "csv" / "version_0" / "metrics.csv").read_text().count("train/loss") >= 1
    return float(re.search(r"PEAK_RSS_MB (\d+)", done.stdout).group(1))


@pytest.mark.slow
def test_training_on_fabric_size_images_keeps_the_peak_memory_of_small_ones(tmp_path: Path) -> None:
    """Faster R-CNN (ResNet-18) a few steps at image_size 256 on 4096×1696 vs 512×212 images."""
    pytest.importorskip("elinspect.data.synthetic.fabric")
    peaks = {}
    for name, (width, height) in {"small": (512, 212), "fabric": FABRIC}.items():
        root = tmp_path / name
        subprocess.run(
            [
                sys.executable,
                "-m",
                "elinspect.data.synthetic",
                "fabric",
                "--out",
                str(root),
                "--num-images",
                "6",
            ]
            + ["--seed", "0", "--width", str(width), "--height", str(height)],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        peaks[name] = peak_rss_mb(root, tmp_path / f"run_{name}")
    # a handful of decoded 20 MiB images at a time at most (measured: +60 MB on ~1.5 GB)
    assert peaks["fabric"] - peaks["small"] < 250, peaks
