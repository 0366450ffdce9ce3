"""A trained model from its checkpoint alone, run on image files (issue 8; shared by
:mod:`elinspect.predict` and :mod:`elinspect.export`).

* **Loading** (:func:`load_model`): the checkpoint is read with ``torch.load(weights_only=True)``
  — a file that would unpickle Python objects is refused, never run. The model is rebuilt from
  what :class:`~elinspect.models.base.ElinspectModule` stores in every checkpoint (its class
  and the run's resolved model/data/loss config) and the module's saved ``dataset`` facts
  (classes, channels, class counts), then the weights are loaded with ``strict=True``. No
  dataset is read, and pretrained ``weights`` named in the config are not fetched: every
  tensor comes from the checkpoint.
* **Preprocessing** (:class:`Preprocessing`): what the checkpoint's datamodule does to a
  *test* image — decoding grey or colour, the optional cell cut-out, the resize, the channel
  layout — read off its stored data config (:func:`preprocessing_from_config`). Normalisation
  is part of every model (the backbone weights' own statistics inside the classifier, PaDiM
  and torchvision's detection transform), so inputs are in [0, 1] as the datamodules serve them.
* **Running** (:func:`run_batch`): a batch in the datamodule's own format goes to the module's
  ``predict_step`` — ``{"image": N×C×H×W}`` for image-level models, ``(images, targets)`` for
  detectors (with ``targets[i]["template"]`` for a model whose ``extra_inputs`` holds
  ``"template"``, RDDN) — and its outputs become one JSON-able record per image
  (:func:`to_record`).
"""

from __future__ import annotations

import csv
import glob
import inspect
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.data.box_transforms import resize_with_boxes
from elinspect.data.cell_crop import cut_out_cell
from elinspect.data.errors import DatasetError
from elinspect.data.folder import IMAGE_EXTENSIONS
from elinspect.data.images import read_image, to_tensor_layout
from elinspect.data.info import DatasetInfo
from elinspect.data.transforms import resize
from elinspect.models.base import CHECKPOINT_KEY, ElinspectModule
from elinspect.models.build import build_model, effective_loss_config
from elinspect.utils.checkpoint import CheckpointError, describe_foreign, read_checkpoint
from elinspect.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "ImageFiles",
    "InputError",
    "LoadedModel",
    "Preprocessing",
    "PreparedImage",
    "Skipped",
    "TemplateFinder",
    "image_loader",
    "list_inputs",
    "load_model",
    "map_to_view",
    "preprocessing_from_config",
    "resolve_device",
    "run_batch",
    "to_record",
]


class InputError(UserError, ValueError):
    """The input of a prediction run names nothing usable (no such path, no image in it)."""


