"""Readers that turn detection annotations on disk into :class:`~elinspect.data.records.DetectionRecord`."""

from elinspect.data.readers.boxes import image_size, path_inside, sanitize_boxes
from elinspect.data.readers.coco import read_coco, records_to_coco, write_coco
from elinspect.data.readers.voc import (
    IMAGE_EXTENSIONS,
    discover_voc_classes,
    find_image,
    list_all_ids,
    parse_voc_xml,
    read_voc_ids,
    read_voc_split,
    resolve_voc_root,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "discover_voc_classes",
    "find_image",
    "image_size",
    "list_all_ids",
    "parse_voc_xml",
    "path_inside",
    "read_coco",
    "read_voc_ids",
    "read_voc_split",
    "records_to_coco",
    "resolve_voc_root",
    "sanitize_boxes",
    "write_coco",
]
