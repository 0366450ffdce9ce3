"""The detection dataset: one split's records as ``(image, target)`` pairs, and their collate.

Batch contract (what the detection LightningModules consume, DESIGN.md §1): a dataloader
yields ``(images, targets)``; ``images`` is a list of float32 ``3×H×W`` tensors in [0, 1],
**not** normalised (torchvision's ``GeneralizedRCNNTransform`` normalises, and resizes
again, inside the model); ``targets`` is a list of dicts with ``boxes`` float32 ``(N, 4)``
``x1, y1, x2, y2`` pixels of the returned image, ``labels`` int64 ``(N,)`` starting at 1,
``image_id`` an int64 scalar (the record's index in its split) and ``difficult`` bool ``(N,)``.
An image without defects has ``boxes`` of shape ``(0, 4)``.

Images are resized before they become tensors (:mod:`elinspect.data.box_transforms`); training
augmentation (box-aware flips through albumentations) is reseeded per sample from torch's
generator, as :mod:`elinspect.data.transforms` does, so seeded runs repeat.

Extra inputs (RDDN, ``rddn.txt`` §IV.A–B), switched on by
:meth:`~elinspect.data.detection.DetectionDataModule.request_inputs`
with the model's ``extra_inputs``; without a request the batch is exactly the one above.

* ``"template"``: every target also holds ``template``, the aligned defect-free reference image
  (float32 ``3×H×W`` in [0, 1]) read, resized and augmented with exactly the image's geometry
  (albumentations ``additional_targets``: the same flips). Only datasets that ship
  templates (``provides_templates``: Fabric) accept it. ``template_shift: [lo, hi]`` moves the
  template by a random integer offset of lo..hi stored-image pixels in x and y (random signs,
  border replicated) in every split: the paper's pixel-gap study (§V.B, 5–10 px). The offset
  of an image is fixed (seeded by ``split_seed``, the split and the image's position), so the
  shifted dataset is the same in every epoch and every run, as a shifted copy would be.
* ``"normal"``: training targets also hold ``normal``, a defect-free training image (a
  training record without boxes, taken before ``drop_empty_train``) resized to the sample's
  size and drawn per sample from a seed of torch's generator (the PTG's normal sample N, §IV.B).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from elinspect.data.box_transforms import Resize, random_shift, resize_to, resize_with_boxes, shift_image
from elinspect.data.errors import DatasetError
from elinspect.data.images import read_image, to_tensor_layout
from elinspect.data.records import DetectionRecord
from elinspect.data.transforms import sample_seed, seed_pipeline
from elinspect.utils.errors import ConfigError

Target = dict[str, torch.Tensor]


class DetectionDataset(Dataset):
    """The records of one split as ``(image, target)`` pairs following the batch contract.

    ``template``: add ``target["template"]`` (the record's aligned template, same geometry as
    the image; an ``augment`` pipeline must then have been built ``with_template``);
    ``template_shift``: ``(lo, hi)`` pixel offset of the template, drawn from
    ``default_rng([*shift_seed, index])`` (fixed per image); ``normals``: defect-free records of
    which one, drawn per sample from torch's generator, becomes ``target["normal"]``.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        image_size: int | None = None,
        resize: Resize = "longer",
        augment: A.Compose | None = None,
        template: bool = False,
        template_shift: Sequence[int] | None = None,
        shift_seed: Sequence[int] = (0,),
        normals: Sequence[DetectionRecord] = (),
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.template = template
        self.template_shift = check_template_shift(template_shift)
        self.shift_seed = [int(s) for s in shift_seed]
        self.normals = list(normals)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.records[index]
        image = read_image(record.image_path, grey=False)  # grey files come back as 3 channels
        template = self._template(record, index) if self.template else None
        image, boxes = resize_with_boxes(image, record.boxes, self.image_size, self.resize)
        if template is not None:
            template = resize_to(template, image.shape[1], image.shape[0])
        labels, difficult = record.labels, record.difficult
        if self.augment is not None:
            seed_pipeline(self.augment, sample_seed())
            extra = {} if template is None else {"template": template}
            out = self.augment(image=image, bboxes=boxes, labels=labels, difficult=difficult, **extra)
            image = out["image"]
            template = out.get("template")
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            difficult = np.asarray(out["difficult"], dtype=bool).reshape(-1)
        target = {
            "boxes": torch.as_tensor(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.as_tensor(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "difficult": torch.as_tensor(np.ascontiguousarray(difficult, dtype=bool)),
        }
        if template is not None:
            target["template"] = torch.from_numpy(to_tensor_layout(template, 3))
        if self.normals:
            target["normal"] = self._normal(image.shape[1], image.shape[0])
        return torch.from_numpy(to_tensor_layout(image, 3)), target

    def _template(self, record: DetectionRecord, index: int) -> np.ndarray:
        """The record's template at stored size, shifted when ``template_shift`` asks."""
        error = template_error(record)
        if error is not None:
            raise error
        template = read_image(record.template_path, grey=False)
        if self.template_shift is not None:
            rng = np.random.default_rng([*self.shift_seed, index])
            template = shift_image(template, *random_shift(rng, *self.template_shift))
        return template

    def _normal(self, width: int, height: int) -> torch.Tensor:
        """A defect-free image, drawn from a seed of torch's generator, at ``width``×``height``."""
        pick = int(np.random.default_rng(sample_seed()).integers(len(self.normals)))
        normal = read_image(self.normals[pick].image_path, grey=False)
        return torch.from_numpy(to_tensor_layout(resize_to(normal, width, height), 3))


def check_template_shift(template_shift: Sequence[int] | None) -> tuple[int, int] | None:
    """``(lo, hi)`` with ``0 <= lo <= hi`` integers, or ``None``."""
    if template_shift is None:
        return None
    values = list(template_shift)
    if len(values) != 2 or not all(float(v).is_integer() for v in values) or not 0 <= values[0] <= values[1]:
        raise ConfigError(f"data.template_shift must be [lo, hi] pixels with 0 <= lo <= hi, got {values}")
    return int(values[0]), int(values[1])


def template_error(record: DetectionRecord) -> DatasetError | None:
    """Why ``record`` cannot give a template (``None`` when its template file exists)."""
    if record.template_path is not None and Path(record.template_path).is_file():
        return None
    where = "" if record.template_path is None else f" ({record.template_path} does not exist)"
    return DatasetError(record.image_path, f"no aligned template for {record.image_path}{where}")


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Images and targets as two lists: detection images differ in size, so they are not stacked."""
    return [image for image, _ in batch], [target for _, target in batch]
