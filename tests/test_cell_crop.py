"""Cell cropping for raw EL images: a known bright quadrilateral on a dark background is found
and warped back to its texture."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from elinspect.data.cell_crop import crop_cell, find_cell_quadrilateral, order_corners

CANVAS = (200, 240)  # H, W
TEXTURE = (90, 120)  # h, w


def texture() -> np.ndarray:
    """A smooth, asymmetric uint8 pattern in [80, 200] (well above the border threshold)."""
    yy, xx = np.mgrid[: TEXTURE[0], : TEXTURE[1]].astype(np.float32)
    pattern = 110 + 0.5 * xx + 30 * np.sin(2 * np.pi * xx / 37) * np.cos(2 * np.pi * yy / 23)
    return pattern.round().astype(np.uint8)


def rectangle(width: int, height: int) -> np.ndarray:
    return np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float32)


def place(quad: np.ndarray, seed: int = 0) -> np.ndarray:
    """The texture warped onto ``quad`` (tl, tr, br, bl) over a dark noisy background (10..29)."""
    tex = texture()
    matrix = cv2.getPerspectiveTransform(rectangle(TEXTURE[1], TEXTURE[0]), quad.astype(np.float32))
    size = (CANVAS[1], CANVAS[0])
    warped = cv2.warpPerspective(tex, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpPerspective(np.full_like(tex, 255), matrix, size, flags=cv2.INTER_LINEAR) > 127
    background = np.random.default_rng(seed).integers(10, 30, CANVAS, dtype=np.uint8)
    return np.where(inside, warped, background)


def rotated_rectangle(angle_deg: float, centre=(120, 100), size=(150, 100)) -> np.ndarray:
    (cx, cy), (w, h), a = centre, size, np.deg2rad(angle_deg)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (corners @ rotation.T + [cx, cy]).astype(np.float32)


SKEWED = np.array([[40, 30], [190, 50], [175, 170], [30, 150]], dtype=np.float32)
QUADS = {
    "skewed": SKEWED,
    "rotated_20": rotated_rectangle(20),
    "rotated_-35": rotated_rectangle(-35),
    "perspective": np.array([[60, 20], [180, 25], [225, 185], [15, 175]], dtype=np.float32),
}


@pytest.mark.parametrize("name", QUADS)
def test_corners_are_recovered_within_two_pixels(name: str) -> None:
    truth = QUADS[name]
    found = find_cell_quadrilateral(place(truth))
    assert found.shape == (4, 2) and found.dtype == np.float32
    np.testing.assert_allclose(found, order_corners(truth), atol=2.0)


def test_corners_come_in_tl_tr_br_bl_order() -> None:
    found = find_cell_quadrilateral(place(SKEWED))
    np.testing.assert_allclose(found, SKEWED, atol=2.0)  # SKEWED is written tl, tr, br, bl
    shuffled = SKEWED[[2, 0, 3, 1]]
    np.testing.assert_array_equal(order_corners(shuffled), SKEWED)


@pytest.mark.parametrize("name", ["skewed", "perspective", "rotated_20"])
def test_crop_gives_back_the_texture(name: str) -> None:
    image = place(QUADS[name])
    quad = find_cell_quadrilateral(image)
    crop = crop_cell(image, quad, (TEXTURE[1], TEXTURE[0]))
    assert crop.shape == TEXTURE and crop.dtype == np.uint8
    inner = (slice(3, -3), slice(3, -3))
    error = np.abs(crop[inner].astype(float) - texture()[inner]).mean()
    flipped = np.abs(crop[inner].astype(float) - texture()[:, ::-1][inner]).mean()
    assert error < 4.0, error
    assert flipped > 4 * error  # the comparison can tell a wrong crop
    # corner order does not matter to crop_cell
    np.testing.assert_array_equal(crop_cell(image, quad[[3, 1, 0, 2]], (TEXTURE[1], TEXTURE[0])), crop)


def test_crop_of_a_colour_image_keeps_its_channels() -> None:
    image = cv2.cvtColor(place(SKEWED), cv2.COLOR_GRAY2RGB)
    quad = find_cell_quadrilateral(image)
    assert crop_cell(image, quad, 64).shape == (64, 64, 3)


def test_all_dark_image_gives_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no bright region found.*threshold 50"):
        find_cell_quadrilateral(np.full(CANVAS, 20, dtype=np.uint8))


def test_a_triangle_is_not_a_cell() -> None:
    image = np.full(CANVAS, 15, dtype=np.uint8)
    cv2.fillPoly(image, [np.array([[30, 170], [120, 20], [210, 170]], dtype=np.int32)], 180)
    with pytest.raises(ValueError, match="not a quadrilateral: Douglas–Peucker left 3 corners"):
        find_cell_quadrilateral(image)


def test_closing_bridges_a_dark_busbar() -> None:
    image = place(SKEWED)
    cv2.line(image, (110, 0), (110, CANVAS[0] - 1), 5, thickness=3)  # splits the cell in two
    split = find_cell_quadrilateral(image)
    assert np.abs(split - SKEWED).max() > 20  # only one half is found
    np.testing.assert_allclose(find_cell_quadrilateral(image, close=7), SKEWED, atol=2.0)


# ------------------------------------------------------------- as a datamodule option
def test_folder_datamodule_crops_raw_cells_and_their_masks(tmp_path) -> None:
    """data.cell_crop: raw images (a skewed cell on a dark border) come out as the upright
    cell, and a defect mask drawn in the cell's own coordinates lands where it belongs."""
    from elinspect.data.errors import DatasetError
    from elinspect.data.folder import FolderDataModule
    from elinspect.data.transforms import resize

    to_canvas = cv2.getPerspectiveTransform(rectangle(TEXTURE[1], TEXTURE[0]), SKEWED)
    cell_mask = np.zeros(TEXTURE, np.uint8)
    cell_mask[20:45, 70:110] = 255  # a defect in the upper right of the cell
    canvas_mask = cv2.warpPerspective(cell_mask, to_canvas, (CANVAS[1], CANVAS[0]), flags=cv2.INTER_NEAREST)
    for name in ("good", "defect", "masks"):
        (tmp_path / name).mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "good" / f"{i}.png"), place(SKEWED, i))
    cv2.imwrite(str(tmp_path / "defect" / "d.png"), place(SKEWED, 9))
    cv2.imwrite(str(tmp_path / "masks" / "d_mask.png"), canvas_mask)

    size = 48
    dm = FolderDataModule(
        root=str(tmp_path),
        mask_dir="masks",
        image_size=size,
        channels=1,
        num_workers=0,
        val_fraction=0.25,
        test_fraction=0.25,
        held_out_val_fraction=0.0,
        cell_crop={"threshold": 50, "close": 0},
    )
    dm.setup()
    test = dm.dataset("test")
    item = next(test[i] for i in range(len(test)) if int(test[i]["label"]) == 1)
    image = item["image"][0].numpy() * 255
    expected = resize(texture(), size).astype(float)
    inner = (slice(3, -3), slice(3, -3))
    assert np.abs(image[inner] - expected[inner]).mean() < 6.0  # the upright cell, not the canvas
    assert np.abs(image[inner] - expected[:, ::-1][inner]).mean() > 12.0
    mask = item["mask"][0].numpy() > 0
    want = resize(cell_mask, size) > 127
    assert (mask & want).sum() / (mask | want).sum() > 0.7  # IoU with the mask in cell coordinates

    cv2.imwrite(str(tmp_path / "good" / "dark.png"), np.full(CANVAS, 20, np.uint8))
    dark = FolderDataModule(root=str(tmp_path), image_size=size, num_workers=0, cell_crop={"threshold": 50})
    dark.setup()
    everything = [dark.dataset(s) for s in ("train", "val", "test")]
    with pytest.raises(DatasetError, match=r"dark\.png.*cell_crop found no cell: no bright region"):
        for dataset in everything:
            for i in range(len(dataset)):
                dataset[i]
