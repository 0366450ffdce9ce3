"""The report's figures, drawn offline from what a run leaves on disk (issue 8).

Curve data and figures are separate: :func:`roc_curve`, :func:`detection_pr_curve`,
:func:`classification_confusion` and :func:`training_history` compute what is drawn (and
are what the tests check); the ``*_figure`` functions draw it with matplotlib's object API
on an Agg canvas (no pyplot, no global backend switch, as
:func:`elinspect.metrics.detection.save_confusion_matrix` does), and :func:`save_figure`
writes a PNG.

**ROC** (image level): torchmetrics' ``binary_roc`` / ``binary_auroc`` on the scores of
``test/predictions.csv`` against ``target > 0``. Scores outside [0, 1] (anomaly distances)
are min-max scaled first (order kept), because torchmetrics would squash them with a
sigmoid, which ties large distances.

**PR curves of a detector** (from ``test/detections.jsonl``): per class, detections are
matched to the image's boxes of that class at IoU ≥ 0.5 (torchvision's ``box_iou``): in
order of decreasing score, each detection takes the unmatched, non-difficult box of highest
IoU (a true positive); a detection that matches none but lies on a difficult box of its
class is ignored, by the rule of the logged mAP (COCO's crowd regions: at least half of the
detection's area inside the box, :func:`~elinspect.utils.boxes.on_ignored_region`);
every other detection is a false positive. At most ``max_detections`` (100,
COCO's ``maxDets``) detections per image and class count. Precision and recall are taken
after each detection in order of decreasing score over all images. The AP shown beside a
curve is COCO's 101-point interpolated precision — the rule of the logged
``test/ap_50/<class>`` (:mod:`elinspect.metrics.detection`), so the two agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_auroc, binary_roc, multiclass_confusion_matrix
from torchvision.ops import box_iou

from elinspect.utils.boxes import on_ignored_region

MAX_LABEL_CHARS = 48


@dataclass(frozen=True)
class Curve:
    """One curve of a figure: ``x``/``y`` points, its ``label`` and its area (AUC or AP)."""

    x: np.ndarray
    y: np.ndarray
    label: str
    area: float


def short(label: str, limit: int = MAX_LABEL_CHARS) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


# ----------------------------------------------------------------------------- ROC
def unit_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as they are when inside [0, 1], else min-max scaled (order kept)."""
    scores = scores.double()
    if len(scores) and (scores.min() < 0 or scores.max() > 1):
        low, high = scores.min(), scores.max()
        scores = (scores - low) / (high - low).clamp_min(1e-12)
    return scores


def roc_curve(
    scores: Sequence[float] | np.ndarray, targets: Sequence[int] | np.ndarray, label: str = ""
) -> Curve | None:
    """False- and true-positive rates of "defective if score ≥ t" over all t, and the AUC;
    ``targets`` > 0 are positives. None when only one of the two classes is present."""
    target = torch.tensor(np.asarray(targets), dtype=torch.long) > 0
    if target.all() or not target.any():
        return None
    preds = unit_scores(torch.tensor(np.asarray(scores, dtype=np.float64)))
    fpr, tpr, _ = binary_roc(preds, target.long())
    auc = float(binary_auroc(preds, target.long()))
    return Curve(fpr.numpy(), tpr.numpy(), label, auc)


def predictions_roc(predictions: pd.DataFrame, label: str = "") -> Curve | None:
    """The ROC of a ``test/predictions.csv`` table (rows with a known target)."""
    known = predictions[predictions["target"] >= 0]
    return roc_curve(known["score"].to_numpy(), known["target"].to_numpy(), label)


# ------------------------------------------------------------------------ detection PR
def read_detections(path: str | Path) -> list[dict[str, Any]]:
    """The per-image records of a ``test/detections.jsonl`` (one JSON object per line)."""
    path = Path(path)
    records = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err})") from err
    return records


def _boxes(values: Iterable[Sequence[float]]) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.float64).reshape(-1, 4)


