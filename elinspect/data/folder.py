"""Bring your own anomaly data: directories of normal and defective images, optional masks.

``data=folder`` reads a directory tree such as a factory's own export or an MVTec-AD
category, with no annotation file::

    root/good/*.png                     normal images                (normal_dir)
    root/defect/[<type>/]*.png          defective images, any depth  (defect_dir; one or a list)
    root/masks/[<type>/]*_mask.png      binary masks of the defects  (mask_dir, optional)
    root/test_good/*.png                normal images kept for val/test only (normal_test_dir, optional)

**Images** are found recursively (``.png .jpg .jpeg .bmp .tif .tiff .webp``, any case;
hidden files and directories are ignored), read as 8-bit grey (``channels: 1``) or RGB
(``channels: 3``; grey files are repeated) whatever their bit depth, and resized to
``image_size`` × ``image_size``. An image's directory relative to ``root`` is its
*group* (the defect type in MVTec's ``test/<type>/``); splits are stratified by group.
Images inside ``normal_dir`` or ``normal_test_dir`` are never defects, and files inside
``mask_dir`` never images, so ``defect_dir: test`` with ``normal_test_dir: test/good``
and ``mask_dir: ground_truth`` reads MVTec-AD as it ships.

**Masks.** The mask of ``<defect_dir>/…/<dir>/<stem>.<ext>`` is a file named
``<stem><suffix>.<any image ext>`` anywhere under ``mask_dir``, for a suffix in
``mask_suffixes`` (default ``""`` and ``"_mask"``, MVTec's ``000_mask.png``); when several
such files exist, the one whose directories below ``mask_dir`` share the longest trailing
run with the image's directories wins (``ground_truth/crack/000_mask.png`` for
``test/crack/000.png``), and a tie is an error. A defect image without a mask, a mask
shared by two images, or a mask whose size differs from its image's is a
:class:`~elinspect.data.errors.DatasetError` under ``on_error: raise`` (the default), and
drops the image under ``on_error: skip``; mask files that no image claims are logged.
Masks are **binarised** at full resolution — a pixel is defective where its largest channel
value is > 0 for lossless files (so 0/255 masks and label masks 0/1/2… both work), and
> half of full scale for JPEG masks (compression leaves faint noise around edges); a
number ``mask_threshold`` t sets "> t × full scale" instead — then resized with
nearest-neighbour interpolation. Normal images get an all-zero mask when ``mask_dir`` is
set, so every batch has a ``mask``.

**Splits** (seeded, stratified by label and group): the ``normal_dir`` images — and the
defect images when ``train_normal_only`` is false — go ``test_fraction`` to test,
``val_fraction`` to val, the rest to train. *Held-out* images — defects when
``train_normal_only`` is true (the default: an anomaly method learns from normal images
only, and defects are too few to waste), and all ``normal_test_dir`` images — never train:
``held_out_val_fraction`` of them go to val (where PaDiM picks its threshold), the rest to test.

**Checks at setup:** every image's header is read (Pillow; no pixels decoded), so an
empty, non-image or unreadable file is reported then, naming it, and mask sizes are
compared with image sizes. A file that is corrupt past its header still fails when
loaded, with an error naming it.

**Bad input** and what happens (``data.on_error``: ``raise`` stops with a
:class:`~elinspect.data.errors.DatasetError` naming the file; ``skip`` drops the image,
logs it and counts it under the reason shown, in the summary logged at setup and kept in
``FolderDataModule.tally``). There is no annotation file, so no path can name a file
outside the root (symbolic links inside it are followed), and no class can be unknown.

==================================  ===================================  =====================================
input                               raise                                skip (tally reason)
==================================  ===================================  =====================================
image empty, not an image, or a     error naming the image, at setup     image dropped ("unreadable image")
decompression bomb (header)
image truncated / corrupt past      error naming the image when loaded   same (a batch cannot drop an item)
its header
16-bit image / alpha channel        read: scaled to 8 bits / alpha dropped
defect image without a mask, an     error naming the image               image dropped ("missing, ambiguous or
ambiguous or unreadable mask                                             unreadable mask")
mask size differs from the image    error naming the mask                image dropped ("mask size differs
                                                                         from image")
no readable normal image            error naming normal_dir              the same error
==================================  ===================================  =====================================

Batches are dicts: ``image`` (N×C×H×W float in [0, 1]), ``label`` (int64, 1 = defective),
``mask`` (N×1×H×W uint8 in {0, 1}; only with ``mask_dir``), ``index`` (position in
:attr:`FolderDataModule.samples`) and ``path`` (the image file, as a string).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Unpack

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from elinspect.data.base import LoaderArgs, SplitDataModule
from elinspect.data.cell_crop import cut_out_cell
from elinspect.data.errors import DatasetError, ErrorTally, OnError
from elinspect.data.images import read_image, to_tensor_layout
from elinspect.data.info import DatasetInfo
from elinspect.data.readers.boxes import image_size as header_size
from elinspect.data.splits import stratified_holdout
from elinspect.data.transforms import image_augmentation, resize, sample_seed, seed_pipeline
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
LOSSY_EXTENSIONS = frozenset({".jpg", ".jpeg"})
CLASS_NAMES = ("normal", "defective")
Source = Literal["normal", "normal_test", "defect"]


@dataclass(frozen=True)
class FolderSample:
    """One image of the dataset.

    ``group`` is the image's directory relative to the root (the defect type in MVTec's
    layout); ``source`` says which configured directory it came from; ``mask`` is its mask
    file (defect images, when a mask directory is given) or None.
    """

    path: Path
    label: int
    group: str
    source: Source
    mask: Path | None = None


# ------------------------------------------------------------------------------ listing
def list_images(directory: Path) -> list[Path]:
    """Image files below ``directory`` at any depth, sorted; hidden entries are skipped."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def resolve_dir(root: Path, directory: str, option: str) -> Path:
    """``root / directory`` (or ``directory`` if absolute), which must be a directory."""
    path = (root / directory).resolve()
    if not path.is_dir():
        raise DatasetError(
            path, f"{option} directory does not exist (data.{option}={directory!r}, relative to data.root)"
        )
    return path


