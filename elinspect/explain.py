"""Grad-CAM explanations of a trained classifier or detector (issue 8; the EBBA paper's Fig. 11).

    python -m elinspect.explain ckpt_path=<run>/checkpoints/epoch_004.ckpt input=cells/ output=explained/
    python -m elinspect.explain ckpt_path=... input=cell.png target_class=crack layer=model.backbone level=0

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", eq. 1–2): for a score y and the activations A (C×h×w) of a
layer, the channel weights are the spatially averaged gradients α_k = mean_ij ∂y/∂A_k,ij and
the map is ReLU(Σ_k α_k A_k), upsampled to the input. Implemented with a forward hook on the
layer (no explanation library is a dependency of elinspect); ``y`` is:

* **classifiers** (``model=classifier``, SeMaCNN's heatmap classifier): the logit of
  ``target_class`` (default: the predicted class); default layer: the last CNN stage
  (``net.net.layer4`` of a ResNet, ``net.net.bn2`` — ``conv_head`` with its norm and
  activation — of an EfficientNet-Lite).
* **detectors** (torchvision Faster R-CNN and its elinspect variants): the model runs in
  eval mode with gradients on; ``y`` is the sum, over the ``detections`` highest-scoring
  detections (of ``target_class`` if given, with score ≥ ``score_threshold``), of the
  detection's class logit — the ``class_logits`` entry of the proposal the kept box was
  decoded from, in the box predictor's output (``detection_target=score``: the softmax score
  the detector reports instead). Default layer: ``model.backbone`` (the neck's outputs, one
  feature map per FPN level): the map is computed on every level that receives a gradient
  (the levels RoIAlign pooled the explained boxes from) and the levels' maps are summed at
  the input's size; ``level=<key>`` keeps one level. The boxes drawn are the explained ones.

For every input image ``<stem>`` it writes to ``output``: ``<stem>_gradcam.png`` (the image
with the map in a colour map over it, at the input's size, explained boxes drawn),
``<stem>_gradcam.npy`` (the raw map, float32, the input's height × width) and one line of
``explanations.jsonl`` (what was explained, with its score). The model is rebuilt from the
config stored in the checkpoint (as ``elinspect.eval`` does; loaded with
``weights_only=True``), and an input is prepared as the run's datamodule prepares a test image
(grey or RGB decoding, cell cut-out, resize: :class:`~elinspect.inference.Preprocessing`, as
``predict`` does); with a cell cut-out the map and overlay have the cell's size. A second file
of the same stem (``a.png`` beside ``a.jpg``) writes ``<stem>_<suffix>_gradcam.*``. Nothing is
downloaded (``weights`` entries are ignored: the checkpoint holds them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import hydra
import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import boxes as box_ops

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.data.errors import DatasetError
from elinspect.data.images import read_image
from elinspect.drawing import draw_detections
from elinspect.inference import Preprocessing, load_model, preprocessing_from_config
from elinspect.utils.checkpoint import read_checkpoint
from elinspect.utils.errors import ConfigError, UserError, user_errors
from elinspect.utils.library_warnings import silence_library_warnings
from elinspect.utils.task import extras, print_config

log = logging.getLogger(__name__)
silence_library_warnings()

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DETECTION_TARGETS = ("logit", "score")


class ExplainError(UserError, ValueError):
    """What was asked cannot be explained (unknown layer or class, unsupported model)."""


# ------------------------------------------------------------------------------ Grad-CAM
def grad_cam(activations: Tensor, gradients: Tensor) -> Tensor:
    """N×C×h×w activations and their gradients → N×h×w map ReLU(Σ_k α_k A_k), α_k = mean ∂y/∂A_k."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activations).sum(dim=1))


def feature_maps(output: Any) -> dict[str, Tensor]:
    """A layer's output as named 4-D maps: a tensor is ``{"": tensor}``, a mapping (FPN levels) itself."""
    if torch.is_tensor(output):
        return {"": output}
    if isinstance(output, Mapping):
        return {str(k): v for k, v in output.items() if torch.is_tensor(v) and v.dim() == 4}
    raise ExplainError(
        f"the layer returns {type(output).__name__}: Grad-CAM needs a feature map or a dict of them"
    )


