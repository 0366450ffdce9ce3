"""Pascal VOC XML annotations (PVEL-AD and any user dataset in the VOC 2007 layout).

Layout read: ``VOC2007/{Annotations/<id>.xml, JPEGImages/<id>.<ext>, ImageSets/Main/<split>.txt}``,
where the root given may be the ``VOC2007`` directory itself or a directory holding
``VOCdevkit/VOC2007``.

Coordinates: VOC boxes are 1-based inclusive pixel indices, so a box covering pixel
columns 0..9 of the image is written ``xmin=1, xmax=10``. Records hold 0-based continuous
pixel coordinates, hence ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (the box
keeps its width ``xmax - xmin + 1``).

Quirks of real files that are tolerated: control characters inside the XML (stripped and
counted), ``<depth>`` disagreeing with the image (ignored), Windows paths in ``<path>`` and a
``<filename>`` that disagrees with the file (both ignored: the image is found from the id),
a missing ``<size>`` (read from the image header), and images without an XML (defect-free).

XML is parsed with ``defusedxml``: entity declarations (billion laughs, external entities)
are refused, never expanded.

Bad input and what happens (``data.on_error``: ``raise`` stops with a
:class:`~elinspect.data.errors.DatasetError` naming the file; ``skip`` drops the item,
logs it and counts it under the reason shown, in the tally summary logged at setup):

====================================  =====================================  ==========================================
input                                 raise                                  skip (tally reason)
====================================  =====================================  ==========================================
unparsable XML, wrong root element,   error naming the XML                   image dropped ("unparsable annotation XML")
entity declaration (XXE, billion
laughs: refused by defusedxml)
object without <name> / <bndbox>,     error naming the XML and the object    object dropped ("object without <name>",
non-numeric coordinates                                                      "... <bndbox>", "... non-numeric ...")
unknown class                         error naming the XML and the class     box dropped ("box of unknown class")
box partly outside the image          clipped, counted, never an error       "box clipped to image"
(negative coordinates too)
box NaN / infinite                    error naming the XML and the box       box dropped ("box with non-finite ...")
zero-area, swapped corners, wholly    error naming the XML and the box       box dropped ("box with zero or negative
outside the image                                                            area")
identical duplicate box               dropped, counted, never an error       "identical duplicate box dropped"
id leaving the tree (``../../x``)     error naming the tree                  id dropped ("path outside the dataset root")
id without an image                   error naming JPEGImages/               id dropped ("missing image")
image empty, not an image, or a       error naming the image, at setup       id dropped ("unreadable image")
decompression bomb (header checked)
image truncated / corrupt past its    error naming the image when loaded     same (a loaded batch cannot drop an item)
header
16-bit image / alpha channel          read: scaled to 8 bits / alpha dropped
<size> disagreeing with the image     the image's size is used, counted      "declared image size differs ..."
====================================  =====================================  ==========================================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET

from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.data.readers.boxes import (
    OUTSIDE_ROOT,
    SIZE_MISMATCH,
    image_size,
    path_inside,
    sanitize_boxes,
)
from elinspect.data.records import DetectionRecord
from elinspect.utils.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_CONTROL_CHARS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")

# Reasons under which ErrorTally counts skipped or fixed items.
CONTROL_CHARS = "control character stripped from XML"
UNPARSABLE = "unparsable annotation XML"
NO_NAME = "object without <name>"
NO_BNDBOX = "object without <bndbox>"
BAD_COORDS = "object with non-numeric coordinates"
UNKNOWN_CLASS = "box of unknown class"
IGNORED_CLASS = "box of class outside the selected subset"
DIFFICULT_DROPPED = "difficult box dropped"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"


def parse_voc_xml(
    xml_path: str | Path,
    class_index: Mapping[str, int],
    image_path: str | Path,
    tally: ErrorTally,
    keep_difficult: bool = True,
    ignore_classes: Collection[str] = frozenset(),
    header_size: tuple[int, int] | None = None,
) -> DetectionRecord | None:
    """Read one VOC annotation file into a record for ``image_path``.

    ``header_size`` is the image's ``(width, height)`` when the caller has read its header
    already; it then wins over ``<size>`` (a difference is counted). Without it, ``<size>``
    is used, or the header is read when ``<size>`` is absent.

    ``class_index`` maps class names to labels (1-based). Objects whose class is in
    ``ignore_classes`` (known classes outside a configured subset) are dropped and counted.
    Difficult objects are kept with ``difficult=True``, or dropped (and counted) when
    ``keep_difficult`` is false. Boxes are converted to 0-based ``x1, y1, x2, y2`` (module
    docstring) and passed through :func:`sanitize_boxes`.

    Errors are :class:`DatasetError` naming ``xml_path``, sent to ``tally.report``: an
    unreadable or unparsable file (including refused entity declarations) or a missing
    image header when ``<size>`` is absent drop the whole image (``None`` is returned under
    ``skip``); an object without ``<name>`` or ``<bndbox>``, with non-numeric coordinates or
    with an unknown class drops that object.
    """
    xml_path = Path(xml_path)
    root = _load_annotation(xml_path, tally)
    if root is None:
        return None
    size = _declared_size(root)
    if header_size is not None:
        if size is not None and size != tuple(header_size):
            tally.count(SIZE_MISMATCH)
            log.warning("%s declares %d×%d, but %s is %d×%d", xml_path, *size, image_path, *header_size)
        size = tuple(header_size)
    elif size is None:
        try:
            size = image_size(image_path)
        except DatasetError as error:
            tally.report(error, reason=UNREADABLE_IMAGE)
            return None
    width, height = size

    boxes, labels, difficult, numbers = [], [], [], []
    for number, obj in enumerate(root.findall("object")):
        parsed = _parse_object(obj, number, xml_path, class_index, ignore_classes, tally)
        if parsed is None:
            continue
        box, label, is_difficult = parsed
        if is_difficult and not keep_difficult:
            tally.count(DIFFICULT_DROPPED)
            continue
        boxes.append(box)
        labels.append(label)
        difficult.append(is_difficult)
        numbers.append(number)
    boxes_arr, labels_arr, difficult_arr = sanitize_boxes(
        boxes, labels, difficult, width, height, xml_path, tally, numbers=numbers
    )
    annotated = bool(root.findall("object"))
    return DetectionRecord(
        Path(image_path), boxes_arr, labels_arr, difficult_arr, width, height, annotated=annotated
    )


def read_voc_split(
    root: str | Path,
    split: str,
    class_names: Sequence[str] | None,
    known_classes: Sequence[str] | None,
    tally: ErrorTally,
    keep_difficult: bool = True,
) -> tuple[list[DetectionRecord], list[str]]:
    """Read every image of ``ImageSets/Main/<split>.txt``; returns ``(records, class_names)``.

    ``class_names`` selects the classes and their label order (label = position + 1).
    ``known_classes`` is the dataset's full vocabulary: boxes of a known class outside
    ``class_names`` are dropped and counted, names in neither list are unknown-class
    errors. With ``class_names=None`` the classes are ``known_classes`` when given, else
    discovered (sorted) from all XMLs in ``Annotations/`` (so every split gets the same
    labels). An id without an XML is a defect-free image; an id without an image, or one
    leading outside the root, is a :class:`DatasetError` (dropped and counted under skip).
    """
    voc = resolve_voc_root(root)
    if class_names is None:
        class_names = list(known_classes) if known_classes is not None else discover_voc_classes(voc, tally)
    class_names = _check_class_names(class_names, known_classes)
    class_index = {name: label for label, name in enumerate(class_names, start=1)}
    ignore = frozenset(known_classes or ()) - set(class_names)

    records = []
    for image_id in read_voc_ids(voc, split):
        record = _read_voc_item(voc, image_id, class_index, ignore, tally, keep_difficult)
        if record is not None:
            records.append(record)
    return records, class_names


def resolve_voc_root(root: str | Path) -> Path:
    """The ``VOC2007``-like directory (the one holding ``JPEGImages/``) for ``root``.

    Accepts the directory itself, or one containing ``VOCdevkit/VOC2007`` or ``VOC2007``.
    """
    root = Path(root)
    for candidate in (root, root / "VOCdevkit" / "VOC2007", root / "VOC2007"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(root, "not a Pascal VOC tree: no JPEGImages/ here nor under VOCdevkit/VOC2007/")


def read_voc_ids(root: str | Path, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/<split>.txt`` (first token per line, in order,
    duplicates removed)."""
    voc = resolve_voc_root(root)
    split_file = path_inside(voc, f"ImageSets/Main/{split}.txt")
    try:
        text = split_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeError) as error:
        raise DatasetError(split_file, f"cannot read the split file ({error})") from error
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        log.warning("%s: %d duplicate ids ignored", split_file, len(ids) - len(unique))
    return unique