def match_class(
    record: Mapping[str, Any], label: int, iou_threshold: float = 0.5, max_detections: int = 100
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(scores, is_true_positive, number_of_boxes)`` of class ``label`` in one image record
    (ignored detections left out; see the module docstring for the matching rule)."""
    gt, det = record["gt"], record["detections"]
    gt_labels = torch.as_tensor(gt["labels"], dtype=torch.long)
    difficult = torch.as_tensor(gt.get("difficult") or [False] * len(gt_labels), dtype=torch.bool)
    of_class = gt_labels == label
    gt_boxes = _boxes(gt["boxes"])[of_class]
    difficult = difficult[of_class]
    det_labels = torch.as_tensor(det["labels"], dtype=torch.long)
    det_scores = torch.as_tensor(det["scores"], dtype=torch.float64)
    keep = det_labels == label
    scores = det_scores[keep]
    order = scores.argsort(descending=True, stable=True)[:max_detections]
    scores = scores[order]
    det_boxes = _boxes(det["boxes"])[keep][order]
    iou = box_iou(det_boxes, gt_boxes)  # (D, G)
    ignored = on_ignored_region(det_boxes, gt_boxes[difficult], iou_threshold)
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    kept_scores, positive = [], []
    for i in range(len(det_boxes)):
        candidates = iou[i].masked_fill(matched | difficult, -1.0)
        best = int(candidates.argmax()) if len(candidates) else -1
        if best >= 0 and candidates[best] >= iou_threshold:
            matched[best] = True
            kept_scores.append(float(scores[i]))
            positive.append(True)
        elif bool(ignored[i]):
            continue  # on a difficult box: neither right nor wrong
        else:
            kept_scores.append(float(scores[i]))
            positive.append(False)
    return (
        np.asarray(kept_scores, dtype=np.float64),
        np.asarray(positive, dtype=bool),
        int((~difficult).sum()),
    )


def coco_average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """COCO's AP: the precision envelope read at the 101 recall points 0, 0.01, …, 1, averaged."""
    if not len(precision):
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0.0, 1.0, 101)
    index = np.searchsorted(recall, points, side="left")
    found = index < len(envelope)
    values = np.zeros_like(points)
    values[found] = envelope[index[found]]
    return float(values.mean())


