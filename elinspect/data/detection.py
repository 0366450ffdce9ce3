"""The base of every detection datamodule (``data=pvel``, ``voc``, ``coco``, ``aluminum``,
``fabric``): splits read by a subclass become datasets and batches.

A subclass only reads its on-disk format into :class:`~elinspect.data.records.DetectionRecord`
lists per split (:meth:`DetectionDataModule.read_splits`) and states its protocol; the base
class drops what the config asks to drop, counts boxes, logs a summary and serves batches of
:class:`~elinspect.data.detection_dataset.DetectionDataset` (the batch contract and the extra
inputs are described there). :func:`class_lookup` and :func:`class_list` serve the subclasses'
class tables.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Unpack

import numpy as np

from elinspect.data.base import LoaderArgs, SplitDataModule
from elinspect.data.box_transforms import detection_augmentation
from elinspect.data.detection_dataset import DetectionDataset, detection_collate, template_error
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.info import DatasetInfo
from elinspect.data.readers.voc import DIFFICULT_DROPPED
from elinspect.data.records import DetectionRecord
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EMPTY_TRAIN_DROPPED = "defect-free training image dropped (drop_empty_train)"
NO_TEMPLATE = "image without an aligned template"
EXTRA_INPUTS = frozenset({"template", "normal"})


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


# -------------------------------------------------------------------------- datamodule


class DetectionDataModule(SplitDataModule):
    """Base of the detection datamodules (``data=pvel``, ``voc``, ``coco``, ``aluminum``, ``fabric``).

    A subclass calls ``super().__init__(**loader)`` (its :class:`~elinspect.data.base.LoaderArgs`)
    then ``self.save_hyperparameters(logger=False)`` and must have these hyper-parameters:
    ``image_size`` (int or None), ``resize`` (``longer`` | ``square``), ``augment`` (kwargs of
    :func:`~elinspect.data.box_transforms.detection_augmentation`, or None), ``keep_difficult``, ``drop_empty_train``,
    ``split_seed``, ``batch_size`` (and optionally ``template_shift``). It
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

    def __init__(self, **loader: Unpack[LoaderArgs]) -> None:
        super().__init__(**loader)
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
        tally = ErrorTally(self.on_error)
        records, class_names = self.read_splits(tally)
        if not hp.keep_difficult:
            # training only: validation and test keep them flagged, and the mAP ignores them
            # (the VOC protocol) rather than count a detection of one as a false positive
            records["train"] = [_without_difficult(r, tally) for r in records["train"]]
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
