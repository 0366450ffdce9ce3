"""ELPV: electroluminescence images of solar cells with defect probabilities.

The dataset (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) has 2624 cells of 300×300
8-bit grey, each with a defect probability in {0, 1/3, 2/3, 1} (1508 / 295 / 106 / 715)
and a module type (mono / poly). It ships as ``labels.csv`` (whitespace separated:
``images/cellNNNN.png  probability  type``) beside ``images/``; the ``elpv-dataset``
package on PyPI carries exactly that directory, which is the default root here.

Bad input in a directory given as ``data.root`` and what happens (``data.on_error``:
``raise`` stops with a :class:`~elinspect.data.errors.DatasetError` naming the file — and
the line of ``labels.csv`` — ``skip`` drops the row, logs it and counts it under the
reason shown, in the summary logged at setup and kept in ``ElpvDataModule.tally``):

==================================  ===================================  =================================
input                               raise                                skip (tally reason)
==================================  ===================================  =================================
no labels.csv                       error explaining the layout          the same error
a row without 3 fields, or a        error naming labels.csv:<line>       row dropped ("malformed row")
probability that is no number
probability not in {0, ⅓, ⅔, 1}      error naming labels.csv:<line>       row dropped ("bad probability")
type not mono / poly (the class)    error naming labels.csv:<line>       row dropped ("bad type")
path leaving the root               error naming labels.csv:<line>       row dropped ("outside root")
(``../../x.png``, absolute, NUL)
the same image on two rows          error naming labels.csv:<line>       later row dropped ("duplicate row")
image missing                       error naming the image and line      row dropped ("missing image")
image empty, not an image, or a     error naming the image, at setup     row dropped ("unreadable image")
decompression bomb (header)
image truncated / corrupt past      error naming the image when loaded   same (a batch cannot drop an item)
its header
16-bit image / alpha channel        read: scaled to 8 bits / alpha dropped, then grey
no usable row left                  error naming labels.csv              the same error
==================================  ===================================  =================================

Headers are checked for a directory given as ``data.root``; the package's own 2624 cells
(known good) are not re-checked at every setup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Unpack

import numpy as np
import torch
from torch.utils.data import Dataset

from elinspect.data.base import LoaderArgs, SplitDataModule
from elinspect.data.errors import DatasetError, ErrorTally, OnError
from elinspect.data.images import read_image, to_tensor_layout
from elinspect.data.info import DatasetInfo
from elinspect.data.readers.boxes import image_size, path_inside
from elinspect.data.splits import stratified_fold_ids, stratified_holdout
from elinspect.data.transforms import apply_seeded, image_augmentation, resize, sample_seed
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

PROBABILITY_LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)
MODULE_TYPES = ("mono", "poly")


def package_root() -> Path:
    """The directory of the ``elpv-dataset`` package's ``labels.csv`` and ``images/``."""
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