class MaskIndex:
    """Every image file below a mask directory, looked up by the stem of the image it masks."""

    def __init__(self, mask_dir: Path, suffixes: Sequence[str]) -> None:
        self.mask_dir = mask_dir
        # longest first, so "_mask" is tried before ""
        self.suffixes = sorted(set(suffixes), key=len, reverse=True)
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for path in list_images(mask_dir):
            self.by_stem[path.stem].append(path)
        self.claimed: dict[Path, Path] = {}  # mask → the image that claimed it

    def find(self, image: Path) -> Path:
        """The mask of ``image``; raises :class:`DatasetError` when there is none or several."""
        candidates = [p for suffix in self.suffixes for p in self.by_stem.get(image.stem + suffix, [])]
        if not candidates:
            names = " or ".join(f"'{image.stem}{s}.*'" for s in self.suffixes)
            raise DatasetError(image, f"defect image has no mask: no {names} below {self.mask_dir}")
        image_dirs = image.parent.parts
        scores = [_trailing_match(image_dirs, p.parent.relative_to(self.mask_dir).parts) for p in candidates]
        best = max(scores)
        winners = [p for p, s in zip(candidates, scores, strict=True) if s == best]
        if len(winners) > 1:
            listed = ", ".join(str(p) for p in winners)
            raise DatasetError(image, f"several masks fit the defect image equally well: {listed}")
        mask = winners[0]
        if mask in self.claimed:
            raise DatasetError(
                image,
                f"its mask {mask} is already the mask of {self.claimed[mask]}; put masks in the same "
                "sub-directories as their images",
            )
        self.claimed[mask] = image
        return mask

    def unclaimed(self) -> list[Path]:
        return sorted(p for paths in self.by_stem.values() for p in paths if p not in self.claimed)


