"""Aluminum: aluminium profile surfaces, 10 defect classes (``data=aluminum``).

Tianchi 2018 (Guangdong) round 2, read in the layout the publisher ships (DESIGN.md §3)::

    <root>/guangdong_round2_train_20181011/<category dir>/[<sub dir>/]<name>.jpg
    <root>/guangdong_round2_train_20181011/<category dir>/[<sub dir>/]<name>.json   (labelme)

The release sorts images into ``单瑕疵图片/<class>/`` (one defect class per image),
``多瑕疵图片/`` (several) and ``无瑕疵样本/`` (defect-free); the folder names carry no labels
here: every image below the release directory is read, its labels come from the labelme JSON
beside it (:mod:`elinspect.data.readers.labelme`), and an image without a JSON is defect-free,
except below the two defect folders, where it is an error naming the image (under
``on_error=skip`` a counted skip). A JSON without an image beside it is a missing-image error. 2560×1920 images are resized
(``image_size``) as they are read.

Classes are config: ``classes`` (English names, label order) and ``name_map`` (label in the
files → name), so a production line with other defect names needs no code.

Protocol (``rddn.txt`` §III.A): a seeded random ``test_size`` = 500 images for test (defect and
defect-free alike), the rest for training, of which a seeded ``val_fraction`` is val.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Unpack

from elinspect.data.base import LoaderArgs
from elinspect.data.box_transforms import Resize
from elinspect.data.detection import SPLITS, DetectionDataModule, class_list, class_lookup
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers.boxes import image_size
from elinspect.data.readers.labelme import read_labelme
from elinspect.data.readers.voc import IMAGE_EXTENSIONS, MISSING_IMAGE, UNREADABLE_IMAGE
from elinspect.data.records import DetectionRecord
from elinspect.data.splits import fixed_size_split

RELEASE_DIR = "guangdong_round2_train_20181011"
DEFECT_DIRS = ("单瑕疵图片", "多瑕疵图片")  # the release's folders of defect images (one class, several)
UNANNOTATED_DEFECT = "defect image without its labelme JSON"


class AluminumDataModule(DetectionDataModule):
    """Aluminum detection splits (see ``conf/data/aluminum.yaml``)."""

    name = "Aluminum"

    def __init__(
        self,
        root: str,
        release_dir: str | None = RELEASE_DIR,
        classes: Sequence[str] = (),
        name_map: Mapping[str, str] | None = None,
        test_size: int = 500,
        val_fraction: float = 0.1,
        split_seed: int = 42,
        keep_difficult: bool = True,
        drop_empty_train: bool = False,
        image_size: int | None = 1333,
        resize: Resize = "longer",
        augment: dict[str, float] | None = None,
        batch_size: int = 2,
        **loader: Unpack[LoaderArgs],
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(logger=False)
        self.labels = class_lookup(classes, name_map)

    def missing_root_hint(self) -> str:
        root = self.hparams.root
        return (
            f" Expected layout: {root}/{self.hparams.release_dir or '.'}/<category dir>/[<sub dir>/]"
            "<name>.jpg with a labelme <name>.json beside each defect image. Download the Tianchi 2018 "
            "aluminium round 2 data into it, or write a synthetic one in this layout with: "
            f"python -m elinspect.data.synthetic aluminum --out {root} --num-images 200 --seed 0"
        )

    def dataset_dir(self) -> Path:
        """The release directory holding the category dirs (``root`` itself when it is that
        directory, or when ``release_dir`` is null)."""
        root = Path(self.hparams.root).expanduser()
        release = self.hparams.release_dir
        candidates = [root / release, root] if release and root.name != release else [root]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        state = "does not exist" if not root.exists() else f"holds no {release}/ directory"
        raise DatasetError(root, f"dataset root {state}." + self.missing_root_hint())

    def list_images(self, base: Path, tally: ErrorTally) -> list[Path]:
        """Every image below ``base``, sorted by relative path (hidden files and ``__MACOSX/``
        left out); JSONs without an image beside them are reported."""
        extensions = {e.lower() for e in IMAGE_EXTENSIONS}
        images, stems = [], set()
        jsons = []
        for path in base.rglob("*"):
            hidden = any(part.startswith((".", "__MACOSX")) for part in path.relative_to(base).parts)
            if hidden or not path.is_file():  # macOS zip debris (__MACOSX/, ._name.jpg) is no image
                continue
            suffix = path.suffix.lower()
            if suffix in extensions:
                images.append(path)
                stems.add(path.with_suffix(""))
            elif suffix == ".json":
                jsons.append(path)
        for json_path in sorted(jsons):
            if json_path.with_suffix("") not in stems:
                problem = f"no image beside this annotation (looked for {json_path.stem}.jpg)"
                tally.report(DatasetError(json_path, problem), reason=MISSING_IMAGE)
        if not images:
            raise DatasetError(base, "no images found." + self.missing_root_hint())
        return sorted(images, key=lambda p: p.relative_to(base).as_posix())

    def read_splits(self, tally: ErrorTally) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        hp = self.hparams
        base = self.dataset_dir()
        images = self.list_images(base, tally)  # the split is drawn before any file is parsed
        parts = fixed_size_split(len(images), hp.test_size, hp.val_fraction, hp.split_seed)
        records = {}
        for split in SPLITS:
            made = (self._record(images[i], base, tally) for i in parts[split])
            records[split] = [r for r in made if r is not None]
        return records, list(hp.classes)

    def _record(self, image: Path, base: Path, tally: ErrorTally) -> DetectionRecord | None:
        try:  # every image's header: an empty, non-image or bomb file is caught at setup
            width, height = image_size(image)
        except DatasetError as error:
            tally.report(error, reason=UNREADABLE_IMAGE)
            return None
        json_path = image.with_suffix(".json")
        if json_path.is_file():
            return read_labelme(json_path, image, base, self.labels, tally, header_size=(width, height))
        if image.relative_to(base).parts[0] in DEFECT_DIRS:  # not defect-free: its labels are lost
            problem = f"{UNANNOTATED_DEFECT} (looked for {json_path.name})"
            tally.report(DatasetError(image, problem), reason=UNANNOTATED_DEFECT)
            return None
        return DetectionRecord(image, width=width, height=height)

    @property
    def protocol(self) -> str:
        hp = self.hparams
        return (
            f"Aluminum (Tianchi 2018 round 2): seeded {hp.test_size}-image test split, rest train with "
            f"val = {100 * hp.val_fraction:g}% of it, seed {hp.split_seed}; "
            f"classes ({len(hp.classes)}): {class_list(hp.classes)}"
        )
