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
box-aware through albumentations) is reseeded per sample from torch's
generator, as :mod:`elinspect.data.transforms` does, so seeded runs repeat.

Extra inputs (RDDN, ``rddn.txt`` §IV.A–B), switched on by :meth:`DetectionDataModule.request_inputs`
with the model's ``extra_inputs``; without a request the batch is exactly the one above.

* ``"template"``: every target also holds ``template``, the aligned defect-free reference image
  (float32 ``3×H×W`` in [0, 1]) read, resized and augmented with exactly the image's geometry
  (albumentations ``additional_targets``: the same flips). Only datasets that ship
  templates (``provides_templates``: Fabric) accept it. ``template_shift: [lo, hi]`` moves the
  template by a random integer offset of lo..hi stored-image pixels in x and y (random signs,
  border replicated) in every split: the paper's pixel-gap study (§V.B, 5–10 px). The offset
  of an image is fixed (seeded by ``split_seed``, the split and the image's position), so the
  shifted dataset is the same in every epoch and every run, as a shifted copy would be.
* ``"normal"``: training targets also hold ``normal``, a defect-free training image (a
  training record without boxes, taken before ``drop_empty_train``) resized to the sample's
  size and drawn per sample from a seed of torch's generator (the PTG's normal sample N, §IV.B).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from elinspect.data.base import SplitDataModule
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.images import read_image, to_tensor_layout
from elinspect.data.info import DatasetInfo
from elinspect.data.readers.voc import DIFFICULT_DROPPED
from elinspect.data.records import DetectionRecord
from elinspect.data.transforms import sample_seed
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EMPTY_TRAIN_DROPPED = "defect-free training image dropped (drop_empty_train)"
NO_TEMPLATE = "image without an aligned template"
EXTRA_INPUTS = frozenset({"template", "normal"})

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


MIN_TRAIN = 2  # images a split by test_size must leave for training (train + val)


def fixed_size_split(num_items: int, test_size: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded ``{"train", "val", "test"}`` sorted indices: ``test_size`` random items for test,
    then ``round(val_fraction · rest)`` of the rest for val, the remainder for train.

    The RDDN paper's protocol on Aluminum and Fabric (``rddn.txt`` §III.A: "we randomly select
    500 images for testing, and use all the rest images for training"; val is ours). A dataset
    with fewer than ``test_size + 2`` items is refused (never silently capped: a smaller test set
    would be a different protocol); lower ``data.test_size`` for a small set.
    """
    if test_size < 1:
        raise ConfigError(f"data.test_size must be at least 1, got {test_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {val_fraction}")
    if num_items < test_size + MIN_TRAIN:
        raise ValueError(
            f"{num_items} images cannot give a {test_size}-image test split and a training split "
            f"(at least {test_size + MIN_TRAIN} needed); set data.test_size lower for a small dataset"
        )
    order = np.random.default_rng(seed).permutation(num_items)
    test, rest = order[:test_size], order[test_size:]
    num_val = int(round(val_fraction * len(rest)))
    num_val = min(num_val, len(rest) - 1)  # never an empty training split
    return {"train": np.sort(rest[num_val:]), "val": np.sort(rest[:num_val]), "test": np.sort(test)}


def class_lookup(classes: Sequence[str], name_map: Mapping[str, str] | None) -> dict[str, int | None]:
    """Annotation label → 1-based class label, for class tables given as config.

    ``classes`` are the (English) class names in label order; ``name_map`` maps the labels
    written in the files (e.g. Chinese) to names. A label is known when it is a class name or
    a key of ``name_map``; a key whose name is not in ``classes`` maps to ``None`` (a known class
    left out of a chosen subset: its boxes are dropped and counted, not errors).
    """
    names = list(classes)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"data.classes must list distinct class names, got {names}")
    index: dict[str, int | None] = {name: label for label, name in enumerate(names, start=1)}
    for label, name in (name_map or {}).items():
        index[str(label)] = index.get(name)
    return index


# ------------------------------------------------------------------------ augmentation


def detection_augmentation(
    hflip: float = 0.5,
    vflip: float = 0.5,
    scale_limit: float = 0.0,
    scale_p: float = 0.5,
    with_template: bool = False,
) -> A.Compose:
    """Box-aware flips in Pascal VOC pixel boxes.

    Boxes follow the image (a horizontal flip maps ``x1, x2`` to ``W − x2, W − x1``); the
    label fields ``labels`` and ``difficult`` travel with them. EL cells have no preferred
    orientation, so both flips are label-preserving (as the SeMaCNN paper flips cells, §2.1).
    ``with_template`` adds a second image target ``template`` that gets exactly the image's
    flips (an aligned template must stay aligned).

    There is no random scale here: torchvision's ``GeneralizedRCNNTransform`` resizes every
    image to the detector's ``min_size`` / ``fixed_size``, so a rescaled image reaches the
    backbone at the same size (only blurred by an extra resampling). Multi-scale training is
    the detector's: ``model.detector.min_size=[...]``, one size drawn per training batch.
    ``scale_limit`` > 0 is refused with that advice.
    """
    if scale_limit > 0 and scale_p > 0:
        raise ValueError(
            f"data.augment.scale_limit={scale_limit}: a random rescale before the detector does nothing "
            "(torchvision resizes every image to model.detector.min_size / fixed_size). For multi-scale "
            "training give the detector several sizes, e.g. model.detector.min_size=[480,560,640]"
        )
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(A.VerticalFlip(p=vflip))
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True)
    targets = {"template": "image"} if with_template else None
    return A.Compose(steps, bbox_params=bbox_params, additional_targets=targets)


def _resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` at ``width``×``height``, interpolated as :func:`resize_with_boxes` does."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    shrink = width * height < w * h
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``image`` moved by ``dx`` pixels right and ``dy`` down (integers), borders replicated."""
    if dx == 0 and dy == 0:
        return image
    height, width = image.shape[:2]
    matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float64)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE
    )


