"""A detection dataset in the Pascal VOC 2007 layout (``data=voc``; PVEL-AD builds on it).

Layout (DESIGN.md §3)::

    <root>/VOCdevkit/VOC2007/Annotations/<id>.xml       (none for a defect-free image)
    <root>/VOCdevkit/VOC2007/JPEGImages/<id>.jpg
    <root>/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt

``root`` may also be the ``VOC2007`` directory itself. Splits: ``official`` reads
``trainval.txt`` and ``test.txt`` and holds out a seeded ``val_fraction`` of trainval as
val; ``ratio`` draws a seeded train/val/test partition of every image in ``JPEGImages/``
by ``ratios``; ``auto`` is ``official`` when both split files exist, else ``ratio``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Unpack

from elinspect.data.base import LoaderArgs
from elinspect.data.box_transforms import Resize
from elinspect.data.detection import SPLITS, DetectionDataModule, class_list
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers.voc import (
    _read_voc_item,
    discover_voc_classes,
    list_all_ids,
    read_voc_ids,
    resolve_voc_root,
)
from elinspect.data.records import DetectionRecord
from elinspect.data.splits import holdout_split, ratio_split
from elinspect.utils.errors import ConfigError

SplitMode = Literal["auto", "official", "ratio"]
OVERLAP = "image in both trainval and test"


class VocLayoutDataModule(DetectionDataModule):
    """Reading and splitting a tree in the VOC 2007 layout; subclasses choose the classes
    (:meth:`select_classes`) and have the hyper-parameters ``root``, ``split``, ``ratios``,
    ``val_fraction`` besides the base class's."""

    def select_classes(self, voc: Path, tally: ErrorTally) -> tuple[list[str], list[str] | None]:
        """``(class names in label order, known vocabulary or None)``: boxes of a known class
        outside the names are dropped and counted, other names are unknown-class errors."""
        raise NotImplementedError

    def missing_root_hint(self) -> str:
        """Appended to the missing-root error (e.g. how to generate a synthetic dataset)."""
        return ""

    def classes_line(self) -> str:
        names = self.class_names or self.hparams.classes
        return f"classes: {class_list(names)}" if names else "classes discovered from the XMLs"

    # --------------------------------------------------------------------------- reading
    def voc_root(self) -> Path:
        """The ``VOC2007`` directory, or a :class:`DatasetError` showing the expected layout."""
        root = Path(self.hparams.root).expanduser()
        try:
            return resolve_voc_root(root)
        except DatasetError:
            state = "does not exist" if not root.exists() else "is not a Pascal VOC tree (no JPEGImages/)"
            layout = (
                f"{state}. Expected layout: {root}/VOCdevkit/VOC2007/{{Annotations,JPEGImages,ImageSets/Main}} "
                f"(Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/{{trainval,test}}.txt)."
            )
            raise DatasetError(root, layout + self.missing_root_hint()) from None

    def split_mode(self) -> str:
        """``official`` or ``ratio`` (``auto`` resolved by looking for the split files)."""
        if self.hparams.split not in ("auto", "official", "ratio"):
            raise ConfigError(f"data.split must be auto, official or ratio, got {self.hparams.split!r}")
        if self.hparams.split != "auto":
            return self.hparams.split
        try:
            sets = resolve_voc_root(self.hparams.root) / "ImageSets" / "Main"
        except DatasetError:
            return "auto"
        official = (sets / "trainval.txt").is_file() and (sets / "test.txt").is_file()
        return "official" if official else "ratio"

    def split_ids(self, voc: Path, tally: ErrorTally) -> dict[str, list[str]]:
        """Image ids per split (drawn before any file is parsed, so skipped files never shift them)."""
        hp = self.hparams
        if self.split_mode() == "ratio":
            ids = list_all_ids(voc)
            parts = ratio_split(len(ids), hp.ratios, hp.split_seed)
            return {split: [ids[i] for i in part] for split, part in zip(SPLITS, parts, strict=True)}
        test = read_voc_ids(voc, "test")
        trainval = read_voc_ids(voc, "trainval")
        in_test = set(test)
        for image_id in (i for i in trainval if i in in_test):
            problem = f"id {image_id!r} is listed in both trainval.txt and test.txt"
            tally.report(DatasetError(voc / "ImageSets" / "Main", problem), reason=OVERLAP)
        trainval = [i for i in trainval if i not in in_test]
        train, val = holdout_split(len(trainval), hp.val_fraction, hp.split_seed)
        return {"train": [trainval[i] for i in train], "val": [trainval[i] for i in val], "test": test}

    def read_splits(self, tally: ErrorTally) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        voc = self.voc_root()
        names, known = self.select_classes(voc, tally)
        index = {name: label for label, name in enumerate(names, start=1)}
        ignore = frozenset(known or ()) - set(names)
        records: dict[str, list[DetectionRecord]] = {}
        for split, ids in self.split_ids(voc, tally).items():
            # difficult boxes are always read; the base class drops those of the training split if
            # keep_difficult is false
            items = (_read_voc_item(voc, i, index, ignore, tally, True) for i in ids)
            records[split] = [r for r in items if r is not None]
        return records, names

    @property
    def protocol(self) -> str:
        hp = self.hparams
        mode = self.split_mode()
        if mode == "official":
            split = (
                f"official ImageSets split (trainval.txt / test.txt), val = {100 * hp.val_fraction:g}% "
                f"of trainval, seed {hp.split_seed}"
            )
        elif mode == "ratio":
            total = sum(hp.ratios)
            shares = "/".join(f"{100 * r / total:g}" for r in hp.ratios)
            split = f"seeded {shares} train/val/test split of all images, seed {hp.split_seed}"
        else:
            split = "official split if ImageSets/Main/{trainval,test}.txt exist, else seeded ratio"
        return f"{self.name} {split}; {self.classes_line()}"


class VocDataModule(VocLayoutDataModule):
    """A user's own Pascal VOC dataset (see ``conf/data/voc.yaml``).

    ``classes``: ``None`` discovers the names in every XML (sorted); a list fixes the
    classes and their label order (label = position + 1), and any other name in an XML is
    an unknown-class error.
    """

    name = "VOC"

    def __init__(
        self,
        root: str,
        classes: list[str] | None = None,
        split: SplitMode = "auto",
        ratios: Sequence[float] = (0.6, 0.2, 0.2),
        val_fraction: float = 0.2,
        split_seed: int = 42,
        keep_difficult: bool = True,
        drop_empty_train: bool = False,
        image_size: int | None = 800,
        resize: Resize = "longer",
        augment: dict[str, float] | None = None,
        batch_size: int = 2,
        **loader: Unpack[LoaderArgs],
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(logger=False)

    def select_classes(self, voc: Path, tally: ErrorTally) -> tuple[list[str], list[str] | None]:
        classes = self.hparams.classes
        names = list(classes) if classes is not None else discover_voc_classes(voc, tally)
        if not names:
            raise DatasetError(voc / "Annotations", "no object names found; list the classes in data.classes")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.classes repeats a name: {names}")
        return names, None