def _trailing_match(a: Sequence[str], b: Sequence[str]) -> int:
    """How many trailing elements ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (a directory given by absolute path need not be)."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _inside(path: Path, directory: Path | None) -> bool:
    return directory is not None and path.is_relative_to(directory)


def collect_samples(
    root: str | Path,
    normal_dir: str,
    defect_dir: str | Sequence[str] | None,
    mask_dir: str | None = None,
    normal_test_dir: str | None = None,
    mask_suffixes: Sequence[str] = ("", "_mask"),
    on_error: OnError = "raise",
    tally: ErrorTally | None = None,
) -> list[FolderSample]:
    """List, check and label every image below ``root`` (see the module docstring); skipped
    images are counted in ``tally`` (a new one with ``on_error`` when not given)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(root, "dataset root does not exist or is not a directory (data.root)")
    normal_path = resolve_dir(root, normal_dir, "normal_dir")
    normal_test_path = resolve_dir(root, normal_test_dir, "normal_test_dir") if normal_test_dir else None
    mask_path = resolve_dir(root, mask_dir, "mask_dir") if mask_dir else None
    defect_dirs = [defect_dir] if isinstance(defect_dir, str) else list(defect_dir or [])
    defect_paths = [resolve_dir(root, d, "defect_dir") for d in defect_dirs]

    def images_in(directory: Path, *not_in: Path | None) -> list[Path]:
        return [p for p in list_images(directory) if not any(_inside(p, other) for other in not_in)]

    listed: dict[Path, Source] = {}
    for path in images_in(normal_path, normal_test_path, mask_path):
        listed[path] = "normal"
    if normal_test_path is not None:
        for path in images_in(normal_test_path, mask_path):
            listed.setdefault(path, "normal_test")
    for directory in defect_paths:
        found = images_in(directory, normal_path, normal_test_path, mask_path)
        if not found:
            log.warning("defect_dir %s holds no image (outside the normal and mask directories)", directory)
        for path in found:
            listed.setdefault(path, "defect")
    if not any(source == "normal" for source in listed.values()):
        raise DatasetError(normal_path, "normal_dir holds no image (.png, .jpg, .bmp, .tif, .webp)")
    if mask_path is None and any((root / name).is_dir() for name in ("masks", "ground_truth")):
        log.warning("%s has a masks/ or ground_truth/ directory: set data.mask_dir to use it", root)

    tally = tally if tally is not None else ErrorTally(on_error)
    masks = MaskIndex(mask_path, mask_suffixes) if mask_path is not None else None
    samples = []
    for path, source in listed.items():
        try:
            width, height = header_size(path)
        except DatasetError as error:
            tally.report(error, "unreadable image")
            continue
        mask = None
        if source == "defect" and masks is not None:
            try:
                mask = masks.find(path)
                mask_size = header_size(mask)
            except DatasetError as error:
                tally.report(error, "missing, ambiguous or unreadable mask")
                continue
            if mask_size != (width, height):
                problem = f"mask is {mask_size[0]}×{mask_size[1]} but its image {path} is {width}×{height}"
                tally.report(DatasetError(mask, problem), "mask size differs from image")
                continue
        group = _relative(path.parent, root)
        samples.append(FolderSample(path, int(source == "defect"), group, source, mask))

    if masks is not None and (unclaimed := masks.unclaimed()):
        shown = ", ".join(_relative(p, root) for p in unclaimed[:3])
        log.warning("%d mask file(s) match no defect image, e.g. %s", len(unclaimed), shown)
    if tally.total:
        log.warning("folder dataset %s: skipped %s", root, tally.summary())
    if not any(s.label == 0 for s in samples):
        raise DatasetError(normal_path, "no readable normal image is left")
    return samples


