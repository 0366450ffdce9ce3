"""What every detection datamodule shares: splits, the torch dataset, batching, augmentation.

A subclass only reads its on-disk format into :class:`~elinspect.data.records.DetectionRecord`
lists per split (:meth:`DetectionDataModule.read_splits`) and states its protocol; the base
class drops what the config asks to drop, counts boxes, logs a summary and serves batches.

Batch contract (what the detection LightningModules consume, DESIGN.md §1): a dataloader
yields ``(images, targets)``; ``images`` is a list of float32 ``3×H×W`` tensors in [0, 1],
**not** normalised (torchvision's ``GeneralizedRCNNTransform`` normalises, and resizes
again, inside the model); ``targets`` is a list of dicts with ``boxes`` float32 ``(N, 4)``
``x1, y1, x2, y2`` pixels of the returned image, ``labels`` int64 ``(N,)`` starting at 1,
``image_id`` an int64 scalar (the record's index in its split) and ``difficult`` bool ``(N,)``.
An image without defects has ``boxes`` of shape ``(0, 4)``.

Images are resized *before* they become tensors (``image_size``: the longer side, or a fixed
square), which bounds memory for 1024-px PVEL-AD images; training augmentation (flips and
random scale, box-aware through albumentations) is reseeded per sample from torch's
generator, as :mod:`elinspect.data.transforms` does, so seeded runs repeat.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from elinspect.data.base import SplitDataModule
from elinspect.data.errors import ErrorTally
from elinspect.data.images import read_image, to_tensor_layout
from elinspect.data.info import DatasetInfo
from elinspect.data.readers.voc import DIFFICULT_DROPPED
from elinspect.data.records import DetectionRecord
from elinspect.data.transforms import sample_seed

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EMPTY_TRAIN_DROPPED = "defect-free training image dropped (drop_empty_train)"

Resize = Literal["longer", "square"]
Target = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- splits


def ratio_split(num_items: int, ratios: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(num_items)`` into parts sized by ``ratios``.

    ``ratios`` are normalised to sum 1; part boundaries are the rounded cumulative shares,
    so 24 items at 6:2:2 (the EBBA paper's protocol) give 14 / 5 / 5. Each part is sorted.
    """
    shares = np.asarray(ratios, dtype=np.float64)
    if shares.ndim != 1 or len(shares) == 0 or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"split ratios must be non-negative with a positive sum, got {list(ratios)}")
    bounds = np.rint(np.cumsum(shares / shares.sum()) * num_items).astype(int)
    order = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(part) for part in np.split(order, bounds[:-1])]