@dataclass(frozen=True)
class ElpvTable:
    """The rows of ``labels.csv``: image paths, defect probabilities, module types."""

    paths: tuple[Path, ...]
    probability: np.ndarray
    module_type: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def read_labels(
    root: str | Path,
    on_error: OnError = "raise",
    check_images: bool = True,
    tally: ErrorTally | None = None,
) -> ElpvTable:
    """Parse ``root/labels.csv``; every row must name an existing image inside ``root``.

    ``check_images`` reads every image's header (an empty, non-image or oversized file is
    then reported here rather than when it is loaded). Skipped rows are counted in
    ``tally`` (a new one with ``on_error`` when not given); see the module docstring.
    """
    root = Path(root).expanduser().resolve()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError(
            labels,
            "not found. An ELPV directory holds labels.csv (lines 'images/cell0001.png  1.0  mono') "
            "and images/; leave data.root null to use the elpv-dataset package.",
        )
    try:
        text = labels.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise DatasetError(labels, f"cannot be read ({error})") from error
    tally = tally if tally is not None else ErrorTally(on_error)
    paths, probs, types = [], [], []
    rows: dict[Path, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{labels}:{lineno}"
        fields = line.split()
        if len(fields) != 3:
            tally.report(
                DatasetError(where, f"expected 'path probability type', got {line!r:.200}"), "malformed row"
            )
            continue
        rel, prob_text, module_type = fields
        try:
            prob = float(prob_text)
        except ValueError:
            problem = f"probability {prob_text!r:.50} is not a number"
            tally.report(DatasetError(where, problem), "malformed row")
            continue
        level = min(PROBABILITY_LEVELS, key=lambda level: abs(prob - level))
        if abs(prob - level) >= 1e-3:
            tally.report(
                DatasetError(where, f"probability {prob} is not one of 0, 1/3, 2/3, 1"), "bad probability"
            )
            continue
        prob = level  # a value written rounded (0.333, 0.6667) is the level it stands for
        if module_type not in MODULE_TYPES:
            problem = f"module type {module_type!r:.50} is not mono or poly"
            tally.report(DatasetError(where, problem), "bad type")
            continue
        try:
            path = path_inside(root, rel)
        except DatasetError as error:
            tally.report(DatasetError(where, f"image {error.problem}"), "outside root")
            continue
        if path in rows:
            problem = f"image {rel!r} is already listed on line {rows[path]}"
            tally.report(DatasetError(where, problem), "duplicate row")
            continue
        if not path.is_file():
            tally.report(DatasetError(path, f"image listed in {where} does not exist"), "missing image")
            continue
        if check_images:
            try:
                image_size(path)
            except DatasetError as error:
                tally.report(error, "unreadable image")
                continue
        rows[path] = lineno
        paths.append(path)
        probs.append(prob)
        types.append(module_type)
    if tally.total:
        log.warning("ELPV %s: skipped %s", root, tally.summary())
    if not paths:
        raise DatasetError(labels, "lists no usable image")
    return ElpvTable(tuple(paths), np.asarray(probs, dtype=np.float64), np.asarray(types))


def snap_to_level(threshold: float, tolerance: float = 0.01) -> float:
    """The probability level ``threshold`` stands for (0.33 → 1/3), or itself."""
    nearest = min(PROBABILITY_LEVELS, key=lambda level: abs(level - threshold))
    return nearest if abs(nearest - threshold) <= tolerance else threshold


def make_targets(
    probability: np.ndarray,
    target: Literal["binary", "four_class"],
    threshold: float,
    rule: Literal["gt", "ge"],
) -> np.ndarray:
    """Integer targets: binary (1 = defective) by ``p > t`` or ``p >= t``, or the 4 levels.

    A threshold within 0.01 of a probability level stands for that level, as the papers
    write it: 0.33 means 1/3, so ``p > 0.33`` is p ∈ {2/3, 1} (the SeMaCNN paper's
    "threshold at 0.33") and ``p >= 0.33`` is p ∈ {1/3, 2/3, 1}.
    """
    threshold = snap_to_level(threshold)
    if target == "four_class":
        return np.rint(probability * 3).astype(np.int64)
    if target != "binary":
        raise ConfigError(f"data.target must be binary or four_class, got {target!r}")
    if rule == "gt":
        return (probability > threshold + 1e-9).astype(np.int64)
    if rule == "ge":
        return (probability >= threshold - 1e-9).astype(np.int64)
    raise ConfigError(f"data.threshold_rule must be gt or ge, got {rule!r}")


class ElpvDataset(Dataset):
    """Cells of one split. ``expand`` adds that many fixed random variants of each image.

    Items are dicts: ``image`` (C×H×W float in [0, 1]), ``label`` (int64), ``probability``,
    ``index`` (row of labels.csv).
    """

    def __init__(
        self,
        table: ElpvTable,
        rows: np.ndarray,
        targets: np.ndarray,
        image_size: int,
        channels: int,
        augment: dict[str, float] | None = None,
        expand: int = 0,
        expand_seed: int = 0,
        unaugmented: bool = False,
    ) -> None:
        self.table, self.rows, self.targets = table, rows, targets
        self.unaugmented = unaugmented
        self.image_size, self.channels, self.expand, self.expand_seed = (
            image_size,
            channels,
            expand,
            expand_seed,
        )
        self.augment = image_augmentation(**augment) if augment else None
        self.fixed_variants = image_augmentation() if expand else None

    def __len__(self) -> int:
        return len(self.rows) * (1 + self.expand)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i // (1 + self.expand)])
        variant = i % (1 + self.expand)
        image = read_image(self.table.paths[row], grey=True)
        plain = resize(image, self.image_size) if self.unaugmented else None
        if variant:
            image = apply_seeded(
                self.fixed_variants, image, self.expand_seed * 1_000_003 + row * 1009 + variant
            )
        if self.augment is not None:
            image = apply_seeded(self.augment, image, sample_seed())
        image = resize(image, self.image_size)
        item = {
            "image": torch.from_numpy(to_tensor_layout(image, self.channels)),
            "label": torch.tensor(self.targets[row], dtype=torch.int64),
            "probability": torch.tensor(self.table.probability[row], dtype=torch.float32),
            # what anomaly models fit on: p = 0, whatever the target's threshold puts in class 0
            "defect_free": torch.tensor(self.table.probability[row] == 0),
            "index": row,
        }
        if plain is not None:
            item["image_unaugmented"] = torch.from_numpy(to_tensor_layout(plain, self.channels))
        return item


class ElpvDataModule(SplitDataModule):
    """ELPV splits for classifiers and anomaly detectors (see ``conf/data/elpv.yaml``)."""

    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "anomaly"})

    @classmethod
    def eval_preprocessing(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """How a test cell becomes the model's input (:class:`elinspect.inference.Preprocessing`'s
        fields): decoded grey, repeated to ``channels``, resized to ``image_size``²."""
        return {"grey": True, "channels": int(hparams["channels"]), "image_size": int(hparams["image_size"])}

    def __init__(
        self,
        root: str | None = None,
        target: Literal["binary", "four_class"] = "binary",
        threshold: float = 0.0,
        threshold_rule: Literal["gt", "ge"] = "gt",
        module_type: Literal["all", "mono", "poly"] = "all",
        test_fraction: float = 0.25,
        val_fraction: float = 0.1,
        num_folds: int | None = None,
        fold: int = 0,
        split_seed: int = 42,
        train_normal_only: bool = False,
        image_size: int = 300,
        channels: int = 3,
        augment: dict[str, float] | None = None,
        expand: int = 0,
        batch_size: int = 32,
        **loader: Unpack[LoaderArgs],
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(logger=False)
        if module_type not in ("all", *MODULE_TYPES):
            raise ConfigError(f"data.module_type must be all, mono or poly, got {module_type!r}")
        if num_folds is not None and not 0 <= fold < num_folds:
            raise ConfigError(f"data.fold must lie in 0..{num_folds - 1}, got {fold}")
        self.table: ElpvTable | None = None
        self.split_rows: dict[str, np.ndarray] = {}
        self.targets: np.ndarray | None = None
        self.tally: ErrorTally | None = None

    # ----------------------------------------------------------------------------- splits
    def setup(self, stage: str | None = None) -> None:
        if self.split_rows:
            return
        hp = self.hparams
        tally = ErrorTally(self.on_error)
        self.table = read_labels(
            hp.root or package_root(), self.on_error, check_images=hp.root is not None, tally=tally
        )
        self.tally = tally
        self.targets = make_targets(self.table.probability, hp.target, hp.threshold, hp.threshold_rule)
        keep = np.ones(len(self.table), dtype=bool)
        if hp.module_type != "all":
            keep = self.table.module_type == hp.module_type
        rows = np.flatnonzero(keep)
        level = np.rint(self.table.probability[rows] * 3).astype(int)
        strata = np.char.add(level.astype(str), self.table.module_type[rows])
        if hp.num_folds:
            is_test = stratified_fold_ids(strata, hp.num_folds, hp.split_seed) == hp.fold
        else:
            is_test = stratified_holdout(strata, hp.test_fraction, hp.split_seed)
        rest = rows[~is_test]
        is_val = stratified_holdout(strata[~is_test], hp.val_fraction, hp.split_seed + 1)
        train = rest[~is_val]
        if hp.train_normal_only:
            train = train[self.table.probability[train] == 0]
        self.split_rows = {"train": train, "val": rest[is_val], "test": rows[is_test]}
        log.info(
            "ELPV: %d train, %d val, %d test cells (%s)",
            *(len(self.split_rows[s]) for s in ("train", "val", "test")),
            self.protocol,
        )

    @property
    def protocol(self) -> str:
        """One line that states the split, to print beside every number."""
        hp = self.hparams
        split = (
            f"fold {hp.fold} of {hp.num_folds} as test"
            if hp.num_folds
            else f"{round(100 * (1 - hp.test_fraction))}/{round(100 * hp.test_fraction)} train+val/test"
        )
        rule = ">" if hp.threshold_rule == "gt" else "≥"
        target = "4 classes" if hp.target == "four_class" else f"defective if p {rule} {hp.threshold:g}"
        return f"stratified {split}, seed {hp.split_seed}, {target}, modules: {hp.module_type}"

    @property
    def labelling(self) -> str:
        """Which probability levels the labels call defective (the binary classes are named
        alike at every threshold; rules that label alike, p > 0 and p ≥ 1/3, read alike)."""
        hp = self.hparams
        if hp.target == "four_class":
            return "the four probability levels"
        levels = np.asarray(PROBABILITY_LEVELS)
        defective = levels[make_targets(levels, "binary", hp.threshold, hp.threshold_rule) == 1]
        names = {0.0: "0", 1 / 3: "1/3", 2 / 3: "2/3", 1.0: "1"}
        return "defective if p ∈ {" + ", ".join(names[float(level)] for level in defective) + "}"

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.hparams.target == "four_class":
            return ("p=0", "p=1/3", "p=2/3", "p=1")
        return ("normal", "defective")

    @property
    def info(self) -> DatasetInfo:
        self.setup()
        counts = np.bincount(self.targets[self.split_rows["train"]], minlength=len(self.class_names))
        size = self.hparams.image_size
        return DatasetInfo(
            task="classification",
            class_names=self.class_names,
            in_channels=self.hparams.channels,
            class_counts=tuple(int(c) for c in counts),
            image_size=(size, size),
            labelling=self.labelling,
        )

    # ------------------------------------------------------------------------ dataloaders
    def dataset(self, split: str) -> ElpvDataset:
        self.setup()
        hp = self.hparams
        train = split == "train"
        return ElpvDataset(
            self.table,
            self.split_rows[split],
            self.targets,
            hp.image_size,
            hp.channels,
            augment=dict(hp.augment) if (train and hp.augment) else None,
            expand=hp.expand if train else 0,
            unaugmented=train and "unaugmented" in self.requested_inputs,
            expand_seed=hp.split_seed,
        )
