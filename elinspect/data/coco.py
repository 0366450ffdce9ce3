"""A detection dataset described by COCO "instances" JSON files (``data=coco``).

One JSON per split (``train_json``, optional ``val_json`` and ``test_json``), image
``file_name`` entries relative to ``image_root`` (or to a per-split image root). Relative
paths are taken from ``root``. Without ``val_json`` a seeded ``val_fraction`` of the
training images becomes val; without ``test_json`` the test split is the val split (the
protocol line says so). ``iscrowd = 1`` boxes are ``difficult`` (never penalised as misses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Unpack

from elinspect.data.base import LoaderArgs
from elinspect.data.box_transforms import Resize
from elinspect.data.detection import DetectionDataModule, class_list
from elinspect.data.errors import ErrorTally
from elinspect.data.readers.coco import read_coco
from elinspect.data.records import DetectionRecord
from elinspect.data.splits import holdout_split


class CocoDataModule(DetectionDataModule):
    """COCO-format detection splits (see ``conf/data/coco.yaml``).

    ``classes``: ``None`` takes the training file's categories (ordered by id); a list fixes
    the classes and their label order, categories being matched by name (a category not in
    it is an unknown-category error). Val and test files are read with the training classes.
    """

    name = "COCO"

    def __init__(
        self,
        root: str,
        train_json: str,
        val_json: str | None = None,
        test_json: str | None = None,
        image_root: str = ".",
        train_image_root: str | None = None,
        val_image_root: str | None = None,
        test_image_root: str | None = None,
        classes: list[str] | None = None,
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

    def _path(self, path: str) -> Path:
        """``path`` below ``root`` unless it is absolute."""
        return Path(self.hparams.root).expanduser() / Path(path).expanduser()

    def _read(
        self, split: str, class_names: list[str] | None, tally: ErrorTally
    ) -> tuple[list[DetectionRecord], list[str]]:
        hp = self.hparams
        images = hp[f"{split}_image_root"] or hp.image_root
        return read_coco(self._path(hp[f"{split}_json"]), self._path(images), class_names, tally)

    def read_splits(self, tally: ErrorTally) -> tuple[dict[str, list[DetectionRecord]], list[str]]:
        hp = self.hparams
        train, names = self._read("train", hp.classes, tally)
        if hp.val_json:
            val, _ = self._read("val", names, tally)
        else:
            keep, held = holdout_split(len(train), hp.val_fraction, hp.split_seed)
            train, val = [train[i] for i in keep], [train[i] for i in held]
        test = self._read("test", names, tally)[0] if hp.test_json else list(val)
        return {"train": train, "val": val, "test": test}, names

    @property
    def protocol(self) -> str:
        hp = self.hparams
        val = (
            Path(hp.val_json).name
            if hp.val_json
            else f"val = {100 * hp.val_fraction:g}% of train (seed {hp.split_seed})"
        )
        test = Path(hp.test_json).name if hp.test_json else "test = val (no test_json)"
        names = self.class_names or hp.classes
        classes = f"classes: {class_list(names)}" if names else "classes from the training file"
        return f"COCO splits {Path(hp.train_json).name} / {val} / {test}; {classes}"
