"""Detection metrics: COCO-style mAP with per-class AP@0.5 and recall, and a confusion matrix with background.

Batches follow the detection contract (DESIGN §3, the detection datamodules): predictions
are torchvision's ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}``; targets are
``{"boxes", "labels" (1-based, 0 = background), "difficult" (N,) bool, ...}``.

**mAP** (:class:`DetectionMetrics`) is torchmetrics' ``MeanAveragePrecision`` on the
``faster_coco_eval`` backend. The EBBA paper (DESIGN §2) reports AP@0.5 per class, mAP@0.5
and recall; torchmetrics' ``class_metrics`` gives per-class AP averaged over IoU 0.5:0.95
and per-class recall averaged over the same thresholds, so a second metric restricted to
``iou_thresholds=[0.5]`` supplies the per-class AP@0.5 and recall@0.5. Points to know when
comparing with numbers from VOC tools (mmdetection's ``eval_map``, the VOC devkit):

- AP is COCO's 101-point interpolated precision, not VOC2007's 11-point nor VOC2010's
  area under the curve (one of two boxes found at precision 1: COCO 0.505, VOC2010 0.5);
- at most 100 detections per image *and class* are scored (COCO's ``maxDets``: its
  evaluation runs per image and category), however many the model returns: ``mar_100`` is
  the recall of those;
- ``difficult`` boxes are passed as ``iscrowd`` (VOC convention: neither a miss nor a
  match; faster_coco_eval honours ``iscrowd``, tested). COCO matches a detection to a crowd
  region by intersection over the *detection's* area, not IoU, so a small detection lying
  inside a large difficult box is ignored, where VOC would count it as a false positive.

**Confusion matrix** (:class:`DetectionConfusionMatrix`, the EBBA paper's Fig. 12): rows are
the true class, columns the predicted class, both with a last ``background`` entry: row
``background`` counts false positives (a detection matching no box), column ``background``
counts misses (a box no detection matched).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from elinspect.metrics.repeats import counted_once
from elinspect.plots import confusion_figure, save_figure
from elinspect.utils.boxes import on_ignored_region

BACKGROUND = "background"


@contextmanager
def quiet_coco_eval() -> Iterator[None]:
    """Silence faster_coco_eval's summary tables: it logs them at INFO (torchmetrics only redirects
    stdout), one table per metric and class, which would flood the run's log every epoch."""
    logger = logging.getLogger("faster_coco_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def metric_targets(targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Targets as ``MeanAveragePrecision`` takes them: ``difficult`` boxes become ``iscrowd`` (ignored)."""
    out = []
    for t in targets:
        difficult = t.get("difficult")
        if difficult is None:
            difficult = torch.zeros_like(t["labels"], dtype=torch.bool)
        out.append({"boxes": t["boxes"], "labels": t["labels"], "iscrowd": difficult.to(torch.int64)})
    return out


def metric_preds(preds: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    return [{"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for p in preds]


def image_ids(targets: Sequence[dict[str, Tensor]]) -> list[int]:
    """Each target's ``image_id`` (its index in the split), -1 where it has none."""
    return [int(t["image_id"]) if t.get("image_id") is not None else -1 for t in targets]


class GathersImageLists(Metric):
    """A metric whose states are lists with one entry per image, gathered over the ranks as
    whole lists.

    torchmetrics gathers a list state without a reduction one entry at a time, one collective
    per image; ranks holding different numbers of images (the evaluation loaders deal a split
    without repeats, :mod:`elinspect.data.sharding`) would then pair different images' tensors,
    or abort or hang. Here each rank's lists travel together as one object (on the CPU) and come
    back concatenated in rank order; the entries of one image stay aligned across the states.
    Every entry must be a tensor (``iou_type="bbox"``; segm's mask states hold tuples).
    """

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any | None = None) -> None:
        group = process_group or self.process_group
        names = list(self._defaults)
        if not all(isinstance(self._defaults[name], list) for name in names):
            raise TypeError(f"{type(self).__name__}: every state must be a per-image list")
        local = {name: [t.detach().cpu() for t in getattr(self, name)] for name in names}
        gathered: list[dict[str, list[Tensor]] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        for name in names:
            setattr(self, name, [t.to(self.device) for part in gathered for t in part[name]])


class MeanAPOncePerImage(GathersImageLists, MeanAveragePrecision):
    """torchmetrics' ``MeanAveragePrecision`` that scores each ``image_id`` once: the images a
    DDP sampler repeats (:mod:`elinspect.metrics.repeats`) are dropped after the states are
    gathered. Every per-image state is a list with one entry per image, gathered alike
    (:class:`GathersImageLists`: ranks may hold different numbers of images)."""

    image_ids: list[Tensor]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("image_ids", default=[], dist_reduce_fx=None)

    def update(
        self, preds: list[dict[str, Tensor]], target: list[dict[str, Tensor]], ids: Sequence[int]
    ) -> None:
        super().update(preds, target)
        self.image_ids.extend(torch.tensor(i, dtype=torch.int64, device=self.device) for i in ids)

    def compute(self) -> dict[str, Tensor]:
        if self.image_ids:
            keep = counted_once(torch.stack(self.image_ids)).tolist()
            if not all(keep):
                for name, default in self._defaults.items():
                    values = getattr(self, name)
                    if isinstance(default, list) and len(values) == len(keep):
                        setattr(self, name, [v for v, kept in zip(values, keep, strict=True) if kept])
        return super().compute()


def _mean_ap(**kwargs) -> MeanAPOncePerImage:
    metric = MeanAPOncePerImage(
        box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", class_metrics=True, **kwargs
    )
    # a detector may return more boxes per image than COCO's 100 (the EBBA setting keeps
    # 1000); only the 100 best of each image and class are scored, as documented above
    metric.warn_on_many_detections = False
    return metric


class DetectionMetrics(nn.Module):
    """mAP@0.5 (headline), mAP@0.5:0.95, recall and per-class AP / recall under class names.

    :meth:`compute` returns (keys without the split prefix)

    - ``map_50``, ``map``, ``mar_100``: over all classes; ``mar_100`` is COCO's recall averaged
      over IoU 0.5:0.95 (up to 100 detections), lower than the recall at IoU 0.5 that VOC tools
      and the EBBA paper report (``recall/<class>`` is at 0.5);
    - ``ap_50/<class>``, ``recall/<class>``: AP and recall at IoU 0.5 (100 detections per image
      and class);
    - ``ap/<class>``: AP averaged over IoU 0.5:0.95.

    A class without any (non-difficult) ground-truth box in the evaluated data has no AP
    (COCO reports -1); its per-class entries are left out. ``class_names[i - 1]`` names label ``i``.
    Each ``image_id`` counts once (a DDP sampler's repeats are dropped).
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.coco = _mean_ap()
        self.iou50 = _mean_ap(iou_thresholds=[0.5])

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        ids = image_ids(targets)
        preds, targets = metric_preds(preds), metric_targets(targets)
        self.coco.update(preds, targets, ids)
        self.iou50.update(preds, targets, ids)

    @property
    def updated(self) -> bool:
        return self.coco.update_called

    def compute(self) -> dict[str, Tensor]:
        with quiet_coco_eval():
            coco = self.coco.compute()
            iou50 = self.iou50.compute()
        out = {"map_50": coco["map_50"], "map": coco["map"], "mar_100": coco["mar_100"]}
        per_class = {
            "ap": (coco["classes"], coco["map_per_class"]),
            "ap_50": (iou50["classes"], iou50["map_per_class"]),
            "recall": (iou50["classes"], iou50["mar_100_per_class"]),
        }
        for name, (labels, values) in per_class.items():
            for label, value in zip(labels.reshape(-1).tolist(), values.reshape(-1), strict=True):
                if value >= 0 and 1 <= label <= len(self.class_names):
                    out[f"{name}/{self.class_names[label - 1]}"] = value
        return out

    def reset(self) -> None:
        self.coco.reset()
        self.iou50.reset()


def confusion_counts(
    pred: dict[str, Tensor],
    target: dict[str, Tensor],
    num_classes: int,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> Tensor:
    """The ``(C + 1) × (C + 1)`` confusion counts of one image (index ``C`` = background).

    Greedy matching, class-agnostic so that confusions between classes show: detections
    with ``score >= score_threshold`` are taken in order of decreasing score; each is matched
    to the still unmatched, non-difficult box of highest IoU if that IoU is ``>= iou_threshold``
    (count at [true class, predicted class]); failing that, a detection lying on a difficult
    box is dropped, as the mAP drops it (:func:`~elinspect.utils.boxes.on_ignored_region`: at least ``iou_threshold``
    of its area inside); any other detection is a false positive (row background). Boxes left
    unmatched are misses (column background); difficult boxes are never counted.
    """
    counts = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64)
    bg = num_classes
    keep = pred["scores"] >= score_threshold
    order = pred["scores"][keep].argsort(descending=True)
    p_boxes = pred["boxes"][keep][order].float().cpu()
    p_labels = pred["labels"][keep][order].cpu() - 1
    t_boxes = target["boxes"].float().cpu()
    t_labels = target["labels"].cpu() - 1
    difficult = target.get("difficult")
    difficult = torch.zeros(len(t_labels), dtype=torch.bool) if difficult is None else difficult.cpu().bool()
    iou = box_iou(p_boxes, t_boxes)  # (P, T)
    ignored = on_ignored_region(p_boxes, t_boxes[difficult], iou_threshold)
    matched = torch.zeros(len(t_labels), dtype=torch.bool)
    for i, p_label in enumerate(p_labels.tolist()):
        candidates = iou[i].masked_fill(matched | difficult, -1.0)
        best = int(candidates.argmax()) if len(candidates) else -1
        if best >= 0 and candidates[best] >= iou_threshold:
            matched[best] = True
            counts[t_labels[best], p_label] += 1
        elif bool(ignored[i]):
            continue
        else:
            counts[bg, p_label] += 1
    for t_label in t_labels[~matched & ~difficult].tolist():
        counts[t_label, bg] += 1
    return counts


class DetectionConfusionMatrix(GathersImageLists):
    """Confusion counts at IoU ``iou_threshold`` summed over images (see :func:`confusion_counts`),
    each ``image_id`` once (a DDP sampler's repeats are dropped).

    ``compute()`` returns the ``(C + 1) × (C + 1)`` int64 matrix: rows true class, columns
    predicted class, last row / column background.
    """

    full_state_update = False
    image_counts: list[Tensor]
    image_ids: list[Tensor]

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, score_threshold: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold
        # one entry per image, gathered over ranks alike, so that repeats can be dropped
        self.add_state("image_counts", default=[], dist_reduce_fx=None)
        self.add_state("image_ids", default=[], dist_reduce_fx=None)

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        for pred, target, image_id in zip(preds, targets, image_ids(targets), strict=True):
            counts = confusion_counts(
                pred, target, self.num_classes, self.iou_threshold, self.score_threshold
            )
            self.image_counts.append(counts.to(self.device))
            self.image_ids.append(torch.tensor(image_id, dtype=torch.int64, device=self.device))

    def compute(self) -> Tensor:
        size = self.num_classes + 1
        if not self.image_counts:
            return torch.zeros(size, size, dtype=torch.int64, device=self.device)
        keep = counted_once(torch.stack(self.image_ids))
        return torch.stack(self.image_counts)[keep].sum(dim=0)


def save_confusion_matrix(
    matrix: Tensor, class_names: Sequence[str], directory: str | Path, title: str = ""
) -> tuple[Path, Path]:
    """Write ``confusion_matrix.csv`` (counts) and ``confusion_matrix.png`` (row percentages and counts).

    The PNG shows each row normalised to 100 % as the EBBA paper's Fig. 12 does ("8.9 % of
    star crack defects are misclassified as crack"); the background row holds false
    positives, so it is normalised over the false positives. Drawn with matplotlib's
    object API (Agg canvas), without pyplot or a global backend switch.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [*class_names, BACKGROUND]
    counts = matrix.detach().cpu().to(torch.int64)
    csv_path = directory / "confusion_matrix.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, counts.tolist(), strict=True):
            writer.writerow([name, *row])

    figure = confusion_figure(counts.numpy(), names, title or "confusion matrix (IoU 0.5)")
    png_path = save_figure(figure, directory / "confusion_matrix.png", dpi=120)
    return csv_path, png_path