def holdout_split(num_items: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held out)`` sorted indices, with ``round(fraction · num_items)`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a held-out fraction must lie in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(num_items)
    num_held = int(round(fraction * num_items))
    return np.sort(order[num_held:]), np.sort(order[:num_held])


# ------------------------------------------------------------------------ augmentation


def detection_augmentation(
    hflip: float = 0.5, vflip: float = 0.5, scale_limit: float = 0.0, scale_p: float = 0.5
) -> A.Compose:
    """Box-aware flips and random scale (``1 ± scale_limit``) in Pascal VOC pixel boxes.

    Boxes follow the image (a horizontal flip maps ``x1, x2`` to ``W − x2, W − x1``); the
    label fields ``labels`` and ``difficult`` travel with them. EL cells have no preferred
    orientation, so both flips are label-preserving (as the SeMaCNN paper flips cells, §2.1).
    """
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(A.VerticalFlip(p=vflip))
    if scale_limit > 0 and scale_p > 0:
        steps.append(A.RandomScale(scale_limit=scale_limit, interpolation=cv2.INTER_LINEAR, p=scale_p))
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True)
    return A.Compose(steps, bbox_params=bbox_params)


def resize_with_boxes(
    image: np.ndarray, boxes: np.ndarray, size: int | None, mode: Resize = "longer"
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to a ``size``×``size`` square, or so that the longer side is ``size`` (aspect
    kept); boxes are scaled with the image. ``size=None`` leaves both as they are."""
    if size is None:
        return image, boxes
    height, width = image.shape[:2]
    if mode == "square":
        new_w, new_h = size, size
    elif mode == "longer":
        scale = size / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    else:
        raise ValueError(f"resize must be 'longer' or 'square', got {mode!r}")
    if (new_w, new_h) == (width, height):
        return image, boxes
    shrink = new_w * new_h < width * height
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    factors = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    boxes = boxes * factors
    boxes = np.minimum(boxes, np.array([new_w, new_h] * 2, dtype=np.float32))
    return image, boxes.astype(np.float32)


# ----------------------------------------------------------------------------- dataset


class DetectionDataset(Dataset):
    """The records of one split as ``(image, target)`` pairs following the batch contract."""

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        image_size: int | None = None,
        resize: Resize = "longer",
        augment: A.Compose | None = None,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.records[index]
        image = read_image(record.image_path, grey=False)  # grey files come back as 3 channels
        image, boxes = resize_with_boxes(image, record.boxes, self.image_size, self.resize)
        labels, difficult = record.labels, record.difficult
        if self.augment is not None:
            self.augment.set_random_seed(sample_seed())
            out = self.augment(image=image, bboxes=boxes, labels=labels, difficult=difficult)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            difficult = np.asarray(out["difficult"], dtype=bool).reshape(-1)
        target = {
            "boxes": torch.as_tensor(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.as_tensor(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "difficult": torch.as_tensor(np.ascontiguousarray(difficult, dtype=bool)),
        }
        return torch.from_numpy(to_tensor_layout(image, 3)), target


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Images and targets as two lists: detection images differ in size, so they are not stacked."""
    return [image for image, _ in batch], [target for _, target in batch]


# -------------------------------------------------------------------------- datamodule


class DetectionDataModule(SplitDataModule):
    """Base of the detection datamodules (``data=pvel``, ``voc``, ``coco``).

    A subclass calls ``super().__init__()`` then ``self.save_hyperparameters(logger=False)``
    and must have these hyper-parameters: ``image_size`` (int or None), ``resize``
    (``longer`` | ``square``), ``augment`` (kwargs of :func:`detection_augmentation`, or
    None), ``keep_difficult``, ``drop_empty_train``, ``split_seed``, ``batch_size``,
    ``num_workers``, ``pin_memory``, ``on_error``. It implements :meth:`read_splits` and
    :attr:`protocol`; ``name`` is used in log lines.
    """

    collate_fn = detection_collate

    tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
    name: ClassVar[str] = "detection"

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[DetectionRecord]] = {}
        self.class_names: tuple[str, ...] = ()
        self.tally: ErrorTally | None = None

    # ---------------------------------------------------------------- for subclasses
    def read_splits(self, tally: ErrorTally) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        """``({"train": records, "val": records, "test": records}, class_names)``."""
        raise NotImplementedError

    @property
    def protocol(self) -> str:
        """One line that states the split and the classes, to print beside every number."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Read the splits once (later calls return at once) and log what was read."""
        if self.records:
            return
        hp = self.hparams
        if hp.resize not in ("longer", "square"):
            raise ValueError(f"data.resize must be 'longer' or 'square', got {hp.resize!r}")
        tally = ErrorTally(hp.on_error)
        records, class_names = self.read_splits(tally)
        if not hp.keep_difficult:
            records = {split: [_without_difficult(r, tally) for r in recs] for split, recs in records.items()}
        if hp.drop_empty_train:
            kept = [r for r in records["train"] if r.num_boxes]
            tally.count(EMPTY_TRAIN_DROPPED, len(records["train"]) - len(kept))
            records["train"] = kept
        if not records["train"]:
            raise ValueError(f"{self.name}: the training split is empty ({self.protocol})")
        self.records = {split: records[split] for split in SPLITS}
        self.class_names = tuple(class_names)
        self.tally = tally
        self._log_summary()

    def box_counts(self, split: str = "train") -> tuple[int, ...]:
        """Boxes per class in ``split``, in class order."""
        self.setup()
        labels = [r.labels for r in self.records[split]]
        flat = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        counts = np.bincount(flat - 1, minlength=len(self.class_names))
        return tuple(int(c) for c in counts)

    @property
    def info(self) -> DatasetInfo:
        """Classes and the training split's boxes per class (SDFL's n_u, DESIGN.md §2).

        ``image_size`` is ``(S, S)`` for ``image_size=S``: the exact size with ``resize:
        square``, the bound on the longer side with ``longer`` (before random scaling).
        """
        self.setup()
        size = self.hparams.image_size
        return DatasetInfo(
            task="detection",
            class_names=self.class_names,
            in_channels=3,
            class_counts=self.box_counts("train"),
            image_size=None if size is None else (size, size),
        )

    def _log_summary(self) -> None:
        sizes = ", ".join(f"{len(self.records[s])} {s}" for s in SPLITS)
        log.info("%s: %s images (%s)", self.name, sizes, self.protocol)
        for split in SPLITS:
            counts = self.box_counts(split)
            empty = sum(1 for r in self.records[split] if not r.num_boxes)
            per_class = ", ".join(f"{n} {c}" for n, c in zip(self.class_names, counts, strict=True) if c)
            log.info("%s %s: %d boxes (%s); %d defect-free", self.name, split, sum(counts), per_class, empty)
        log.info("%s: skipped or fixed: %s", self.name, self.tally.summary())

    # ------------------------------------------------------------------ dataloaders
    def dataset(self, split: str) -> DetectionDataset:
        self.setup()
        hp = self.hparams
        augment = hp.augment if split == "train" else None
        return DetectionDataset(
            self.records[split],
            image_size=hp.image_size,
            resize=hp.resize,
            augment=detection_augmentation(**augment) if augment else None,
        )


def class_list(names: Sequence[str]) -> str:
    """``"crack, finger, …"`` for protocol lines (at most six names, then a count)."""
    names = list(names)
    shown = ", ".join(names[:6])
    return shown if len(names) <= 6 else f"{shown} and {len(names) - 6} more"


def _without_difficult(record: DetectionRecord, tally: ErrorTally) -> DetectionRecord:
    """``record`` with its difficult boxes dropped (counted)."""
    if not record.difficult.any():
        return record
    keep = ~record.difficult
    tally.count(DIFFICULT_DROPPED, int(record.difficult.sum()))
    return DetectionRecord(
        record.image_path,
        record.boxes[keep],
        record.labels[keep],
        record.difficult[keep],
        record.width,
        record.height,
        record.template_path,
    )


__all__ = [
    "DetectionDataModule",
    "DetectionDataset",
    "detection_augmentation",
    "detection_collate",
    "holdout_split",
    "ratio_split",
    "resize_with_boxes",
]