@contextmanager
def tap(layer: nn.Module) -> Iterator[dict[str, Any]]:
    """Keep the last output of ``layer`` (``store["output"]``) with its gradients retained."""
    store: dict[str, Any] = {}

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        for tensor in feature_maps(output).values():
            if tensor.requires_grad:
                tensor.retain_grad()
        store["output"] = output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def cam_at(store: Mapping[str, Any], size: tuple[int, int], level: str | None = None) -> Tensor:
    """N×H×W: the Grad-CAM of the tapped output at ``size`` (the maps of several levels summed),
    after the backward pass. A level without gradient (not on the score's path) adds nothing."""
    if "output" not in store:
        raise ExplainError("the chosen layer did not run in the forward pass")
    maps = feature_maps(store["output"])
    if level is not None:
        if str(level) not in maps:
            raise ExplainError(f"level {level!r} is not an output of the layer; it has {sorted(maps)}")
        maps = {str(level): maps[str(level)]}
    total = None
    for activations in maps.values():
        if activations.grad is None:
            continue
        cam = grad_cam(activations.detach(), activations.grad)[:, None]
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        total = cam if total is None else total + cam
    if total is None:
        first = next(iter(maps.values()))
        return first.new_zeros((first.shape[0], *size))
    return total


def find_layer(module: nn.Module, name: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError as err:
        stages = [
            n for n, _ in module.named_modules() if n.endswith(("layer3", "layer4", "backbone", "neck"))
        ]
        raise ExplainError(
            f"layer {name!r} not found in {type(module).__name__}; for example: {stages[-6:]}"
        ) from err


def default_layer(module: nn.Module) -> str:
    """``model.backbone`` (the neck's outputs) of a detector; else the last ResNet stage, preferring
    the classifier network ``net`` (SeMaCNN also holds PaDiM's backbone)."""
    if getattr(module, "task", None) == "detection":
        return "model.backbone"
    stages = [
        name
        for n, m in module.named_modules()
        # a ResNet's last stage; an EfficientNet's last conv (conv_head) with its norm and activation
        for name in ([n] if n.endswith("layer4") else [f"{n}.bn2"] if hasattr(m, "conv_head") else [])
    ]
    preferred = [n for n in stages if n.startswith("net.")]
    if not (preferred or stages):
        raise ExplainError(
            f"no last CNN stage (a ResNet's layer4, an EfficientNet's conv_head) in {type(module).__name__}: "
            "give layer=<module path>"
        )
    return (preferred or stages)[-1]


# --------------------------------------------------------------------------- classifiers
def explain_classifier(
    forward: Callable[[Tensor], Tensor],
    layer: nn.Module,
    images: Tensor,
    target_class: int | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grad-CAM of the logit of ``target_class`` (default: each image's predicted class).

    Returns the maps N×H×W (at ``size``, default the input's), the explained classes (N) and the logits N×K.
    """
    images = images.detach().clone().requires_grad_(True)  # gradients flow even through frozen layers
    with tap(layer) as store, torch.enable_grad():
        logits = forward(images)
        if not torch.is_tensor(logits) or logits.dim() != 2:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ExplainError(
                f"the model returns {shape}, not class logits N×K: Grad-CAM explains classifiers and "
                "detectors (an anomaly model's own anomaly maps are its explanation)"
            )
        if target_class is not None and not 0 <= target_class < logits.shape[1]:
            raise ExplainError(f"target_class {target_class} outside 0..{logits.shape[1] - 1}")
        classes = (
            logits.argmax(dim=1) if target_class is None else torch.full((len(logits),), target_class)
        ).to(logits.device)
        logits.gather(1, classes[:, None]).sum().backward()
    return cam_at(store, size or tuple(images.shape[-2:])).detach(), classes, logits.detach()


# ----------------------------------------------------------------------------- detectors
@contextmanager
def roi_head_outputs(rcnn: nn.Module) -> Iterator[dict[str, Any]]:
    """What the ROI heads saw and produced in the last forward pass: ``proposals``, ``image_shapes``,
    ``class_logits``, ``box_regression``, ``result`` (detections in the transformed image's
    coordinates), and the transform's ``image_sizes`` / padded ``batch_shape``."""
    store: dict[str, Any] = {}
    heads = rcnn.roi_heads
    handles = [
        heads.register_forward_pre_hook(
            lambda m, args: store.update(proposals=args[1], image_shapes=args[2]) if len(args) >= 3 else None
        ),
        heads.register_forward_hook(lambda m, i, out: store.update(result=out[0])),
        rcnn.transform.register_forward_hook(
            lambda m, i, out: store.update(
                image_sizes=out[0].image_sizes, batch_shape=tuple(out[0].tensors.shape[-2:])
            )
        ),
    ]
    predictor = getattr(heads, "box_predictor", None)
    if predictor is not None:
        handles.append(
            predictor.register_forward_hook(
                lambda m, i, out: store.update(class_logits=out[0], box_regression=out[1])
            )
        )
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def detection_rows(rcnn: nn.Module, store: Mapping[str, Any]) -> Tensor | None:
    """For each detection of the (single) image, the row of ``class_logits`` it came from: the
    proposal whose decoded, clipped box for the detection's class is the detection's box
    (torchvision's ``postprocess_detections`` keeps those boxes unchanged). None when a
    detection cannot be traced back (heads that rescore or move their boxes)."""
    needed = ("class_logits", "box_regression", "proposals", "image_shapes", "result")
    if any(k not in store for k in needed):
        return None
    count = len(store["proposals"][0])
    decoded = rcnn.roi_heads.box_coder.decode(store["box_regression"].detach(), store["proposals"])
    boxes = box_ops.clip_boxes_to_image(decoded[:count], store["image_shapes"][0])
    result = store["result"][0]
    rows = []
    for box, label in zip(result["boxes"].detach(), result["labels"], strict=True):
        distance = (boxes[:, int(label)] - box).abs().amax(dim=1)
        row = int(distance.argmin())
        if float(distance[row]) > 1e-3 * max(1.0, float(box.abs().max())):
            return None
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long, device=result["labels"].device)


@dataclass
class DetectorExplanation:
    """A detector's Grad-CAM map (H×W at the input's size) and its detections (input coordinates)."""

    cam: Tensor
    boxes: Tensor
    labels: Tensor
    scores: Tensor
    explained: Tensor  # indices of the detections whose summed target was back-propagated
    target: str = "logit"
    values: Tensor = field(default_factory=lambda: torch.zeros(0))  # the explained logits / scores


def explain_detector(
    rcnn: nn.Module,
    layer: nn.Module,
    image: Tensor,
    target_class: int | None = None,
    detections: int = 3,
    score_threshold: float = 0.0,
    target: str = "logit",
    level: str | None = None,
) -> DetectorExplanation:
    """Grad-CAM of one image (3×H×W in [0, 1]) for a torchvision ``GeneralizedRCNN`` in eval mode
    (see the module docstring); the map has the image's size."""
    if target not in DETECTION_TARGETS:
        raise ExplainError(f"detection_target must be one of {DETECTION_TARGETS}, got {target!r}")
    image = image.detach().clone().requires_grad_(True)
    with tap(layer) as store, roi_head_outputs(rcnn) as heads, torch.enable_grad():
        output = rcnn([image])[0]
        scores, labels = output["scores"], output["labels"]
        chosen = scores.detach() >= score_threshold
        if target_class is not None:
            chosen &= labels == target_class
        explained = torch.nonzero(chosen).reshape(-1)[:detections]  # detections come sorted by score
        values = scores
        if target == "logit":
            rows = detection_rows(rcnn, heads)
            if rows is None:
                log.warning("cannot trace the detections to their class logits: explaining their scores")
                target = "score"
            else:
                values = heads["class_logits"][rows, labels]
        if len(explained):
            values[explained].sum().backward()
    height, width = heads["image_sizes"][0]
    cam = cam_at(store, heads["batch_shape"], level)[0, :height, :width]
    cam = F.interpolate(cam[None, None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[
        0, 0
    ]
    return DetectorExplanation(
        cam.detach(),
        output["boxes"].detach(),
        labels.detach(),
        scores.detach(),
        explained,
        target,
        values[explained].detach() if len(explained) else values.new_zeros(0).detach(),
    )


# ------------------------------------------------------------------------------ inputs
def input_files(source: str | Path) -> list[Path]:
    """``source`` itself, or the images in the directory ``source`` (sorted, not recursive)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExplainError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        return files
    raise ExplainError(f"input {source} is neither an image file nor a directory")


def class_index(module: nn.Module, target_class: Any) -> int | None:
    """``target_class`` (a class name or number) as the model's class index — for a detector the
    1-based label (``class_names[i - 1]`` is label ``i``)."""
    if target_class is None:
        return None
    names = [str(n) for n in getattr(module, "class_names", None) or []]
    offset = 1 if getattr(module, "task", None) == "detection" else 0
    if isinstance(target_class, int) or str(target_class).isdigit():
        return int(target_class)
    if str(target_class) in names:
        return names.index(str(target_class)) + offset
    raise ExplainError(f"target_class {target_class!r} is not a class of the model: {names}")


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """RGB uint8 image (H×W×3) with ``cam`` (H×W, scaled to its maximum) blended in a colour map."""
    level = cam / max(float(cam.max()), 1e-12)
    colour = matplotlib.colormaps[cmap](level)[..., :3]
    blend = (1 - alpha) * image.astype(np.float64) / 255.0 + alpha * colour
    return (np.clip(blend, 0, 1) * 255).round().astype(np.uint8)


@dataclass
class Explainer:
    """A loaded model and the settings of ``conf/explain.yaml``; :meth:`explain` handles one file."""

    module: nn.Module
    layer: str | None = None
    level: str | None = None
    target_class: Any = None
    detections: int = 3
    score_threshold: float = 0.3
    detection_target: str = "logit"
    alpha: float = 0.5
    cmap: str = "jet"
    device: str = "cpu"
    preprocessing: Preprocessing | None = None  # None: the one the module's stored data config says

    def __post_init__(self) -> None:
        self.module = self.module.to(self.device).eval()
        self.layer = self.layer or default_layer(self.module)
        self.layer_module = find_layer(self.module, self.layer)
        self.target = class_index(self.module, self.target_class)
        self.names = [str(n) for n in getattr(self.module, "class_names", None) or []]
        data = (getattr(self.module, "run_config", None) or {}).get("data") or {}
        if self.preprocessing is None:
            self.preprocessing = preprocessing_from_config(data)
        self.is_detector = getattr(self.module, "task", None) == "detection"

    def name(self, label: int) -> str:
        index = label - 1 if self.is_detector else label
        return self.names[index] if 0 <= index < len(self.names) else str(label)

    def explain(self, path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(overlay RGB uint8, raw map float32, summary) of one image file, both at the size of
        the picture the input was made from (the file, or the cell a datamodule cuts out)."""
        array, original = self.preprocessing(path, read_image(path, grey=False))
        height, width = original.shape[:2]
        if self.is_detector:
            return self._explain_detection(torch.from_numpy(array).to(self.device), original, path)
        tensor = torch.from_numpy(array)[None].to(self.device)
        cams, classes, logits = explain_classifier(
            self.module, self.layer_module, tensor, self.target, size=(height, width)
        )
        cam = cams[0].cpu().numpy().astype(np.float32)
        label = int(classes[0])
        probs = logits.softmax(dim=1)[0]
        summary = {
            "target": f"logit of class {self.name(label)}",
            "class": self.name(label),
            "logit": float(logits[0, label]),
            "probability": float(probs[label]),
            "predicted": self.name(int(probs.argmax())),
        }
        return overlay(original, cam, self.alpha, self.cmap), cam, summary

    def _explain_detection(
        self, tensor: Tensor, original: np.ndarray, path: Path
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        height, width = original.shape[:2]
        rcnn = self.module.model
        result = explain_detector(
            rcnn,
            self.layer_module,
            tensor,
            self.target,
            self.detections,
            self.score_threshold,
            self.detection_target,
            self.level,
        )
        cam = F.interpolate(
            result.cam[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
        cam_np = cam.cpu().numpy().astype(np.float32)
        scale = torch.tensor([width / tensor.shape[-1], height / tensor.shape[-2]] * 2)
        boxes = result.boxes.cpu() * scale
        idx = result.explained.cpu()
        picture = overlay(original, cam_np, self.alpha, self.cmap)
        pred = {"boxes": boxes[idx], "labels": result.labels.cpu()[idx], "scores": result.scores.cpu()[idx]}
        drawn = draw_detections(
            torch.from_numpy(picture).permute(2, 0, 1), None, pred, self.names, score_threshold=0.0
        )
        summary = {
            "target": f"sum of the {result.target}s of {len(idx)} detection(s)",
            "detections": [
                {
                    "box": [round(float(v), 1) for v in boxes[i]],
                    "class": self.name(int(result.labels[i])),
                    "score": round(float(result.scores[i]), 4),
                    result.target: round(float(value), 4),
                }
                for i, value in zip(idx.tolist(), result.values.cpu(), strict=True)
            ],
        }
        if not len(idx):
            log.warning(
                "%s: no detection with score >= %g to explain: the map is empty", path, self.score_threshold
            )
        return drawn.permute(1, 2, 0).numpy(), cam_np, summary


def explain_files(explainer: Explainer, files: Sequence[Path], output: str | Path) -> list[dict[str, Any]]:
    """Explain each file, writing ``<stem>_gradcam.{png,npy}`` and ``explanations.jsonl`` to
    ``output`` (``<stem>_<suffix>_gradcam.*`` for a second file of the same stem: a.png, a.jpg).
    A file that cannot be read or prepared (no cell found to cut out) is skipped, as predict
    skips it: named with the reason in the log and in ``explanations.jsonl``, and counted.
    Returns the explanations."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    used: set[str] = set()
    for path in files:
        try:
            picture, cam, summary = explainer.explain(path)
        except DatasetError as error:
            log.warning("skipped %s", error)
            lines.append({"input": str(path), "status": "skipped", "reason": error.problem})
            continue
        stem = path.stem if path.stem not in used else f"{path.stem}_{path.suffix.lstrip('.')}"
        used.add(stem)
        png, npy = output / f"{stem}_gradcam.png", output / f"{stem}_gradcam.npy"
        if not cv2.imwrite(str(png), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {png}")
        np.save(npy, cam)
        summaries.append(
            {"input": str(path), "overlay": png.name, "map": npy.name, "layer": explainer.layer, **summary}
        )
        lines.append(summaries[-1])
    with (output / "explanations.jsonl").open("w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    if len(summaries) < len(files):
        log.warning(
            "%d of %d inputs skipped (see the log and explanations.jsonl)",
            len(files) - len(summaries),
            len(files),
        )
    return summaries


def check_explainable(ckpt_path: str, module: nn.Module) -> None:
    """Refuse RDDN's TR-Pre and TR-Inter, which read each image beside its aligned template
    (explain takes images only); TR-Post is explained before its template rescoring."""
    template = getattr(module, "template", None)
    if template in ("pre", "inter"):
        raise ConfigError(
            f"{ckpt_path}: an RDDN detector of template={template} reads every image beside its "
            "aligned template, and explain takes images only; predict runs it with its templates"
        )
    if template == "post":
        log.warning(
            "template=post: the explained detections are the detector's before the template "
            "rescoring (explain takes images only); predict rescores them"
        )


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """``conf/explain.yaml``: load the checkpoint, explain every input image."""
    device = cfg.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(cfg.ckpt_path)
    check_explainable(cfg.ckpt_path, loaded.module)
    explainer = Explainer(
        loaded.module,
        layer=cfg.get("layer"),
        level=None if cfg.get("level") is None else str(cfg.level),
        target_class=cfg.get("target_class"),
        detections=int(cfg.get("detections", 3)),
        score_threshold=float(cfg.get("score_threshold", 0.3)),
        detection_target=cfg.get("detection_target", "logit"),
        alpha=float(cfg.get("alpha", 0.5)),
        cmap=cfg.get("cmap", "jet"),
        device=device,
        preprocessing=loaded.preprocessing,
    )
    summaries = explain_files(explainer, input_files(cfg.input), cfg.output)
    log.info("%d explanation(s) in %s", len(summaries), cfg.output)
    return summaries


@hydra.main(version_base="1.3", config_path="../conf", config_name="explain.yaml")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        extras(cfg)
        read_checkpoint(cfg.ckpt_path, mmap=True)  # a missing or unreadable file: reported before the tree
        print_config(cfg)
        run(cfg)


if __name__ == "__main__":
    main()
