"""The synthetic PVEL-AD generator writes a valid, deterministic VOC 2007 dataset."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from defusedxml import ElementTree

from elinspect.data.synthetic.pvel import write_pvel_dataset

REPO = Path(__file__).resolve().parents[1]
# Written out here rather than imported, so a typo in the module cannot pass unnoticed.
PVEL_NAMES = {
    "crack",
    "finger",
    "black_core",
    "thick_line",
    "star_crack",
    "corner",
    "fragment",
    "scratch",
    "horizontal_dislocation",
    "vertical_dislocation",
    "printing_error",
    "short_circuit",
}
SIZE = 160
N = 50


def _objects(xml: Path) -> tuple[ElementTree.ElementTree, list[tuple[str, int, tuple[int, int, int, int]]]]:
    tree = ElementTree.parse(xml)
    objs = []
    for o in tree.getroot().iter("object"):
        box = tuple(int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        objs.append((o.findtext("name"), int(o.findtext("difficult")), box))
    return tree, objs


def _ids(path: Path) -> list[str]:
    return path.read_text().split()


def _grey(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_pvel_dataset(tmp_path_factory.mktemp("pvel"), num_images=N, seed=7, image_size=SIZE)


def test_layout_and_image_sets_cover_every_image(ds: dict) -> None:
    root = ds["root"]
    assert root.parts[-2:] == ("VOCdevkit", "VOC2007")
    jpgs = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    assert jpgs == [f"img{i:06d}" for i in range(1, N + 1)]
    trainval = _ids(root / "ImageSets" / "Main" / "trainval.txt")
    test = _ids(root / "ImageSets" / "Main" / "test.txt")
    assert not set(trainval) & set(test)
    assert sorted(trainval + test) == jpgs
    assert len(test) == round(N * 0.2) == ds["splits"]["test"]
    assert len(trainval) == ds["splits"]["trainval"]
    assert test != jpgs[-len(test) :]  # a shuffle, not the tail
    assert {p.stem for p in (root / "Annotations").glob("*.xml")} <= set(jpgs)


def test_xml_parses_and_boxes_lie_inside_the_image(ds: dict) -> None:
    xmls = sorted(ds["annotations"].glob("*.xml"))
    assert xmls
    counts: Counter[str] = Counter()
    depths, difficult = set(), []
    for xml in xmls:
        tree, objs = _objects(xml)
        root = tree.getroot()
        assert root.findtext("folder") == "VOC2007"
        assert root.findtext("filename") == f"{xml.stem}.jpg"
        assert root.findtext("path").startswith("C:\\") and root.findtext("path").endswith(
            f"\\{xml.stem}.jpg"
        )
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert (w, h) == (SIZE, SIZE)
        depths.add(int(root.findtext("size/depth")))
        assert objs, f"{xml.name} has no objects"
        for name, diff, (x0, y0, x1, y1) in objs:
            assert name in PVEL_NAMES
            assert 1 <= x0 < x1 <= w and 1 <= y0 < y1 <= h, (xml.name, name, (x0, y0, x1, y1))
            difficult.append(diff)
            counts[name] += 1
        assert all(o.findtext("pose") == "Unspecified" for o in root.iter("object"))
    assert depths == {1, 3}  # the real set's depth quirk: mostly 3, some 1
    assert set(difficult) == {0, 1} and sum(difficult) < 0.2 * len(difficult)
    assert dict(counts) == ds["boxes"] and sum(counts.values()) == ds["num_boxes"]


def test_jpegs_are_three_channel_grey(ds: dict) -> None:
    img = cv2.imread(str(ds["images"] / "img000001.jpg"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (SIZE, SIZE, 3)
    assert np.abs(img.astype(int) - img[..., :1]).max() <= 2
    assert img.std() > 5  # not a flat image


def test_defect_free_images_have_no_xml(ds: dict) -> None:
    stems = {p.stem for p in ds["images"].glob("*.jpg")}
    without = stems - {p.stem for p in ds["annotations"].glob("*.xml")}
    assert len(without) == round(N * 0.1) == ds["num_defect_free"]
    listed = set(_ids(ds["image_sets"] / "trainval.txt")) | set(_ids(ds["image_sets"] / "test.txt"))
    assert without <= listed


def test_class_frequencies_are_long_tailed(ds: dict) -> None:
    counts = ds["boxes"]
    assert max(counts, key=counts.get) == "finger"
    assert counts["crack"] > counts.get("star_crack", 0)
    assert {"finger", "crack", "black_core"} <= set(counts)


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    kw = {"num_images": 8, "image_size": 128}
    a = _files(write_pvel_dataset(tmp_path / "a", seed=3, **kw)["root"])
    b = _files(write_pvel_dataset(tmp_path / "b", seed=3, **kw)["root"])
    c = _files(write_pvel_dataset(tmp_path / "c", seed=4, **kw)["root"])
    assert len(a) > 10 and a == b
    assert any(c.get(k) != v for k, v in a.items() if k.endswith(".jpg"))


def test_crack_and_black_core_boxes_are_darker_than_the_cell_body(ds: dict) -> None:
    ratios: dict[str, list[float]] = {"crack": [], "black_core": []}
    for xml in sorted(ds["annotations"].glob("*.xml")):
        img = _grey(ds["images"] / f"{xml.stem}.jpg")
        _, objs = _objects(xml)
        body = np.ones(img.shape, bool)
        for _, _, (x0, y0, x1, y1) in objs:
            body[y0 - 1 : y1, x0 - 1 : x1] = False
        for name, _, (x0, y0, x1, y1) in objs:
            if name in ratios:
                ratios[name].append(img[y0 - 1 : y1, x0 - 1 : x1].mean() / img[body].mean())
    crack, core = np.array(ratios["crack"]), np.array(ratios["black_core"])
    assert len(crack) >= 5 and len(core) >= 3
    assert (core < 0.9).all()
    # A thin crack darkens a small part of its box; across boxes it is clearly darker.
    assert np.mean(crack) < 0.95 and (crack < 1).mean() >= 0.8


def test_boxes_enclose_what_was_drawn(tmp_path: Path) -> None:
    # Image i's defect-free cell depends only on (seed, i): rendering every image
    # defect-free gives each defective image's clean cell (with other sensor noise).
    kw = {"num_images": 16, "seed": 11, "image_size": SIZE}
    dirty = write_pvel_dataset(tmp_path / "dirty", normal_fraction=0.0, **kw)
    clean = write_pvel_dataset(tmp_path / "clean", normal_fraction=1.0, **kw)
    assert not list(clean["annotations"].glob("*.xml"))
    for xml in sorted(dirty["annotations"].glob("*.xml")):
        diff = _grey(clean["images"] / f"{xml.stem}.jpg") - _grey(dirty["images"] / f"{xml.stem}.jpg")
        _, objs = _objects(xml)
        inside = np.zeros(diff.shape, bool)
        for name, _, (x0, y0, x1, y1) in objs:
            assert diff[y0 - 1 : y1, x0 - 1 : x1].mean() > 3, (xml.name, name)  # the box holds a defect
            inside[max(0, y0 - 4) : y1 + 3, max(0, x0 - 4) : x1 + 3] = True
        darkened = cv2.blur(diff, (5, 5)) > 10  # well above the sensor-noise difference
        assert darkened.any()
        assert (darkened & inside).sum() >= 0.9 * darkened.sum(), xml.name  # drawn defects are boxed


def test_rejects_bad_arguments_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        write_pvel_dataset(tmp_path / "x", num_images=2, seed=0, image_size=128, test_fraction=1.5)
    write_pvel_dataset(tmp_path / "y", num_images=3, seed=0, image_size=128, normal_fraction=0.0)
    with pytest.raises(FileExistsError):
        write_pvel_dataset(tmp_path / "y", num_images=3, seed=0, image_size=128)
    s = write_pvel_dataset(
        tmp_path / "y", num_images=2, seed=0, image_size=128, normal_fraction=1.0, overwrite=True
    )
    assert not list(s["annotations"].glob("*.xml"))  # stale annotations are gone
    assert len(list(s["images"].glob("*.jpg"))) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "elinspect.data.synthetic", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_writes_a_dataset_and_prints_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = _cli("pvel", "--out", str(out), "--num-images", "6", "--seed", "2", "--image-size", "128")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "6 images" in lines[0] and str(out) in lines[0]
    assert re.search(r"\b(finger|crack|black_core|thick_line|star_crack|corner|short_circuit) \d+", lines[0])
    assert len(list((out / "VOCdevkit/VOC2007/JPEGImages").glob("*.jpg"))) == 6
    again = _cli("pvel", "--out", str(out), "--num-images", "6", "--seed", "2", "--image-size", "128")
    assert again.returncode != 0 and "not empty" in again.stdout + again.stderr


def test_cli_help_lists_the_pvel_subcommand() -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "pvel" in r.stdout
    sub = _cli("pvel", "--help")
    assert sub.returncode == 0
    for flag in ("--out", "--num-images", "--seed", "--image-size", "--test-fraction", "--normal-fraction"):
        assert flag in sub.stdout
    assert _cli().returncode != 0  # a generator is required
