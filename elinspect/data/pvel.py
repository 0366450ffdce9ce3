"""PVEL-AD: electroluminescence images of solar cells with 12 defect classes (``data=pvel``).

Read in the layout the publisher ships (Pascal VOC 2007, DESIGN.md §3): 1024×1024 grey
JPEGs, XML boxes, ``ImageSets/Main/{trainval,test}.txt``. Class subsets are chosen by name
from ``class_sets`` (``conf/data/pvel.yaml``: ``all``, the EBBA paper's five ``ebba5`` and
the BAF paper's three ``baf3``) or given as a list; boxes of the other PVEL-AD classes are
dropped and counted, names outside PVEL-AD's twelve are unknown-class errors.

Splits: ``official`` (trainval / test files, a seeded ``val_fraction`` of trainval as
val) or ``ratio`` (a seeded 6:2:2 train/val/test draw over all images, the EBBA paper's
protocol, ``ebba-detector.txt`` §4.A).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Unpack

from elinspect.data.base import LoaderArgs
from elinspect.data.box_transforms import Resize
from elinspect.data.detection import class_list
from elinspect.data.errors import ErrorTally
from elinspect.data.voc import VocLayoutDataModule
from elinspect.utils.errors import ConfigError

PVEL_CLASSES: tuple[str, ...] = (
    "crack",
    "finger",
    "black_core",
    "thick_line",
    "star_crack",
    "corner",
    "fragment",
    "scratch",
    "horizontal_dislocation",
    "vertical_dislocation",
    "printing_error",
    "short_circuit",
)
"""The 12 PVEL-AD class names, as written in the real annotations."""


class PvelAdDataModule(VocLayoutDataModule):
    """PVEL-AD detection splits (see ``conf/data/pvel.yaml``)."""

    name = "PVEL-AD"

    def __init__(
        self,
        root: str,
        classes: str | list[str] = "all",
        class_sets: Mapping[str, Sequence[str]] | None = None,
        split: Literal["official", "ratio"] = "official",
        ratios: Sequence[float] = (0.6, 0.2, 0.2),
        val_fraction: float = 0.2,
        split_seed: int = 42,
        keep_difficult: bool = True,
        drop_empty_train: bool = False,
        image_size: int | None = 600,
        resize: Resize = "square",
        augment: dict[str, float] | None = None,
        batch_size: int = 2,
        **loader: Unpack[LoaderArgs],
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(logger=False)
        self.selected = self.resolve_classes(classes, class_sets)

    @staticmethod
    def resolve_classes(
        classes: str | Sequence[str], class_sets: Mapping[str, Sequence[str]] | None
    ) -> list[str]:
        """The class names for ``classes``: a key of ``class_sets`` or a list of PVEL-AD names."""
        sets = {"all": list(PVEL_CLASSES), **(class_sets or {})}
        if isinstance(classes, str):
            if classes not in sets:
                raise ConfigError(
                    f"data.classes={classes!r} is not a class set; choose one of {sorted(sets)}"
                )
            names = list(sets[classes])
        else:
            names = list(classes)
        unknown = [n for n in names if n not in PVEL_CLASSES]
        if unknown:
            raise ValueError(f"classes {unknown} are not PVEL-AD classes ({', '.join(PVEL_CLASSES)})")
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"data.classes must name distinct PVEL-AD classes, got {names}")
        return names

    def select_classes(self, voc: Path, tally: ErrorTally) -> tuple[list[str], list[str] | None]:
        return self.selected, list(PVEL_CLASSES)

    def missing_root_hint(self) -> str:
        return (
            " Download PVEL-AD into it, or write a synthetic one in this layout with: "
            f"python -m elinspect.data.synthetic pvel --out {self.hparams.root} --num-images 200 --seed 0"
        )

    def classes_line(self) -> str:
        classes = self.hparams.classes
        label = f"{classes} " if isinstance(classes, str) else ""
        return f"classes {label}({len(self.selected)}): {class_list(self.selected)}"
