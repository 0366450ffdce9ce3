"""Predict with a checkpoint on image files (issue 8).

    python -m elinspect.predict ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt input=images/
    python -m elinspect.predict ckpt_path=... input='line3/**/*.jpg' output=out/line3 batch_size=16
    python -m elinspect.predict ckpt_path=<rddn.ckpt> input=fabric/ template.rule='template_*.jpg'

The checkpoint alone rebuilds the model and the test-time preprocessing of its datamodule
(:mod:`elinspect.inference`). ``output`` (a new or empty directory; ``overwrite=true`` writes
into a used one) receives:

* ``overlays/<input path>.png`` — the image at its own size with the prediction drawn on it:
  boxes with class and score (detectors, those with ``score >= score_threshold``), the
  anomaly map blended over the image (PaDiM, SeMaCNN, GAN-AE, autoencoder), the label and
  score as text (classifiers and the thresholded anomaly models);
* ``predictions.jsonl`` — one JSON object per predicted image: ``path``, ``model``, ``size``
  (width, height), ``overlay`` and either ``detections`` (every detection the model returns:
  ``box`` x1, y1, x2, y2 in the image's pixels, ``label``, ``class_name``, ``score``) or
  ``score``, ``label``, ``class_name``, ``threshold`` (see :func:`~elinspect.inference.to_record`);
* ``summary.csv`` — one row per input entry: ``path``, ``status`` (ok | skipped), ``reason``,
  ``detections`` (those with ``score >= score_threshold``), ``label``, ``class_name``, ``score``.

Unreadable or odd entries (empty, truncated or non-image files, directories, unknown
extensions, an image without its template) are reported, listed in ``summary.csv`` and
skipped (hidden files, and for a template model the templates themselves, are not inputs);
the run ends with one count line, e.g. ``7 images: 4 predicted, 3 skipped (…)``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.io import write_png

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.data.errors import DatasetError, ErrorTally
from elinspect.drawing import draw_detections, heatmap_overlay
from elinspect.inference import (
    ImageFiles,
    InputError,
    LoadedModel,
    PreparedImage,
    Skipped,
    TemplateFinder,
    image_loader,
    list_inputs,
    load_model,
    map_to_view,
    resolve_device,
    run_batch,
    to_record,
)
from elinspect.utils.checkpoint import read_checkpoint
from elinspect.utils.errors import ConfigError, user_errors
from elinspect.utils.library_warnings import silence_library_warnings
from elinspect.utils.outputs import OutputExistsError
from elinspect.utils.task import extras, print_config

log = logging.getLogger(__name__)
silence_library_warnings()

SUMMARY_FIELDS = ("path", "status", "reason", "detections", "label", "class_name", "score")


@dataclass
class PredictionSummary:
    """What a prediction run did: counts, the skip reasons and where the files are."""

    output: Path
    predicted: int = 0
    skipped: ErrorTally = field(default_factory=lambda: ErrorTally("skip"))

    @property
    def total(self) -> int:
        return self.predicted + self.skipped.total

    def line(self) -> str:
        """``N images: K predicted, M skipped (reasons)``."""
        reasons = f" ({self.skipped.summary()})" if self.skipped.total else ""
        return f"{self.total} images: {self.predicted} predicted, {self.skipped.total} skipped{reasons}"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an ``output`` that is a file, or a directory holding files unless ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} is a file; give a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            shown = ", ".join(sorted(p.name for p in output.iterdir())[:4])
            raise OutputExistsError(
                f"output {output} already holds the files of an earlier run ({shown}); choose a new "
                "output=DIR, or overwrite=true to write over them"
            )
        log.warning("overwrite=true: writing into %s, which already holds files", output)


def caption(record: dict[str, Any]) -> str | None:
    """The text drawn on an image-level prediction: label and score (and the threshold)."""
    if "score" not in record:
        return None
    score = record["score"]
    if record.get("threshold") is not None:
        relation = ">=" if score >= record["threshold"] else "<"
        return f"{record['class_name']}: score {score:.4g} {relation} {record['threshold']:.4g}"
    if record.get("class_name") is None:
        return f"score {score:.4g} (no threshold in the checkpoint)"
    return f"{record['class_name']} {score:.3f}"


def put_caption(picture: np.ndarray, text: str) -> np.ndarray:
    """``text`` in white on a dark band at the top left of an RGB uint8 picture (in place)."""
    height, width = picture.shape[:2]
    scale = max(0.3, min(width, height) / 500)
    thickness = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, th // 3)
    cv2.rectangle(picture, (0, 0), (min(width, tw + 2 * pad), th + base + 2 * pad), (0, 0, 0), -1)
    cv2.putText(picture, text, (pad, th + pad), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness)
    return picture


def draw_overlay(
    loaded: LoadedModel,
    view: np.ndarray,
    output: dict[str, torch.Tensor],
    record: dict[str, Any],
    score_threshold: float,
    vmax: float | None,
    alpha: float = 0.5,
) -> torch.Tensor:
    """The picture (RGB uint8 H×W×3) with the prediction drawn on it, as uint8 3×H×W."""
    height, width = view.shape[:2]
    image = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)
    if "detections" in record:
        detections = record["detections"]
        pred = {
            "boxes": torch.tensor([d["box"] for d in detections], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([d["label"] for d in detections], dtype=torch.int64),
            "scores": torch.tensor([d["score"] for d in detections], dtype=torch.float32),
        }
        return draw_detections(image, None, pred, loaded.class_names, score_threshold)
    if "anomaly_maps" in output:
        heat = map_to_view(output["anomaly_maps"], (width, height))
        scale = vmax if vmax is not None else float(heat.max())
        # heatmap_overlay puts the image beside its blend; the blend is the right half
        image = heatmap_overlay(image.float() / 255, heat, scale, alpha)[:, :, width:]
    text = caption(record)
    if text is None:
        return image
    picture = put_caption(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), text)
    return torch.from_numpy(picture).permute(2, 0, 1)


class OverlayNames:
    """``overlays/<path relative to the input>.png``, unique within a run."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.used: set[Path] = set()

    def __call__(self, path: Path) -> Path:
        rel = path.relative_to(self.base) if path.is_relative_to(self.base) else Path(path.name)
        name = Path("overlays") / rel.with_suffix(".png")
        if name in self.used:  # a.jpg and a.png in one directory
            name = Path("overlays") / rel.with_name(f"{rel.stem}_{rel.suffix.lstrip('.')}.png")
        self.used.add(name)
        return name