def detection_pr_curve(
    records: Sequence[Mapping[str, Any]],
    labels: Iterable[int] | None = None,
    label: str = "",
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> Curve | None:
    """Precision (``y``) against recall (``x``) after each detection, in order of decreasing score,
    of the classes ``labels`` (1-based; None: every class of the records, pooled) with COCO's AP
    as ``area``. None when those classes have no (non-difficult) box."""
    if labels is None:
        labels = sorted(
            {int(v) for r in records for v in r["gt"]["labels"]}
            | {int(v) for r in records for v in r["detections"]["labels"]}
        )
    scores, positive, total = [], [], 0
    for class_label in labels:
        for record in records:
            s, p, n = match_class(record, class_label, iou_threshold, max_detections)
            scores.append(s)
            positive.append(p)
            total += n
    if total == 0:
        return None
    scores_all = np.concatenate(scores) if scores else np.zeros(0)
    positive_all = np.concatenate(positive) if positive else np.zeros(0, dtype=bool)
    order = np.argsort(-scores_all, kind="stable")
    tp = np.cumsum(positive_all[order])
    fp = np.cumsum(~positive_all[order])
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / total
    return Curve(recall, precision, label, coco_average_precision(precision, recall))


def detection_pr_curves(
    records: Sequence[Mapping[str, Any]], class_names: Sequence[str], iou_threshold: float = 0.5
) -> list[Curve]:
    """One PR curve per class that has boxes (``class_names[i - 1]`` names label ``i``)."""
    curves = []
    for label, name in enumerate(class_names, start=1):
        curve = detection_pr_curve(records, [label], name, iou_threshold)
        if curve is not None:
            curves.append(curve)
    return curves


# ---------------------------------------------------------------------- confusion
def classification_confusion(predictions: pd.DataFrame, num_classes: int | None = None) -> np.ndarray:
    """Counts ``[true, predicted]`` of the rows of ``test/predictions.csv`` whose target and
    prediction are known (≥ 0), via torchmetrics' ``multiclass_confusion_matrix``."""
    known = predictions[(predictions["target"] >= 0) & (predictions["predicted"] >= 0)]
    target = torch.tensor(known["target"].to_numpy(), dtype=torch.long)
    predicted = torch.tensor(known["predicted"].to_numpy(), dtype=torch.long)
    if num_classes is None:
        num_classes = (
            int(
                max(
                    int(target.max()) if len(target) else 0,
                    int(predicted.max()) if len(predicted) else 0,
                )
            )
            + 1
        )
    num_classes = max(num_classes, 2)
    return multiclass_confusion_matrix(predicted, target, num_classes).numpy()


def read_confusion_csv(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Counts and class names of a detector's ``test/confusion_matrix.csv``."""
    frame = pd.read_csv(path, index_col=0)
    return frame.to_numpy(dtype=np.int64), [str(c) for c in frame.columns]


# -------------------------------------------------------------------- training curves
def training_history(metrics: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """From a ``csv/version_*/metrics.csv`` table: ``"loss"`` — ``step`` and every train/val loss
    column (per-step and per-epoch), and ``"val"`` — ``epoch`` and every validation metric that is
    not a loss, a threshold or a per-class value (``val/ap_50/crack``)."""
    out: dict[str, pd.DataFrame] = {}
    losses = [
        c
        for c in metrics.columns
        if str(c).startswith(("train/", "val/")) and str(c).split("/", 1)[1].startswith("loss")
    ]
    losses = [c for c in losses if str(c).count("/") == 1]
    if losses and "step" in metrics:
        out["loss"] = metrics[["step", *losses]]
    val = [
        c
        for c in metrics.columns
        if str(c).startswith("val/")
        and c not in losses
        and str(c).count("/") == 1
        and "threshold" not in str(c)
    ]
    if val and "epoch" in metrics:
        out["val"] = metrics[["epoch", *val]]
    return out


# ----------------------------------------------------------------------------- figures
def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=7)


def roc_figure(curves: Sequence[Curve], title: str = "ROC (image level)") -> Figure:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    for curve in curves:
        ax.plot(
            curve.x, curve.y, linewidth=1.5, label=f"{short(curve.label) or 'ROC'} (AUC {curve.area:.3f})"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    _legend(ax)
    fig.tight_layout()
    return fig


def pr_figure(curves: Sequence[Curve], title: str = "precision-recall (IoU 0.5)") -> Figure:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for curve in curves:
        # drawn from recall 0 at the first detection's precision, as a step per detection
        x, y = np.r_[0.0, curve.x], np.r_[curve.y[:1], curve.y] if len(curve.y) else np.zeros(1)
        ax.plot(
            x,
            y,
            drawstyle="steps-post",
            marker="o" if len(x) < 30 else None,
            markersize=3,
            linewidth=1.5,
            label=f"{short(curve.label) or 'PR'} (AP {curve.area:.3f})",
        )
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    _legend(ax)
    fig.tight_layout()
    return fig


def confusion_figure(counts: np.ndarray, names: Sequence[str], title: str = "confusion matrix") -> Figure:
    """Rows true, columns predicted; cells coloured by their share of the row, with share and count."""
    counts = np.asarray(counts, dtype=np.int64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.7 * len(names)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ax.set_xticks(range(len(names)), list(names), rotation=45, ha="right")
    ax.set_yticks(range(len(names)), list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j] > 0:
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    f"{100 * share[i, j]:.1f}%\n{counts[i, j]}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=colour,
                )
    fig.tight_layout()
    return fig


def training_curves_figure(history: Mapping[str, pd.DataFrame], title: str = "") -> Figure | None:
    """Losses against the step (left) and validation metrics against the epoch (right)."""
    if not history:
        return None
    panels = [k for k in ("loss", "val") if k in history]
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    for n, key in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), n)
        frame = history[key]
        x = frame.columns[0]
        for column in frame.columns[1:]:
            points = frame[[x, column]].dropna()
            if len(points):
                marker = "o" if len(points) < 30 else None
                ax.plot(points[x], points[column], marker=marker, markersize=3, linewidth=1.2, label=column)
        ax.set_xlabel(x)
        ax.set_title("losses" if key == "loss" else "validation metrics")
        ax.grid(alpha=0.3)
        _legend(ax)
    if title:
        fig.suptitle(short(title, 90), fontsize=9)
    fig.tight_layout()
    return fig


def metric_bars_figure(
    mean: pd.DataFrame, std: pd.DataFrame, counts: Sequence[int], labels: Sequence[str], title: str = ""
) -> Figure:
    """One panel per metric column of ``mean``: a bar per configuration (row), with ±1 std error
    bars where a configuration has several replicates (n in the tick label)."""
    metrics = list(mean.columns)
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2) * columns, 3.6 * rows))
    ticks = [f"{short(label, 28)}\n(n={n})" for label, n in zip(labels, counts, strict=True)]
    for k, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(rows, columns, k)
        values = mean[metric].to_numpy(dtype=float)
        errors = np.nan_to_num(std[metric].to_numpy(dtype=float), nan=0.0)
        logged = ~np.isnan(values)  # a configuration that does not log the metric gets no bar
        positions = np.arange(len(values))
        ax.bar(positions[logged], values[logged], yerr=errors[logged], capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(positions, ticks, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(short(title, 90), fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