def random_shift(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
    """``(dx, dy)``, each of magnitude drawn uniformly in ``low..high`` with a random sign."""
    magnitude = rng.integers(low, high + 1, size=2)
    sign = rng.choice(np.array([-1, 1]), size=2)
    dx, dy = (int(v) for v in magnitude * sign)
    return dx, dy


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
    image = _resize_to(image, new_w, new_h)
    factors = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    boxes = boxes * factors
    boxes = np.minimum(boxes, np.array([new_w, new_h] * 2, dtype=np.float32))
    return image, boxes.astype(np.float32)


# ----------------------------------------------------------------------------- dataset


class DetectionDataset(Dataset):
    """The records of one split as ``(image, target)`` pairs following the batch contract.

    ``template``: add ``target["template"]`` (the record's aligned template, same geometry as
    the image; an ``augment`` pipeline must then have been built ``with_template``);
    ``template_shift``: ``(lo, hi)`` pixel offset of the template, drawn from
    ``default_rng([*shift_seed, index])`` (fixed per image); ``normals``: defect-free records of
    which one, drawn per sample from torch's generator, becomes ``target["normal"]``.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        image_size: int | None = None,
        resize: Resize = "longer",
        augment: A.Compose | None = None,
        template: bool = False,
        template_shift: Sequence[int] | None = None,
        shift_seed: Sequence[int] = (0,),
        normals: Sequence[DetectionRecord] = (),
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.template = template
        self.template_shift = check_template_shift(template_shift)
        self.shift_seed = [int(s) for s in shift_seed]
        self.normals = list(normals)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.records[index]
        image = read_image(record.image_path, grey=False)  # grey files come back as 3 channels
        template = self._template(record, index) if self.template else None
        image, boxes = resize_with_boxes(image, record.boxes, self.image_size, self.resize)
        if template is not None:
            template = _resize_to(template, image.shape[1], image.shape[0])
        labels, difficult = record.labels, record.difficult
        if self.augment is not None:
            self.augment.set_random_seed(sample_seed())
            extra = {} if template is None else {"template": template}
            out = self.augment(image=image, bboxes=boxes, labels=labels, difficult=difficult, **extra)
            image = out["image"]
            template = out.get("template")
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            difficult = np.asarray(out["difficult"], dtype=bool).reshape(-1)
        target = {
            "boxes": torch.as_tensor(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.as_tensor(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "difficult": torch.as_tensor(np.ascontiguousarray(difficult, dtype=bool)),
        }
        if template is not None:
            target["template"] = torch.from_numpy(to_tensor_layout(template, 3))
        if self.normals:
            target["normal"] = self._normal(image.shape[1], image.shape[0])
        return torch.from_numpy(to_tensor_layout(image, 3)), target

    def _template(self, record: DetectionRecord, index: int) -> np.ndarray:
        """The record's template at stored size, shifted when ``template_shift`` asks."""
        error = template_error(record)
        if error is not None:
            raise error
        template = read_image(record.template_path, grey=False)
        if self.template_shift is not None:
            rng = np.random.default_rng([*self.shift_seed, index])
            template = shift_image(template, *random_shift(rng, *self.template_shift))
        return template

    def _normal(self, width: int, height: int) -> torch.Tensor:
        """A defect-free image, drawn from a seed of torch's generator, at ``width``×``height``."""
        pick = int(np.random.default_rng(sample_seed()).integers(len(self.normals)))
        normal = read_image(self.normals[pick].image_path, grey=False)
        return torch.from_numpy(to_tensor_layout(_resize_to(normal, width, height), 3))


def check_template_shift(template_shift: Sequence[int] | None) -> tuple[int, int] | None:
    """``(lo, hi)`` with ``0 <= lo <= hi`` integers, or ``None``."""
    if template_shift is None:
        return None
    values = list(template_shift)
    if len(values) != 2 or not all(float(v).is_integer() for v in values) or not 0 <= values[0] <= values[1]:
        raise ConfigError(f"data.template_shift must be [lo, hi] pixels with 0 <= lo <= hi, got {values}")
    return int(values[0]), int(values[1])


def template_error(record: DetectionRecord) -> DatasetError | None:
    """Why ``record`` cannot give a template (``None`` when its template file exists)."""
    if record.template_path is not None and Path(record.template_path).is_file():
        return None
    where = "" if record.template_path is None else f" ({record.template_path} does not exist)"
    return DatasetError(record.image_path, f"no aligned template for {record.image_path}{where}")


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Images and targets as two lists: detection images differ in size, so they are not stacked."""
    return [image for image, _ in batch], [target for _, target in batch]


# -------------------------------------------------------------------------- datamodule


class DetectionDataModule(SplitDataModule):
    """Base of the detection datamodules (``data=pvel``, ``voc``, ``coco``, ``aluminum``, ``fabric``).

    A subclass calls ``super().__init__()`` then ``self.save_hyperparameters(logger=False)``
    and must have these hyper-parameters: ``image_size`` (int or None), ``resize``
    (``longer`` | ``square``), ``augment`` (kwargs of :func:`detection_augmentation`, or
    None), ``keep_difficult``, ``drop_empty_train``, ``split_seed``, ``batch_size``,
    ``num_workers``, ``pin_memory``, ``on_error`` (and optionally ``template_shift``). It
    implements :meth:`read_splits` and :attr:`protocol`; ``name`` is used in log lines.
    ``provides_templates`` says whether its records carry aligned templates.
    """

    collate_fn = detection_collate
    servable_inputs = EXTRA_INPUTS

    tasks: ClassVar[frozenset[str]] = frozenset({"detection"})
    name: ClassVar[str] = "detection"
    provides_templates: ClassVar[bool] = False

    @classmethod
    def eval_preprocessing(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """How a test image becomes the model's input (:class:`elinspect.inference.Preprocessing`'s
        fields): decoded RGB, resized ``square`` or ``longer`` to ``image_size``, one tensor per image."""
        return {
            "grey": False,
            "channels": 3,
            "image_size": hparams.get("image_size"),
            "resize": hparams["resize"],
            "stack": False,
        }

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[DetectionRecord]] = {}
        self.class_names: tuple[str, ...] = ()
        self.tally: ErrorTally | None = None
        self.normal_records: list[DetectionRecord] = []
        self.requested_inputs: frozenset[str] = frozenset()

    # ---------------------------------------------------------------- for subclasses
    def read_splits(self, tally: ErrorTally) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        """``({"train": records, "val": records, "test": records}, class_names)``."""
        raise NotImplementedError

    @property
    def protocol(self) -> str:
        """One line that states the split and the classes, to print beside every number."""
        raise NotImplementedError

    def template_error(self, record: DetectionRecord) -> DatasetError | None:
        """Why ``record`` has no usable template (``None`` when it has one)."""
        return template_error(record)

    # ----------------------------------------------------------------- extra inputs
    def request_inputs(self, names: Collection[str]) -> None:
        """Serve the model's ``extra_inputs`` in every batch from now on (module docstring).

        Called by the run builder before any dataloader exists. ``"template"`` needs a dataset
        that ships aligned templates (``ValueError`` otherwise) and checks every record: one
        without a template is a :class:`DatasetError` naming the image (dropped and counted
        under ``on_error: skip``). ``"normal"`` needs a defect-free training image.
        """
        names = frozenset(names)
        unknown = names - EXTRA_INPUTS
        if unknown:
            raise ValueError(
                f"unknown extra inputs {sorted(unknown)}; a detection datamodule serves {sorted(EXTRA_INPUTS)}"
            )
        self.setup()
        if "template" in names:
            if not self.provides_templates:
                raise ValueError(
                    f"data {self.name} ships no aligned templates, but the model asks for them: "
                    "model.template=ptg (pseudo templates learnt from normal samples) or "
                    "model.template=none fit this dataset, or use a dataset with aligned "
                    "templates (data=fabric)"
                )
            self._check_templates()
        if "normal" in names and not self.normal_records:
            raise ValueError(
                f"data {self.name}: the model needs defect-free training images (normal samples), "
                f"but the training split has none ({self.protocol})"
            )
        self.requested_inputs = names

    def _check_templates(self) -> None:
        tally = self.tally
        for split in SPLITS:
            kept = []
            for record in self.records[split]:
                error = self.template_error(record)
                if error is None:
                    kept.append(record)
                else:
                    tally.report(error, reason=NO_TEMPLATE)
            self.records[split] = kept
        if not self.records["train"]:
            raise ConfigError(f"{self.name}: no training image has an aligned template")

    # ------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Read the splits once (later calls return at once) and log what was read."""
        if self.records:
            return
        hp = self.hparams
        if hp.resize not in ("longer", "square"):
            raise ConfigError(f"data.resize must be 'longer' or 'square', got {hp.resize!r}")
        tally = ErrorTally(hp.on_error)
        records, class_names = self.read_splits(tally)
        if not hp.keep_difficult:
            records = {split: [_without_difficult(r, tally) for r in recs] for split, recs in records.items()}
        # defect-free: not annotated at all (an image whose boxes were all filtered out or
        # dropped still shows its defects, and PTG must never learn them as normal)
        self.normal_records = [r for r in records["train"] if not r.annotated]
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
        template = "template" in self.requested_inputs
        normal = "normal" in self.requested_inputs and split == "train"
        return DetectionDataset(
            self.records[split],
            image_size=hp.image_size,
            resize=hp.resize,
            augment=detection_augmentation(**augment, with_template=template) if augment else None,
            template=template,
            template_shift=hp.get("template_shift") if template else None,
            shift_seed=(hp.split_seed, SPLITS.index(split)),
            normals=self.normal_records if normal else (),
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
        record.annotated,
    )


__all__ = [
    "DetectionDataModule",
    "DetectionDataset",
    "class_lookup",
    "detection_augmentation",
    "detection_collate",
    "holdout_split",
    "ratio_split",
    "resize_with_boxes",
    "shift_image",
    "fixed_size_split",
]