def summary_row(path: Path, record: dict[str, Any] | None, skipped: Skipped | None, threshold: float) -> dict:
    if skipped is not None:
        return {"path": str(path), "status": "skipped", "reason": skipped.reason}
    assert record is not None
    row: dict[str, Any] = {"path": str(path), "status": "ok", "reason": ""}
    if "detections" in record:
        row["detections"] = sum(1 for d in record["detections"] if d["score"] >= threshold)
    else:
        row.update({k: record.get(k) for k in ("label", "class_name", "score")})
    return row


def predict_images(
    ckpt_path: str | Path,
    input: str | Path,
    output: str | Path,
    *,
    batch_size: int = 8,
    device: str = "auto",
    score_threshold: float = 0.3,
    overwrite: bool = False,
    recursive: bool = False,
    overlays: bool = True,
    num_workers: int = 0,
    template_rule: str | None = None,
    template_csv: str | Path | None = None,
    console: Console | None = None,
) -> PredictionSummary:
    """Predict every image of ``input`` (a file, a directory or a glob) into ``output``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    console = console or Console()
    output = Path(output).expanduser()
    check_output(output, overwrite)
    files, listed_skips, base = list_inputs(str(input), recursive=recursive)
    loaded = load_model(ckpt_path, resolve_device(device))
    templates = None
    if loaded.needs_template:
        templates = TemplateFinder(template_rule, template_csv)
        images = [p for p in files if not templates.is_template(p, files)]
        if len(images) < len(files):
            log.info(
                "%d input file(s) are templates: references, not images to predict", len(files) - len(images)
            )
        if not images:
            raise InputError(f"input {input} holds templates only, no image to predict")
        files = images
    elif template_rule or template_csv:
        log.info("model %s takes no template: template.rule / template.csv are ignored", loaded.name)
    output.mkdir(parents=True, exist_ok=True)

    writer = PredictionWriter(loaded, output, base, score_threshold, overlays)
    for item in listed_skips:
        writer.skip(item)
    loader = image_loader(ImageFiles(files, loaded.preprocessing, templates), batch_size, num_workers)
    columns = (TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with writer, Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("predict", total=len(files))
        for batch in loader:
            ready = [item for item in batch if isinstance(item, PreparedImage)]
            for item in batch:
                if isinstance(item, Skipped):
                    writer.skip(item)
            for item, out in zip(ready, run_batch(loaded, ready) if ready else [], strict=True):
                writer.write(item, out)
            progress.advance(task, len(batch))
    console.print(writer.summary.line())
    console.print(f"outputs: {output}")
    return writer.summary


class PredictionWriter:
    """Writes a run's outputs as images are predicted or skipped: overlays and JSON lines at
    once, ``summary.csv`` (sorted by path) when the run closes (``with writer: ...``)."""

    def __init__(
        self, loaded: LoadedModel, output: Path, base: Path, score_threshold: float, overlays: bool
    ) -> None:
        self.loaded, self.output = loaded, output
        self.score_threshold, self.overlays = score_threshold, overlays
        self.names = OverlayNames(base)
        self.vmax = loaded.module.heatmap_top()
        self.summary = PredictionSummary(output)
        self.rows: dict[Path, dict[str, Any]] = {}
        self.jsonl = (output / "predictions.jsonl").open("w", encoding="utf-8")

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.jsonl.close()
        write_summary(self.output / "summary.csv", [self.rows[p] for p in sorted(self.rows)])

    def skip(self, item: Skipped) -> None:
        """Report the entry (logged, counted by kind) and give it its summary row."""
        self.summary.skipped.report(DatasetError(item.path, item.reason), item.kind)
        self.rows[item.path] = summary_row(item.path, None, item, self.score_threshold)

    def write(self, item: PreparedImage, out: dict[str, torch.Tensor]) -> None:
        """One predicted image: its overlay, its JSON line and its summary row."""
        height, width = item.view.shape[:2]
        input_size = (int(item.tensor.shape[-1]), int(item.tensor.shape[-2]))
        record = to_record(self.loaded, out, (width, height), input_size)
        head: dict[str, Any] = {"path": str(item.path), "model": self.loaded.name, "size": [width, height]}
        if self.overlays:
            name = self.names(item.path)
            picture = draw_overlay(self.loaded, item.view, out, record, self.score_threshold, self.vmax)
            (self.output / name).parent.mkdir(parents=True, exist_ok=True)
            write_png(picture, str(self.output / name))
            head["overlay"] = name.as_posix()
        if "detections" in record:
            head["score_threshold"] = self.score_threshold
        self.jsonl.write(json.dumps({**head, **record}) + "\n")
        self.rows[item.path] = summary_row(item.path, record, None, self.score_threshold)
        self.summary.predicted += 1


def write_summary(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in SUMMARY_FIELDS})


def predict(cfg: DictConfig) -> PredictionSummary:
    """:func:`predict_images` with the options of ``conf/predict.yaml``."""
    template = cfg.get("template") or {}
    return predict_images(
        cfg.ckpt_path,
        cfg.input,
        cfg.output,
        batch_size=int(cfg.batch_size),
        device=str(cfg.device),
        score_threshold=float(cfg.score_threshold),
        overwrite=bool(cfg.overwrite),
        recursive=bool(cfg.recursive),
        overlays=bool(cfg.overlays),
        num_workers=int(cfg.num_workers),
        template_rule=template.get("rule"),
        template_csv=template.get("csv"),
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict.yaml")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        extras(cfg)
        read_checkpoint(cfg.ckpt_path, mmap=True)  # a missing or unreadable file: reported before the tree
        print_config(cfg)
        predict(cfg)


if __name__ == "__main__":
    main()