def list_all_ids(root: str | Path) -> list[str]:
    """Sorted ids (file stems) of all images in ``JPEGImages/``, for datasets shipped without
    ``ImageSets`` so that the caller can draw its own seeded split."""
    images = resolve_voc_root(root) / "JPEGImages"
    stems = {p.stem for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    return sorted(stems)


def discover_voc_classes(root: str | Path, tally: ErrorTally) -> list[str]:
    """Sorted class names found in every XML of ``Annotations/``.

    Bad files raise under ``on_error="raise"``; under ``skip`` they are passed over without
    being counted here (they are counted when their split is read).
    """
    annotations = resolve_voc_root(root) / "Annotations"
    if not annotations.is_dir():
        return []
    scratch = ErrorTally(tally.on_error)
    names: set[str] = set()
    for xml_path in sorted(annotations.glob("*.xml")):
        root_element = _load_annotation(xml_path, scratch)
        if root_element is None:
            continue
        for obj in root_element.findall("object"):
            name = (obj.findtext("name") or "").strip()
            if name:
                names.add(name)
    return sorted(names)


def find_image(root: str | Path, image_id: str) -> Path:
    """``JPEGImages/<image_id>.<ext>`` for the first extension of :data:`IMAGE_EXTENSIONS`
    (lower or upper case) that exists; :class:`DatasetError` when there is none."""
    images = resolve_voc_root(root) / "JPEGImages"
    for extension in IMAGE_EXTENSIONS:
        for ext in (extension, extension.upper()):
            candidate = path_inside(images, image_id + ext)
            if candidate.is_file():
                return candidate
    raise DatasetError(
        images, f"no image for id {image_id!r} in {images} (tried {', '.join(IMAGE_EXTENSIONS)})"
    )


def _read_voc_item(
    voc: Path,
    image_id: str,
    class_index: Mapping[str, int],
    ignore: Collection[str],
    tally: ErrorTally,
    keep_difficult: bool,
) -> DetectionRecord | None:
    """The record of one id, or ``None`` when it was skipped."""
    try:
        xml_path = path_inside(voc / "Annotations", f"{image_id}.xml")
        path_inside(voc / "JPEGImages", image_id)
    except DatasetError as error:
        tally.report(error, reason=OUTSIDE_ROOT)
        return None
    try:
        image_path = find_image(voc, image_id)
    except DatasetError as error:
        tally.report(error, reason=MISSING_IMAGE)
        return None
    try:  # every image's header, so that an empty, non-image or bomb file is caught here
        width, height = image_size(image_path)
    except DatasetError as error:
        tally.report(error, reason=UNREADABLE_IMAGE)
        return None
    if xml_path.is_file():
        return parse_voc_xml(
            xml_path, class_index, image_path, tally, keep_difficult, ignore, (width, height)
        )
    return DetectionRecord(image_path, width=width, height=height)


def _load_annotation(xml_path: Path, tally: ErrorTally) -> Element | None:
    """The parsed ``<annotation>`` element, or ``None`` after reporting why it is unusable."""
    try:
        data = xml_path.read_bytes()
    except OSError as error:
        tally.report(DatasetError(xml_path, f"cannot read the annotation ({error})"), reason=UNPARSABLE)
        return None
    data = _strip_control_chars(data, tally)
    try:
        root = SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except (ParseError, ValueError, LookupError) as error:
        # ValueError covers defusedxml's DTDForbidden / EntitiesForbidden / ExternalReferenceForbidden;
        # LookupError an unknown encoding in the XML declaration.
        tally.report(DatasetError(xml_path, f"not parsable as XML ({error!r})"), reason=UNPARSABLE)
        return None
    if root.tag != "annotation":
        problem = f"root element is <{root.tag}>, not <annotation>: not a Pascal VOC annotation"
        tally.report(DatasetError(xml_path, problem), reason=UNPARSABLE)
        return None
    return root


def _strip_control_chars(data: bytes, tally: ErrorTally) -> bytes:
    """Remove the C0 control characters XML forbids (all but tab, LF, CR), counting them.

    Done on bytes, which is safe for UTF-8 and the other ASCII-compatible encodings
    (control bytes never occur inside their multi-byte sequences); UTF-16/32 files, marked
    by a byte-order mark, are left alone.
    """
    if data.startswith(_UTF16_32_BOMS):
        return data
    cleaned, n = _CONTROL_CHARS.subn(b"", data)
    tally.count(CONTROL_CHARS, n)
    return cleaned


def _declared_size(root: Element) -> tuple[int, int] | None:
    """``(width, height)`` from ``<size>``, or ``None`` when absent or unusable (``<depth>``
    is ignored: PVEL-AD declares 1 for 3-channel JPEGs)."""
    size = root.find("size")
    if size is None:
        return None
    width, height = _positive_int(size.findtext("width")), _positive_int(size.findtext("height"))
    if width is None or height is None:
        return None
    return width, height


def _positive_int(text: str | None) -> int | None:
    try:
        value = float(text) if text is not None else float("nan")
        number = int(value)
    except (ValueError, OverflowError):
        return None
    return number if number > 0 and number == value else None


def _parse_object(
    obj: Element,
    number: int,
    xml_path: Path,
    class_index: Mapping[str, int],
    ignore_classes: Collection[str],
    tally: ErrorTally,
) -> tuple[list[float], int, bool] | None:
    """``(0-based xyxy box, label, difficult)`` of one ``<object>``, or ``None`` if dropped."""
    name = (obj.findtext("name") or "").strip()
    if not name:
        tally.report(DatasetError(xml_path, f"object #{number} has no <name>"), reason=NO_NAME)
        return None
    if name in ignore_classes:
        tally.count(IGNORED_CLASS)
        return None
    if name not in class_index:
        known = ", ".join(class_index)
        problem = f"object #{number} has unknown class {name!r} (known classes: {known})"
        tally.report(DatasetError(xml_path, problem), reason=UNKNOWN_CLASS)
        return None
    bndbox = obj.find("bndbox")
    if bndbox is None:
        tally.report(DatasetError(xml_path, f"object #{number} ({name}) has no <bndbox>"), reason=NO_BNDBOX)
        return None
    texts = [bndbox.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
    try:
        xmin, ymin, xmax, ymax = (float(t) for t in texts)
    except (TypeError, ValueError):
        problem = f"object #{number} ({name}) has missing or non-numeric coordinates {texts}"
        tally.report(DatasetError(xml_path, problem), reason=BAD_COORDS)
        return None
    is_difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true", "yes")
    return [xmin - 1.0, ymin - 1.0, xmax, ymax], class_index[name], is_difficult


def _check_class_names(class_names: Sequence[str], known_classes: Sequence[str] | None) -> list[str]:
    """``class_names`` as a list, refused when it repeats a name or leaves the known vocabulary."""
    names = list(class_names)
    if len(set(names)) != len(names):
        raise ConfigError(f"class names repeat a name: {names}")
    if known_classes is not None:
        unknown = [n for n in names if n not in set(known_classes)]
        if unknown:
            raise ConfigError(f"classes {unknown} are not among the known classes {list(known_classes)}")
    return names


__all__ = [
    "IMAGE_EXTENSIONS",
    "discover_voc_classes",
    "find_image",
    "list_all_ids",
    "parse_voc_xml",
    "read_voc_ids",
    "read_voc_split",
    "resolve_voc_root",
]
