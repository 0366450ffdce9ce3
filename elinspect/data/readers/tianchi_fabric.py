"""The Tianchi 2019 fabric annotation file (``anno_train_20190925.json``, DESIGN.md §3).

A JSON list of entries ``{"name": "<stem>.jpg", "defect_name": "<Chinese class>",
"bbox": [x1, y1, x2, y2]}``, one per box, in pixels of the 4096×1696 image; an image with
several boxes has several entries, and defect-free (``normal``) images have none. The real
file holds 16457 entries on 3107 images in 15 classes.

Errors: a file that cannot be read, is not JSON or is not a list raises
:class:`~elinspect.data.errors.DatasetError` naming it whatever ``on_error`` says (nothing of
the dataset would be left to skip to). A malformed entry, an unknown ``defect_name`` or a
``name`` that is not a bare file name inside the dataset (``../x.jpg``, ``/x.jpg``) goes
through the tally and drops that entry. Every entry is kept here; the boxes are sanitised
later with the image's size (:func:`~elinspect.data.readers.boxes.sanitize_boxes`), which also
drops and counts an entry repeating an earlier one exactly (same image, class and box; the real
file has one): never fatal, as a second ground truth on the same object would count as a miss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers.boxes import OUTSIDE_ROOT, is_json_number
from elinspect.data.readers.labelme import load_json_file
from elinspect.data.readers.voc import IGNORED_CLASS, UNKNOWN_CLASS

MALFORMED_ENTRY = "malformed annotation entry"
_UNREADABLE = "unreadable annotation file"


@dataclass(frozen=True)
class FabricBox:
    """One entry: its class label (1-based), box and position in the file."""

    label: int
    box: tuple[float, float, float, float]
    number: int


@dataclass
class FabricAnnotations:
    """What the file holds, per image name."""

    path: Path
    boxes: dict[str, list[FabricBox]] = field(default_factory=dict)
    num_entries: int = 0
    defect_names: set[str] = field(default_factory=set)
    # names with a well-formed entry, kept or of a class outside the chosen subset
    annotated: set[str] = field(default_factory=set)

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes.values())


def read_fabric_annotations(
    path: str | Path, labels: Mapping[str, int | None], tally: ErrorTally
) -> FabricAnnotations:
    """Parse the annotation list; ``labels`` maps ``defect_name`` to a 1-based class label or
    to ``None`` for a known class outside the chosen subset (dropped and counted).

    ``num_entries`` counts every entry of the file; ``boxes`` holds the kept ones (all but the
    malformed, unknown and ignored) by image name, in file order; ``defect_names`` the
    distinct names of the kept entries.
    """
    path = Path(path)
    raising = ErrorTally("raise")
    data = load_json_file(path, raising, _UNREADABLE)
    if not isinstance(data, list):
        kind = type(data).__name__
        raise DatasetError(path, f"the annotation file holds a JSON {kind}, not a list of box entries")
    out = FabricAnnotations(path, num_entries=len(data))
    for number, entry in enumerate(data):
        parsed = _parse_entry(entry, number, path, labels, tally)
        if parsed is None:
            continue
        name, defect_name, label, box = parsed
        out.annotated.add(name)
        if label is None:  # a class outside the subset: the image stays annotated, the box goes
            continue
        out.boxes.setdefault(name, []).append(FabricBox(label, box, number))
        out.defect_names.add(defect_name)
    return out


def _parse_entry(
    entry: Any, number: int, path: Path, labels: Mapping[str, int | None], tally: ErrorTally
) -> tuple[str, str, int | None, tuple[float, float, float, float]] | None:
    """``(name, defect_name, label, box)`` of one entry (label ``None``: a class outside the
    subset, counted), or ``None`` when it is dropped as malformed or unknown."""
    if not isinstance(entry, dict):
        tally.report(DatasetError(path, f"entry #{number} is not an object"), reason=MALFORMED_ENTRY)
        return None
    name, defect_name, bbox = entry.get("name"), entry.get("defect_name"), entry.get("bbox")
    if not isinstance(name, str) or not name or not isinstance(defect_name, str):
        problem = f"entry #{number} needs string 'name' and 'defect_name': {entry!r:.200}"
        tally.report(DatasetError(path, problem), reason=MALFORMED_ENTRY)
        return None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_json_number(v) for v in bbox)):
        problem = f"entry #{number} ({name}) needs 'bbox' as [x1, y1, x2, y2] numbers: {bbox!r:.200}"
        tally.report(DatasetError(path, problem), reason=MALFORMED_ENTRY)
        return None
    posix = PurePosixPath(name.replace("\\", "/"))
    if "\x00" in name or posix.is_absolute() or ".." in posix.parts:
        problem = f"entry #{number} names {name!r}, a path outside the dataset root"
        tally.report(DatasetError(path, problem), reason=OUTSIDE_ROOT)
        return None
    defect_name = defect_name.strip()
    if defect_name not in labels:
        problem = (
            f"entry #{number} ({name}) has unknown defect_name {defect_name!r} (known: {', '.join(labels)})"
        )
        tally.report(DatasetError(path, problem), reason=UNKNOWN_CLASS)
        return None
    label = labels[defect_name]
    if label is None:
        tally.count(IGNORED_CLASS)
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return name, defect_name, label, (x1, y1, x2, y2)


__all__ = [
    "MALFORMED_ENTRY",
    "FabricAnnotations",
    "FabricBox",
    "read_fabric_annotations",
]