# ------------------------------------------------------------------------ checkpoints
def strip_pretrained_weights(node: Any) -> Any:
    """``node`` with every ``weights`` entry set to None: the checkpoint holds every tensor, so
    no pretrained file is read and nothing is downloaded."""
    if isinstance(node, Mapping):
        return {k: (None if k == "weights" else strip_pretrained_weights(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [strip_pretrained_weights(v) for v in node]
    return node


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device={device!r} is not a device (auto, cpu, cuda, cuda:N): {error}") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but no CUDA device is available (device=auto or cpu)")
    return chosen


# ---------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How the checkpoint's datamodule turns a test image file into the model's input.

    ``grey``: decoded as grey (then repeated to ``channels``) or as RGB; ``image_size`` and
    ``resize``: ``square`` (``image_size``²) or ``longer`` (longer side = ``image_size``,
    aspect kept), ``None`` keeps the stored size; ``cell_crop``: the arguments of
    :func:`~elinspect.data.cell_crop.cut_out_cell`, applied before the resize; ``stack``:
    whether a batch is one N×C×H×W tensor (image-level models) or a list (detectors).
    """

    datamodule: str
    grey: bool
    channels: int
    image_size: int | None
    resize: str = "square"
    cell_crop: dict[str, int] | None = None
    stack: bool = True

    def __call__(self, path: Path, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(input float32 C×H×W in [0, 1], view)`` of an image decoded as RGB uint8; ``view``
        is the RGB picture the input was made from (the cut-out cell with ``cell_crop``)."""
        image = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if self.grey else rgb
        view = rgb
        if self.cell_crop is not None:
            try:
                image, _ = cut_out_cell(image, None, **self.cell_crop)
            except ValueError as error:
                raise DatasetError(path, f"data.cell_crop found no cell: {error}") from error
            view = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
        if self.image_size is not None:
            if self.stack:
                image = resize(image, self.image_size)
            else:
                image, _ = resize_with_boxes(
                    image, np.zeros((0, 4), np.float32), self.image_size, self.resize
                )
        return to_tensor_layout(image, self.channels), view

    def describe(self) -> dict[str, Any]:
        """What a deployer needs to prepare inputs (for export sidecars)."""
        return {
            "datamodule": self.datamodule,
            "decode": "grey" if self.grey else "rgb",
            "channels": self.channels,
            "image_size": self.image_size,
            "resize": self.resize if self.image_size is not None else None,
            "cell_crop": self.cell_crop,
            "value_range": [0.0, 1.0],
        }


def _with_defaults(cls: type, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The datamodule's constructor defaults overlaid by the stored config."""
    params = inspect.signature(cls.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in stored.items() if k != "_target_"}}


def preprocessing_from_config(data_cfg: Mapping[str, Any]) -> Preprocessing:
    """The test-time preprocessing of the datamodule ``data_cfg`` configures (a stored config):
    what the datamodule class's ``eval_preprocessing`` says of its test dataset (for the
    detection datamodules, boxes are mapped back to the stored image's pixels by the caller)."""
    target = data_cfg.get("_target_")
    try:
        cls = hydra.utils.get_class(target)
    except Exception as err:
        raise CheckpointError(f"the checkpoint's datamodule {target!r} cannot be imported: {err}") from err
    describe = getattr(cls, "eval_preprocessing", None)
    if describe is None:
        raise CheckpointError(
            f"the checkpoint's datamodule {target} does not say how it prepares a test image "
            "(a classmethod eval_preprocessing(hparams) -> the fields of Preprocessing)"
        )
    return Preprocessing(target, **describe(_with_defaults(cls, data_cfg)))


# ---------------------------------------------------------------------------- models
def scalar_or_none(value: Any) -> float | None:
    """A scalar tensor as a float when it is set (finite), else ``None``."""
    if not torch.is_tensor(value) or value.numel() != 1:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass
class LoadedModel:
    """A module rebuilt from a checkpoint, in eval mode, with what is needed to feed it."""

    module: ElinspectModule
    name: str  # the config choice (classifier, padim, faster_rcnn, ...) or the class name
    model_class: str
    task: str
    info: DatasetInfo
    preprocessing: Preprocessing
    ckpt_path: Path
    config: dict[str, Any]
    device: torch.device
    extra_inputs: frozenset[str] = field(default_factory=frozenset)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def needs_template(self) -> bool:
        return "template" in self.extra_inputs

    def buffer(self, name: str) -> float | None:
        """A scalar buffer of the module (``threshold``, ``pixel_threshold``, …) when set (finite)."""
        return scalar_or_none(getattr(self.module, name, None))

    @property
    def threshold(self) -> float | None:
        """The decision threshold on the image score (PaDiM, GAN-AE, autoencoder), when set."""
        return self.buffer("threshold")


def load_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the checkpoint's module with its weights, in eval mode on ``device``."""
    path = Path(str(ckpt_path)).expanduser()
    ckpt = read_checkpoint(path)
    if CHECKPOINT_KEY not in ckpt:
        raise CheckpointError(
            f"{path} is not an elinspect checkpoint (it has no {CHECKPOINT_KEY!r} entry naming the model "
            f"and its config): it is {describe_foreign(ckpt)}. elinspect checkpoints are written by "
            "`python -m elinspect.train` into <run>/checkpoints/."
        )
    meta = ckpt[CHECKPOINT_KEY] or {}
    model_class = str(meta.get("model_class", "?"))
    stored = meta.get("config")
    if not stored or "model" not in stored or "data" not in stored:
        raise CheckpointError(
            f"{path} is a checkpoint of {model_class} without the run's stored config; it was not written by "
            "`python -m elinspect.train`, so the model cannot be rebuilt from the checkpoint alone"
        )
    name = (stored.get("choices") or {}).get("model") or model_class.rsplit(".", 1)[-1]
    try:
        hydra.utils.get_class(stored["model"]["_target_"])
    except Exception as err:
        raise CheckpointError(
            f"{path} belongs to model {name} ({model_class}), which this elinspect cannot import: {err}"
        ) from err
    dataset = (ckpt.get("hyper_parameters") or {}).get("dataset")
    if dataset is None:
        raise CheckpointError(f"{path} ({name}) holds no saved dataset facts (hyper_parameters.dataset)")
    info = DatasetInfo.from_dict(dataset)
    cfg = OmegaConf.create({"model": strip_pretrained_weights(stored["model"]), "loss": stored.get("loss")})
    module = build_model(cfg.model, effective_loss_config(cfg), info)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {path} do not fit model {name} as its stored config builds it: {err}"
        ) from err
    module.on_load_checkpoint(ckpt)
    chosen = torch.device(device) if not isinstance(device, torch.device) else device
    module.eval().to(chosen)
    return LoadedModel(
        module=module,
        name=str(name),
        model_class=model_class,
        task=str(meta.get("task", getattr(module, "task", "?"))),
        info=info,
        preprocessing=preprocessing_from_config(stored["data"]),
        ckpt_path=path,
        config=stored,
        device=chosen,
        extra_inputs=frozenset(getattr(module, "extra_inputs", ()) or ()),
    )


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Skipped:
    """An input that was not predicted: ``reason`` is the full message, ``kind`` its category."""

    path: Path
    kind: str
    reason: str


def _glob_base(pattern: str) -> Path:
    """The directory part of ``pattern`` before its first wildcard."""
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def list_inputs(spec: str, recursive: bool = False) -> tuple[list[Path], list[Skipped], Path]:
    """``(image files, skipped entries, base directory)`` of a file, a directory or a glob.

    A directory's files are taken in sorted order (its sub-directories too with ``recursive``;
    without it each sub-directory is reported as skipped); files whose extension is not an
    image's are reported as skipped, hidden entries ignored. Raises :class:`InputError` when
    ``spec`` names nothing, or nothing with an image extension.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        entries, base = [path], path.parent
    elif path.is_dir():
        base = path
        found = path.rglob("*") if recursive else path.iterdir()
        entries = sorted(p for p in found if not (recursive and p.is_dir()))
        if not entries:
            raise InputError(f"input directory {path} is empty: there is no image to predict")
    elif glob.has_magic(spec):
        base = _glob_base(spec)
        entries = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True))
        if not entries:
            raise InputError(f"input pattern {spec!r} matches no file")
    else:
        raise InputError(f"input {path} does not exist (give an image file, a directory or a glob pattern)")

    files: list[Path] = []
    skipped: list[Skipped] = []
    for entry in entries:
        rel = entry.relative_to(base) if entry.is_relative_to(base) else Path(entry.name)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden, as the datamodules ignore them (.DS_Store, .git/)
        if entry.is_dir():
            hint = "" if recursive else " (recursive=true searches sub-directories)"
            skipped.append(Skipped(entry, "directory", f"a directory, not an image{hint}"))
        elif entry.suffix.lower() not in IMAGE_EXTENSIONS:
            kind = "unknown extension"
            skipped.append(
                Skipped(
                    entry,
                    kind,
                    f"not an image file name: {entry.suffix or 'no extension'} is not one of "
                    f"{' '.join(sorted(IMAGE_EXTENSIONS))}",
                )
            )
        else:
            files.append(entry)
    if not files:
        shown = ", ".join(s.path.name for s in skipped[:5])
        raise InputError(
            f"input {spec} holds no image (files named {' '.join(sorted(IMAGE_EXTENSIONS))}); "
            f"found {len(skipped)} other entr{'y' if len(skipped) == 1 else 'ies'}: {shown}"
        )
    return files, skipped, base


class TemplateFinder:
    """The aligned template of each image, for models that take one (RDDN's template reference).

    ``rule`` is a glob matched in the image's directory (Tianchi Fabric ships
    ``<stem>/<stem>.jpg`` beside ``<stem>/template_<stem>.jpg``: ``template_*.jpg``), or a
    format string with ``{stem}``, ``{suffix}``, ``{name}`` (``{stem}_template{suffix}``),
    relative to the image's directory; ``csv`` is a file with columns ``image,template``
    (relative paths are relative to the CSV's directory).
    """

    def __init__(self, rule: str | None = None, csv_path: str | Path | None = None) -> None:
        if (rule is None) == (csv_path is None):
            raise ConfigError(
                "this model takes an aligned template beside every image: set exactly one of "
                "template.rule (a glob in the image's directory such as 'template_*.jpg', Tianchi Fabric's "
                "layout, or a format such as '{stem}_template{suffix}') and template.csv (columns image,template)"
            )
        self.rule = rule
        self.table: dict[Path, Path] | None = None
        if csv_path is not None:
            self.table = self._read_csv(Path(csv_path).expanduser())

    @staticmethod
    def _read_csv(path: Path) -> dict[Path, Path]:
        if not path.is_file():
            raise InputError(f"template.csv {path} does not exist")
        table: dict[Path, Path] = {}
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "template"} <= set(reader.fieldnames):
                raise InputError(f"template.csv {path} needs the header columns image,template")
            for lineno, row in enumerate(reader, start=2):
                if not row.get("image") or not row.get("template"):
                    raise InputError(f"{path}:{lineno}: a row needs both an image and a template")
                image, template = (Path(row[k]).expanduser() for k in ("image", "template"))
                table[(path.parent / image).resolve()] = (path.parent / template).resolve()
        return table

    def find(self, image: Path) -> Path:
        """The template of ``image``; :class:`DatasetError` naming the image when there is none."""
        if self.table is not None:
            template = self.table.get(image.resolve())
            if template is None:
                raise DatasetError(image, "no template: the image is not listed in template.csv")
        elif "{" in str(self.rule):
            template = image.parent / str(self.rule).format(
                stem=image.stem, suffix=image.suffix, name=image.name
            )
        else:
            matches = sorted(p for p in image.parent.glob(str(self.rule)) if p != image and p.is_file())
            if len(matches) > 1:
                shown = ", ".join(p.name for p in matches[:3])
                raise DatasetError(image, f"no single template: template.rule {self.rule!r} matches {shown}")
            if not matches:
                raise DatasetError(
                    image, f"no template: nothing matches template.rule {self.rule!r} in {image.parent}"
                )
            template = matches[0]
        if not template.is_file():
            raise DatasetError(image, f"no template: {template} does not exist")
        return template

    def is_template(self, path: Path, others: Iterable[Path] = ()) -> bool:
        """Whether ``path`` is a template rather than an image to predict."""
        if self.table is not None:
            return path.resolve() in set(self.table.values())
        if "{" not in str(self.rule):
            return fnmatch(path.name, str(self.rule))
        for image in others:
            if image != path:
                candidate = image.parent / str(self.rule).format(
                    stem=image.stem, suffix=image.suffix, name=image.name
                )
                if candidate == path:
                    return True
        return False


@dataclass
class PreparedImage:
    """One image ready for the model: its input, the picture to draw on, and its template."""

    path: Path
    tensor: Tensor
    view: np.ndarray
    template: Tensor | None = None


class ImageFiles(Dataset):
    """Image files prepared as the checkpoint's datamodule prepares test images. An item that
    cannot be prepared comes back as :class:`Skipped` (with the reason), never as an error."""

    def __init__(
        self, paths: Sequence[Path], preprocessing: Preprocessing, templates: TemplateFinder | None = None
    ) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.templates = templates

    def __len__(self) -> int:
        return len(self.paths)

    def _prepare(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        return self.preprocessing(path, read_image(path, grey=False))

    def __getitem__(self, index: int) -> PreparedImage | Skipped:
        path = self.paths[index]
        try:
            tensor, view = self._prepare(path)
        except DatasetError as error:
            return Skipped(path, "unreadable image", error.problem)
        except Exception as error:  # e.g. an image layout OpenCV cannot convert: skip, never abort
            return Skipped(path, "unreadable image", f"{type(error).__name__}: {error}")
        template = None
        if self.templates is not None:
            try:
                template_path = self.templates.find(path)
                template, _ = self._prepare(template_path)
            except DatasetError as error:
                where = "" if error.path in (None, path) else f"{error.path}: "
                return Skipped(path, "no usable template", f"{where}{error.problem}")
            if template.shape != tensor.shape:
                problem = (
                    f"its template {template_path} becomes a {tuple(template.shape)} input, "
                    f"the image a {tuple(tensor.shape)} one"
                )
                return Skipped(path, "no usable template", problem)
            template = torch.from_numpy(template)
        return PreparedImage(path, torch.from_numpy(tensor), view, template)


def image_loader(dataset: ImageFiles, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of :class:`PreparedImage` / :class:`Skipped` items, as lists."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)


# ---------------------------------------------------------------------------- running
@torch.inference_mode()
def run_batch(loaded: LoadedModel, items: Sequence[PreparedImage]) -> list[dict[str, Tensor]]:
    """The module's ``predict_step`` outputs of ``items``, one dict of CPU tensors per image."""
    device = loaded.device
    if loaded.preprocessing.stack:
        batch = {"image": torch.stack([item.tensor for item in items]).to(device)}
        out = loaded.module.predict_step(batch, 0)
        return [
            {k: v[i].detach().cpu() for k, v in out.items() if torch.is_tensor(v)} for i in range(len(items))
        ]
    images = [item.tensor.to(device) for item in items]
    targets: list[dict[str, Tensor]] = [{} for _ in items]
    if loaded.needs_template:
        for target, item in zip(targets, items, strict=True):
            target["template"] = item.template.to(device)
    out = loaded.module.predict_step((images, targets), 0)
    return [{k: v.detach().cpu() for k, v in pred.items()} for pred in out]


def _round(values: Iterable[float], digits: int = 2) -> list[float]:
    return [round(float(v), digits) for v in values]


def to_record(
    loaded: LoadedModel, output: Mapping[str, Tensor], view_size: tuple[int, int], input_size: tuple[int, int]
) -> dict[str, Any]:
    """One image's ``predict_step`` output as JSON-able data.

    ``view_size`` and ``input_size`` are ``(width, height)`` of the picture the input was made
    from and of the model input; detections are mapped back to the picture's pixels.
    Detection: ``{"detections": [{"box", "label", "class_name", "score"}]}``; classifier and
    SeMaCNN: ``score`` (probability of the predicted class), ``label``, ``class_name``,
    ``probabilities``, ``threshold`` None (arg-max); PaDiM, GAN-AE, autoencoder: ``score`` (the
    image anomaly score), ``threshold`` and ``label`` = score ≥ threshold (``None`` when the
    checkpoint holds no threshold). Models with maps add ``map_max``.
    """
    names = loaded.class_names
    if "boxes" in output:
        sx, sy = view_size[0] / input_size[0], view_size[1] / input_size[1]
        boxes = output["boxes"].float() * torch.tensor([sx, sy, sx, sy])
        detections = []
        for box, label, score in zip(boxes, output["labels"], output["scores"], strict=True):
            label = int(label)
            detections.append(
                {
                    "box": _round(box.tolist()),
                    "label": label,
                    "class_name": names[label - 1] if 1 <= label <= len(names) else str(label),
                    "score": round(float(score), 5),
                }
            )
        return {"detections": detections}
    record: dict[str, Any] = {}
    if "probs" in output:
        probs = output["probs"].float()
        label = int(probs.argmax())
        record.update(
            score=round(float(probs[label]), 6),
            label=label,
            class_name=names[label] if label < len(names) else str(label),
            threshold=None,
            probabilities={name: round(float(p), 6) for name, p in zip(names, probs.tolist(), strict=False)},
        )
    elif "scores" in output:
        score = float(output["scores"])
        threshold = loaded.threshold
        label = None if threshold is None else int(score >= threshold)
        record.update(
            score=score,
            label=label,
            class_name=None if label is None else (names[label] if label < len(names) else str(label)),
            threshold=threshold,
        )
    if "anomaly_maps" in output:
        record["map_max"] = float(output["anomaly_maps"].max())
    return record


def map_to_view(anomaly_map: Tensor, view_size: tuple[int, int]) -> Tensor:
    """An anomaly map (1×h×w or h×w) resized bilinearly to the picture's ``(width, height)``: H×W."""
    heat = anomaly_map.float().reshape(1, 1, *anomaly_map.shape[-2:])
    width, height = view_size
    if heat.shape[-2:] != (height, width):
        heat = F.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
    return heat[0, 0]
