"""Fabric: printed fabric with aligned templates, 15 defect classes (``data=fabric``).

Tianchi 2019 (Guangdong) round 2, read in the layout the publisher ships (DESIGN.md §3)::

    <root>/guangdong1_round2_train_part{1,2,3}_20190924/{defect,normal}/<stem>/<stem>.jpg
    <root>/guangdong1_round2_train_part{1,2,3}_20190924/{defect,normal}/<stem>/template_<id>.jpg
    <root>/guangdong1_round2_train_part1_20190924/Annotations/anno_train.json

The boxes are in one JSON list (:mod:`elinspect.data.readers.tianchi_fabric`); the release
ships it as ``part1/Annotations/anno_train.json`` and it circulates renamed
``anno_train_20190925.json``. ``anno_file: null`` looks for it at the root and in the part
directories under both names (exactly one must be found); a path (relative to ``root``) fixes it.
A part directory unpacked into itself (``part1/part1/defect``) is accepted.

Every image folder has its aligned defect-free template ``template_*.jpg`` (its name is not
the stem): exactly one is expected when the model asks for templates (``request_inputs``).
4096×1696 images are resized (``image_size``) as they are read, never kept at full size.

Protocol (``rddn.txt`` §III.A): a seeded random ``test_size`` = 500 images for test (defect
and normal alike), the rest for training, of which a seeded ``val_fraction`` is val.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from elinspect.data.base import LoaderArgs
from elinspect.data.box_transforms import Resize
from elinspect.data.detection import SPLITS, DetectionDataModule, class_list, class_lookup
from elinspect.data.detection_dataset import check_template_shift
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers.boxes import image_size, path_inside, sanitize_boxes
from elinspect.data.readers.tianchi_fabric import FabricAnnotations, read_fabric_annotations
from elinspect.data.readers.voc import MISSING_IMAGE, UNREADABLE_IMAGE
from elinspect.data.records import DetectionRecord
from elinspect.data.splits import fixed_size_split

log = logging.getLogger(__name__)

PARTS = tuple(f"guangdong1_round2_train_part{i}_20190924" for i in (1, 2, 3))
KINDS = ("defect", "normal")
ANNO_NAMES = ("anno_train_20190925.json", "anno_train.json")
TEMPLATE_GLOB = "template_*.jpg"
UNANNOTATED_DEFECT = "defect image without annotation entries dropped"
DUPLICATE_IMAGE = "image name in two folders"


@dataclass(frozen=True)
class FabricItem:
    """One image folder: ``<kind>/<stem>/<stem>.jpg`` and its template (``None`` unless exactly one)."""

    name: str
    image: Path
    kind: str
    template: Path | None


class FabricDataModule(DetectionDataModule):
    """Fabric detection splits with aligned templates (see ``conf/data/fabric.yaml``)."""

    name = "Fabric"
    provides_templates = True

    def __init__(
        self,
        root: str,
        parts: Sequence[str] = PARTS,
        anno_file: str | None = None,
        classes: Sequence[str] = (),
        name_map: Mapping[str, str] | None = None,
        test_size: int = 500,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        keep_difficult: bool = True,
        drop_empty_train: bool = False,
        template_shift: Sequence[int] | None = None,
        image_size: int | None = 1333,
        resize: Resize = "longer",
        augment: dict[str, float] | None = None,
        batch_size: int = 2,
        **loader: Unpack[LoaderArgs],
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(logger=False)
        self.labels = class_lookup(classes, name_map)
        check_template_shift(template_shift)

    # --------------------------------------------------------------------------- layout
    def missing_root_hint(self) -> str:
        root = self.hparams.root
        return (
            f" Expected layout: {root}/guangdong1_round2_train_part{{1,2,3}}_20190924/{{defect,normal}}/"
            "<stem>/{<stem>.jpg,template_<id>.jpg} and part1/Annotations/anno_train.json. "
            "Download the Tianchi 2019 fabric round 2 data into it, or write a synthetic one in this "
            f"layout with: python -m elinspect.data.synthetic fabric --out {root} --num-images 200 --seed 0"
        )

    def part_dirs(self) -> list[Path]:
        """The part directories (a part unpacked into itself resolved to the inner one)."""
        root = Path(self.hparams.root).expanduser()
        if not root.is_dir():
            raise DatasetError(root, "dataset root does not exist." + self.missing_root_hint())
        found = []
        for part in self.hparams.parts:
            folder = path_inside(root, part)
            if (folder / part).is_dir() and not any((folder / k).is_dir() for k in KINDS):
                folder = folder / part
            if not folder.is_dir():
                raise DatasetError(folder, "part directory does not exist." + self.missing_root_hint())
            found.append(folder)
        return found

    def annotation_file(self) -> Path:
        """``anno_file`` below root, or the one file found where the release puts it."""
        root = Path(self.hparams.root).expanduser()
        if self.hparams.anno_file:
            path = root / Path(self.hparams.anno_file).expanduser()
            if not path.is_file():
                raise DatasetError(path, "annotation file (data.anno_file) does not exist")
            return path
        places = [root, root / "Annotations"]
        for part in self.part_dirs():
            places += [part, part / "Annotations"]
        found = [place / name for place in places for name in ANNO_NAMES if (place / name).is_file()]
        if len(found) != 1:
            state = "no annotation file found" if not found else f"{len(found)} annotation files found"
            tried = ", ".join(ANNO_NAMES)
            listing = "; ".join(str(p) for p in found) or f"looked for {tried} in the root and the part dirs"
            raise DatasetError(root, f"{state} ({listing}); set data.anno_file." + self.missing_root_hint())
        return found[0]

    def list_items(self, tally: ErrorTally) -> list[FabricItem]:
        """Every image folder of every part, sorted by image name."""
        items: dict[str, FabricItem] = {}
        for part in self.part_dirs():
            for kind in KINDS:
                kind_dir = part / kind
                if not kind_dir.is_dir():
                    continue
                for folder in sorted(
                    p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                ):
                    item = self._item(folder, kind, tally)
                    if item is None:
                        continue
                    if item.name in items:
                        problem = f"image name {item.name} also in {items[item.name].image.parent}"
                        tally.report(DatasetError(folder, problem), reason=DUPLICATE_IMAGE)
                        continue
                    items[item.name] = item
        if not items:
            raise DatasetError(self.hparams.root, "no image folders found." + self.missing_root_hint())
        return [items[name] for name in sorted(items)]

    @staticmethod
    def _item(folder: Path, kind: str, tally: ErrorTally) -> FabricItem | None:
        image = folder / f"{folder.name}.jpg"
        if not image.is_file():
            tally.report(DatasetError(folder, f"no image {image.name} in this folder"), reason=MISSING_IMAGE)
            return None
        templates = sorted(folder.glob(TEMPLATE_GLOB))
        return FabricItem(image.name, image, kind, templates[0] if len(templates) == 1 else None)

    # --------------------------------------------------------------------------- reading
    def read_splits(self, tally: ErrorTally) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        hp = self.hparams
        items = self.list_items(tally)  # the split is drawn before any file is parsed
        annotations = read_fabric_annotations(self.annotation_file(), self.labels, tally)
        self._report_absent_images(annotations, {item.name for item in items}, tally)
        parts = fixed_size_split(len(items), hp.test_size, hp.val_fraction, hp.split_seed)
        records = {}
        for split in SPLITS:
            made = (self._record(items[i], annotations, tally) for i in parts[split])
            records[split] = [r for r in made if r is not None]
        return records, list(hp.classes)

    @staticmethod
    def _report_absent_images(annotations: FabricAnnotations, names: set[str], tally: ErrorTally) -> None:
        for name, boxes in annotations.boxes.items():
            if name not in names:
                numbers = ", ".join(f"#{b.number}" for b in boxes[:5])
                problem = f"entries {numbers} name {name}, which is in no image folder"
                tally.report(DatasetError(annotations.path, problem), reason=MISSING_IMAGE)

    @staticmethod
    def _record(
        item: FabricItem, annotations: FabricAnnotations, tally: ErrorTally
    ) -> DetectionRecord | None:
        entries = annotations.boxes.get(item.name, [])
        if item.kind == "defect" and item.name not in annotations.annotated:
            log.warning("%s: defect image without annotation entries, dropped", item.image)
            tally.count(UNANNOTATED_DEFECT)
            return None
        try:
            width, height = image_size(item.image)
        except DatasetError as error:
            tally.report(error, reason=UNREADABLE_IMAGE)
            return None
        boxes, labels, difficult = sanitize_boxes(
            [e.box for e in entries],
            [e.label for e in entries],
            [False] * len(entries),
            width,
            height,
            annotations.path,
            tally,
            numbers=[e.number for e in entries],
        )
        annotated = item.name in annotations.annotated or item.kind == "defect"
        return DetectionRecord(item.image, boxes, labels, difficult, width, height, item.template, annotated)

    def template_error(self, record: DetectionRecord) -> DatasetError | None:
        """Exactly one ``template_*.jpg`` beside the image, else an error naming folder and image."""
        folder = record.image_path.parent
        templates = sorted(folder.glob(TEMPLATE_GLOB))
        if len(templates) == 1:
            return None
        found = "none" if not templates else ", ".join(p.name for p in templates)
        problem = f"no aligned template for {record.image_path}: expected one {TEMPLATE_GLOB} in the folder, found {found}"
        return DatasetError(folder, problem)

    @property
    def protocol(self) -> str:
        hp = self.hparams
        shift = hp.template_shift
        shifted = f"; templates shifted {shift[0]}-{shift[1]} px" if shift else ""
        return (
            f"Fabric (Tianchi 2019 round 2): seeded {hp.test_size}-image test split, rest train with "
            f"val = {100 * hp.val_fraction:g}% of it, seed {hp.split_seed}; "
            f"classes ({len(hp.classes)}): {class_list(hp.classes)}{shifted}"
        )