# ------------------------------------------------------------------------------- splits
def split_samples(
    samples: Sequence[FolderSample],
    val_fraction: float,
    test_fraction: float,
    held_out_val_fraction: float,
    train_normal_only: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices of ``samples`` per split, seeded and stratified by label and group.

    Trainable images (normal_dir; defects too unless ``train_normal_only``) go
    ``test_fraction`` / ``val_fraction`` / rest to test / val / train; held-out images
    (defects under ``train_normal_only``, and normal_test_dir images) go
    ``held_out_val_fraction`` / rest to val / test.
    """
    strata = np.array([f"{s.label}:{s.group}" for s in samples])
    held_out = np.array(
        [s.source == "normal_test" or (train_normal_only and s.label == 1) for s in samples], dtype=bool
    )
    trainable, held = np.flatnonzero(~held_out), np.flatnonzero(held_out)

    is_test = stratified_holdout(strata[trainable], test_fraction, seed)
    rest = trainable[~is_test]
    is_val = stratified_holdout(strata[rest], val_fraction / (1 - test_fraction), seed + 1)
    held_is_val = stratified_holdout(strata[held], held_out_val_fraction, seed + 2)
    return {
        "train": rest[~is_val],
        "val": np.sort(np.concatenate([rest[is_val], held[held_is_val]])),
        "test": np.sort(np.concatenate([trainable[is_test], held[~held_is_val]])),
    }


# -------------------------------------------------------------------------- reading
def read_mask(path: str | Path, threshold: float | None = None) -> np.ndarray:
    """``path`` as an ``H×W`` uint8 mask in {0, 1}: 1 where the largest channel value is
    > ``threshold`` × full scale; ``threshold`` None means > 0, or > 0.5 × full scale for
    JPEG files (whose compression noise would otherwise mark the whole neighbourhood)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise DatasetError(path, "mask file does not exist or is empty")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DatasetError(path, "cannot decode mask (corrupt, truncated, or not an image)")
    if raw.ndim == 3:
        raw = raw[:, :, :3].max(axis=2)  # any colour drawn on black; alpha ignored
    if threshold is None:
        threshold = 0.5 if path.suffix.lower() in LOSSY_EXTENSIONS else 0.0
    full_scale = np.iinfo(raw.dtype).max if np.issubdtype(raw.dtype, np.integer) else 1.0
    return (raw > threshold * full_scale).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Square nearest-neighbour resize (pixel centres aligned with :func:`resize`'s)."""
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


class FolderDataset(Dataset):
    """The images of one split (see the module docstring for the items' keys)."""

    def __init__(
        self,
        samples: Sequence[FolderSample],
        indices: Iterable[int],
        image_size: int,
        channels: int,
        with_masks: bool,
        mask_threshold: float | None = None,
        augment: dict[str, float] | None = None,
        cell_crop: dict[str, int] | None = None,
        unaugmented: bool = False,
    ) -> None:
        self.samples, self.indices = samples, [int(i) for i in indices]
        self.unaugmented = unaugmented
        self.image_size, self.channels = image_size, channels
        self.with_masks, self.mask_threshold = with_masks, mask_threshold
        self.augment: A.Compose | None = image_augmentation(**augment) if augment else None
        self.cell_crop = cell_crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        sample = self.samples[index]
        image = read_image(sample.path, grey=self.channels == 1)
        item: dict[str, Any] = {
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "index": index,
            "path": str(sample.path),
        }
        size = self.image_size
        mask = None
        if sample.mask is not None and self.with_masks:
            mask = read_mask(sample.mask, self.mask_threshold)
            if mask.shape != image.shape[:2]:
                (mh, mw), (h, w) = mask.shape, image.shape[:2]
                raise DatasetError(sample.mask, f"mask is {mw}×{mh} but its image {sample.path} is {w}×{h}")
        if self.cell_crop is not None:
            try:
                image, mask = cut_out_cell(image, mask, **self.cell_crop)
            except ValueError as error:
                raise DatasetError(sample.path, f"data.cell_crop found no cell: {error}") from error
        if not self.with_masks:
            image = resize(image, size)
            plain = image
            if self.augment is not None:
                seed_pipeline(self.augment, sample_seed())
                image = self.augment(image=image)["image"]
        else:
            mask = np.zeros((size, size), np.uint8) if mask is None else resize_mask(mask, size)
            image = resize(image, size)
            plain = image
            if self.augment is not None:
                seed_pipeline(self.augment, sample_seed())
                out = self.augment(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))[None]
        item["image"] = torch.from_numpy(to_tensor_layout(image, self.channels))
        if self.unaugmented:
            item["image_unaugmented"] = torch.from_numpy(to_tensor_layout(plain, self.channels))
        return item


# ------------------------------------------------------------------------ datamodule
class FolderDataModule(SplitDataModule):
    """A user's own normal / defect (/ mask) directories (see ``conf/data/folder.yaml``).

    After :meth:`setup`, :attr:`samples` lists every image (a :class:`FolderSample`; a
    batch's ``index`` points into it) and :attr:`split_indices` the members of each split.
    """

    tasks: ClassVar[frozenset[str]] = frozenset({"anomaly", "classification"})

    @classmethod
    def eval_preprocessing(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """How a test image becomes the model's input (:class:`elinspect.inference.Preprocessing`'s
        fields): decoded grey for 1 channel, else RGB; the cell cut out first with ``cell_crop``;
        resized to ``image_size``²."""
        channels = int(hparams["channels"])
        crop = hparams.get("cell_crop")
        return {
            "grey": channels == 1,
            "channels": channels,
            "image_size": int(hparams["image_size"]),
            "cell_crop": dict(crop) if crop else None,
        }

    def __init__(
        self,
        root: str,
        normal_dir: str = "good",
        defect_dir: str | list[str] | None = "defect",
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
        mask_suffixes: tuple[str, ...] | list[str] = ("", "_mask"),
        mask_threshold: float | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        held_out_val_fraction: float = 0.5,
        split_seed: int = 42,
        train_normal_only: bool = True,
        image_size: int = 256,
        channels: int = 3,
        augment: dict[str, float] | None = None,
        batch_size: int = 16,
        cell_crop: dict[str, int] | None = None,
        **loader: Unpack[LoaderArgs],
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(logger=False)
        if cell_crop is not None and not set(cell_crop) <= {"threshold", "close"}:
            raise ConfigError(f"data.cell_crop takes threshold and close, got {sorted(cell_crop)}")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be "
                ">= 0 and sum to less than 1"
            )
        if not 0 <= held_out_val_fraction < 1:
            raise ConfigError(f"data.held_out_val_fraction must lie in [0, 1), got {held_out_val_fraction}")
        if mask_threshold is not None and not 0 <= mask_threshold < 1:
            raise ConfigError(f"data.mask_threshold must be null or lie in [0, 1), got {mask_threshold}")
        self.samples: list[FolderSample] = []
        self.split_indices: dict[str, np.ndarray] = {}
        self.tally: ErrorTally | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.split_indices:
            return
        hp = self.hparams
        tally = ErrorTally(self.on_error)
        self.samples = collect_samples(
            hp.root,
            hp.normal_dir,
            hp.defect_dir,
            hp.mask_dir,
            hp.normal_test_dir,
            hp.mask_suffixes,
            self.on_error,
            tally,
        )
        self.tally = tally
        self.split_indices = split_samples(
            self.samples,
            hp.val_fraction,
            hp.test_fraction,
            hp.held_out_val_fraction,
            hp.train_normal_only,
            hp.split_seed,
        )
        for split, indices in self.split_indices.items():
            counts = np.bincount([self.samples[i].label for i in indices], minlength=2)
            log.info("folder %s: %d normal, %d defective", split, *counts)
            if split != "train" and not counts[1]:
                log.warning("the %s split has no defective image: its AUROC and F1 are undefined", split)
        log.info("folder dataset: %s", self.protocol)

    @property
    def with_masks(self) -> bool:
        return self.hparams.mask_dir is not None

    def split_samples(self, split: str) -> list[FolderSample]:
        """The samples of ``split`` (``train``, ``val`` or ``test``), in loader order."""
        self.setup()
        return [self.samples[i] for i in self.split_indices[split]]

    @property
    def protocol(self) -> str:
        """One line that states the data and the split, to print beside every number."""
        hp = self.hparams
        self.setup()
        labels = Counter(s.label for s in self.samples)
        masks = " with masks" if self.with_masks else ""
        train = "normal only" if hp.train_normal_only else "normal and defective"
        return (
            f"{labels[0]} normal, {labels[1]} defective images{masks}; seed {hp.split_seed}, "
            f"val/test {hp.val_fraction:g}/{hp.test_fraction:g} of trainable, held-out "
            f"{hp.held_out_val_fraction:g} to val; train {train}"
        )

    @property
    def info(self) -> DatasetInfo:
        self.setup()
        counts = np.bincount([self.samples[i].label for i in self.split_indices["train"]], minlength=2)
        size = self.hparams.image_size
        return DatasetInfo(
            task="anomaly",
            class_names=CLASS_NAMES,
            in_channels=self.hparams.channels,
            class_counts=tuple(int(c) for c in counts),
            image_size=(size, size),
        )

    def dataset(self, split: str) -> FolderDataset:
        self.setup()
        hp = self.hparams
        train = split == "train"
        return FolderDataset(
            self.samples,
            self.split_indices[split],
            hp.image_size,
            hp.channels,
            with_masks=self.with_masks,
            mask_threshold=hp.mask_threshold,
            augment=dict(hp.augment) if (train and hp.augment) else None,
            cell_crop=dict(hp.cell_crop) if hp.cell_crop is not None else None,
            unaugmented=train and "unaugmented" in self.requested_inputs,
        )
