"""Export a checkpoint's inference network to ONNX or TorchScript, check the exported file
against PyTorch, and describe it for deployers (issue 8).

    python -m elinspect.export ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt format=onnx
    python -m elinspect.export ckpt_path=... format=torchscript output=deploy/padim.pt
    python -m elinspect.export ckpt_path=... format=onnx images='samples/*.png' atol=1e-3

What is exported is the torch model that maps an image batch to its named result (anomalib's
split of torch model and Lightning module; :mod:`elinspect.models.results`), the same call the
Lightning steps and ``predict`` make; the result's fields become the outputs, in each family's
order (:data:`FAMILIES`):

=============  ==========================  =================================================
family         input                       outputs
=============  ==========================  =================================================
classifier     N×C×S×S in [0, 1]           ``logits``, ``probabilities``
padim          N×C×S×S in [0, 1]           ``anomaly_map`` N×1×S×S, ``score`` (map maximum)
semacnn        N×C×S×S in [0, 1]           ``anomaly_map``, ``logits``, ``probabilities``
ganae          N×C×S×S in [0, 1]           ``score`` (eq. 7 / 6), ``anomaly_map`` ``|x − x̂|``,
                                           ``reconstruction`` x̂ (the networks' size)
autoencoder    N×C×S×S in [0, 1]           ``score``, ``anomaly_map``
detector       1×3×H×W in [0, 1] (fixed)   ``boxes`` K×4 (input pixels), ``labels``, ``scores``
=============  ==========================  =================================================

S is the datamodule's ``image_size``. A detector is traced at one input size: S×S, or the
size of the first of ``images`` — give ``images`` for a detector trained with ``resize:
longer`` (Aluminum, Fabric, VOC, COCO), whose inputs keep their aspect ratio.

Normalisation is inside every exported model (the backbone weights' own statistics;
torchvision's detection transform), so the input is what the datamodule serves: see the
sidecar's ``preprocessing``.

**Exporters.** TorchScript: :func:`torch.jit.trace` of the wrapper at the export input (a
detector is traced at its fixed input size). ONNX: the TorchScript-based exporter
``torch.onnx.export(..., dynamo=False)`` (opset 17) for the classifier, PaDiM, SeMaCNN and the
detectors (torchvision's Faster R-CNN exports through it); ``dynamo=True`` (opset 18) for
GAN-AE and the autoencoder, whose antialiased resize (``aten::_upsample_bilinear2d_aa``) the
TorchScript-based exporter cannot translate. ``exporter=torchscript|dynamo`` overrides it.
The batch axis is dynamic (``batch``) except for detectors.

**Parity.** The exported file is run (onnxruntime on CPU for ONNX, :func:`torch.jit.load` for
TorchScript) next to the PyTorch model on the same inputs — a seeded random batch of
``batch_size`` images at the input size (a different draw from the one traced), or the first
images of ``images`` prepared as the datamodule prepares test images — and the maximum
absolute difference of every output is printed with PASS / FAIL against the family's
tolerance (``|a − b| <= atol + rtol·|b|``; ``atol`` overrides the family's absolute ones).
Detector outputs are compared detection by detection: each PyTorch detection is matched to
the exported detection of the same class with the highest IoU, and the run passes when every
detection is matched on both sides within the tolerances (a near-tie at the detection cap, which
rounding may resolve differently on each side, is reported but not a failure). A detector that
finds nothing on either side has nothing compared: NOT CHECKED (``"passed": null``), not a pass.

**Sidecar.** ``<output>.json`` beside the file holds what a deployer needs: input name and
shape, preprocessing (decode grey/RGB, size, resize mode, value range), normalisation, class
names, thresholds (decision, pixel, heatmap scale, detector score threshold), the outputs,
and the tolerances and differences measured.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torchvision.ops import box_iou

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.inference import (
    CheckpointError,
    ImageFiles,
    LoadedModel,
    PreparedImage,
    list_inputs,
    load_model,
    scalar_or_none,
)
from elinspect.models.results import AnomalyResult, result_type
from elinspect.utils.checkpoint import read_checkpoint
from elinspect.utils.errors import ConfigError, user_errors
from elinspect.utils.library_warnings import silence_library_warnings
from elinspect.utils.outputs import OutputExistsError
from elinspect.utils.task import extras, print_config

log = logging.getLogger(__name__)
silence_library_warnings()

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}


class ParityError(RuntimeError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


# ------------------------------------------------------------------------ export outputs
class ModelOutputs(nn.Module):
    """The torch model's own call (:mod:`elinspect.models.results`), its named result handed
    over as the tuple of the family's ``outputs`` (tracing and ONNX see plain tensors); the
    sidecar's normalisation and thresholds come from the model too.

    Holds the torch model, not the LightningModule (tracing inspects every attribute of a
    module, and a Lightning module's ``trainer`` raises when it has none)."""

    def __init__(self, model: nn.Module, outputs: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        result = self.model(images)
        return tuple(getattr(result, name) for name in self.outputs)

    def normalisation(self) -> dict[str, Any]:
        return self.model.normalisation()

    def thresholds(self) -> dict[str, float | None]:
        return {name: scalar_or_none(getattr(self.model, name)) for name in self.model.threshold_names}


class DetectorOutputs(nn.Module):
    """1×3×H×W image (and 1×3×H×W template for a model whose ``extra_inputs`` hold
    ``"template"``, RDDN's template reference) → (boxes K×4 in input pixels, labels K starting
    at 1, scores K): the torchvision detector's per-image dict of its one image, in eval mode."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.detector = module.torch_model
        self.with_template = "template" in set(getattr(module, "extra_inputs", ()) or ())

    def forward(self, images: Tensor, templates: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if self.with_template:
            out = self.detector([images[0]], templates=[templates[0]])[0]
        else:
            out = self.detector([images[0]])[0]
        return out["boxes"], out["labels"], out["scores"]

    def normalisation(self) -> dict[str, Any]:
        transform = self.detector.transform
        return {
            "inside_model": True,
            "mean": list(transform.image_mean),
            "std": list(transform.image_std),
            "resize_inside": {
                "min_size": list(transform.min_size),
                "max_size": transform.max_size,
                "fixed_size": transform.fixed_size,
            },
        }

    def thresholds(self) -> dict[str, float | None]:
        roi = self.detector.roi_heads
        return {
            "box_score_thresh": roi.score_thresh,
            "box_nms_thresh": roi.nms_thresh,
            "detections_per_img": roi.detections_per_img,
        }


Tolerance = tuple[float, float]  # (atol, rtol)


@dataclass(frozen=True)
class Family:
    """How one kind of model is exported: the fields of its torch model's result that become the
    outputs (in this order), their tolerances and the ONNX exporter."""

    name: str
    module_class: str
    outputs: tuple[str, ...]
    tolerances: Mapping[str, Tolerance]
    onnx_exporter: str = "torchscript"
    detector: bool = False
    dynamic_batch: bool = True


# Tolerances (atol, rtol) measured against float32 round-off of each family's largest values:
# logits and probabilities 1e-4; PaDiM's Mahalanobis distances (tens) 1e-3 absolute + 1e-4
# relative; reconstruction scores and maps in [0, 1] 1e-4; detector boxes 1e-2 pixel.
FAMILIES: tuple[Family, ...] = (
    Family(
        "classifier",
        "elinspect.models.classification.module.ClassifierModule",
        ("logits", "probabilities"),
        {"logits": (1e-4, 1e-4), "probabilities": (1e-4, 0.0)},
    ),
    Family(
        "padim",
        "elinspect.models.anomaly.padim_module.PadimModule",
        ("anomaly_map", "score"),
        {"anomaly_map": (1e-3, 1e-4), "score": (1e-3, 1e-4)},
        onnx_exporter="dynamo",
    ),
    Family(
        "semacnn",
        "elinspect.models.anomaly.semacnn.SemaCnnModule",
        ("anomaly_map", "logits", "probabilities"),
        {"anomaly_map": (1e-3, 1e-4), "logits": (1e-3, 1e-4), "probabilities": (1e-4, 0.0)},
        onnx_exporter="dynamo",
    ),
    Family(
        "ganae",
        "elinspect.models.anomaly.ganae_module.GanAeModule",
        ("score", "anomaly_map", "reconstruction"),
        {"score": (1e-4, 1e-3), "anomaly_map": (1e-4, 0.0), "reconstruction": (1e-4, 0.0)},
        onnx_exporter="dynamo",
        dynamic_batch=False,  # the generator reshapes by len(z), a Python int: the batch is traced in
    ),
    Family(
        "autoencoder",
        "elinspect.models.anomaly.autoencoder_module.AutoencoderModule",
        ("score", "anomaly_map"),
        {"score": (1e-4, 1e-3), "anomaly_map": (1e-4, 0.0)},
        onnx_exporter="dynamo",
    ),
    Family(
        "detector",
        "elinspect.models.detection.module.DetectionModule",
        ("boxes", "labels", "scores"),
        {"boxes": (1e-2, 0.0), "labels": (0.0, 0.0), "scores": (1e-4, 0.0)},
        detector=True,
        dynamic_batch=False,
    ),
)


# A model of none of the families above exports by the result its torch model returns (a new
# anomaly method needs no entry here): its fields are the outputs, at PaDiM's tolerances (a
# distance of tens, or a value in [0, 1]).
RESULT_FAMILIES: Mapping[type, Family] = {
    AnomalyResult: Family(
        "anomaly",
        "elinspect.models.anomaly.base.AnomalyModule",
        AnomalyResult._fields,
        {"score": (1e-3, 1e-4), "anomaly_map": (1e-3, 1e-4)},
        onnx_exporter="dynamo",
    ),
}


def family_of(loaded: LoadedModel) -> Family:
    """The export family of a loaded model: its module class or a subclass of it, else the
    result its torch model returns."""
    for family in FAMILIES:
        if isinstance(loaded.module, hydra.utils.get_class(family.module_class)):
            return family
    torch_model = getattr(loaded.module, "torch_model", None)
    family = RESULT_FAMILIES.get(result_type(torch_model)) if torch_model is not None else None
    if family is not None:
        return family
    supported = ", ".join(f.name for f in (*FAMILIES, *RESULT_FAMILIES.values()))
    raise CheckpointError(
        f"{loaded.ckpt_path} is a checkpoint of model {loaded.name} ({loaded.model_class}); export knows "
        f"the families {supported} (a torch model returning one of {[t.__name__ for t in RESULT_FAMILIES]}), "
        "not this one"
    )


def export_outputs(loaded: LoadedModel, family: Family) -> ModelOutputs | DetectorOutputs:
    """What is traced: the loaded module's torch model with the family's outputs."""
    if family.detector:
        return DetectorOutputs(loaded.module)
    return ModelOutputs(loaded.module.torch_model, family.outputs)


# --------------------------------------------------------------------------- inputs
@dataclass
class ExportInputs:
    """The tensors the model is traced with, those parity is checked on, and how they were made."""

    trace: tuple[Tensor, ...]
    check: tuple[Tensor, ...]
    source: str


def input_shape(loaded: LoadedModel, family: Family, batch: int) -> tuple[int, ...]:
    prep = loaded.preprocessing
    size = prep.image_size or (loaded.info.image_size[0] if loaded.info.image_size else None)
    if size is None:
        raise ConfigError(
            f"model {loaded.name} was trained at the images' stored size (data.image_size null): "
            "give images=... to export at a real image's size"
        )
    return (1 if family.detector else batch, prep.channels, int(size), int(size))


def make_inputs(
    loaded: LoadedModel, family: Family, batch_size: int, seed: int, images: str | None
) -> ExportInputs:
    """Seeded random inputs at the model's input size, or prepared images for the check."""
    with_template = family.detector and loaded.needs_template
    generator = torch.Generator().manual_seed(seed)
    if images is None:
        shape = input_shape(loaded, family, batch_size)
        if family.detector and loaded.preprocessing.resize == "longer" and not with_template:
            log.warning(
                "%s was trained with resize: longer (each image's aspect ratio kept), and a detector "
                "is exported at one fixed input size: %d×%d here; give images=... to export at the "
                "size of the images it will see",
                loaded.name,
                shape[2],
                shape[3],
            )
        # a different batch size for tracing shows that the exported batch axis is dynamic; never
        # 1: torch.export specialises a dimension of size 1, and the graph would take batch 1 only
        trace_shape = (shape[0] + 1 if family.dynamic_batch else shape[0], *shape[1:])

        def draw(s: tuple[int, ...]) -> tuple[Tensor, ...]:
            n = 2 if with_template else 1
            return tuple(torch.rand(s, generator=generator) for _ in range(n))

        trace = draw(trace_shape)
        return ExportInputs(trace, draw(shape), f"seeded random batch (seed {seed}) of shape {list(shape)}")
    if with_template:
        raise ConfigError("a template-reference detector is checked on random inputs: leave images=null")
    files, _, _ = list_inputs(images)
    dataset = ImageFiles(files, loaded.preprocessing)
    want = 1 if family.detector else batch_size
    ready: list[PreparedImage] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, PreparedImage):
            ready.append(item)
        if len(ready) == want:
            break
    if not ready:
        raise ConfigError(f"images={images}: no image could be read for the parity check")
    check = torch.stack([item.tensor for item in ready])
    # traced at another batch size than the check's, as above (one image: never traced at 1)
    trace_shape = (len(check) + 1 if family.dynamic_batch else len(check), *check.shape[1:])
    trace = torch.rand(trace_shape, generator=generator)
    names = ", ".join(item.path.name for item in ready)
    return ExportInputs((trace,), (check,), f"images {names} ({images})")


# --------------------------------------------------------------------------- export
def input_names(family: Family, loaded: LoadedModel) -> list[str]:
    return ["images", "templates"] if family.detector and loaded.needs_template else ["images"]


def export_onnx(
    wrapper: nn.Module,
    inputs: tuple[Tensor, ...],
    path: Path,
    family: Family,
    names: list[str],
    exporter: str,
    opset: int,
) -> None:
    """Write ``wrapper`` as ONNX with the chosen exporter (dynamic batch except for detectors)."""
    axes: dict[str, dict[int, str]] = {}
    if family.dynamic_batch:
        axes = {name: {0: "batch"} for name in [*names, *family.outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            dynamo=exporter == "dynamo",
            opset_version=opset,
            input_names=names,
            output_names=list(family.outputs),
            dynamic_axes=axes or None,
            external_data=False,
        )


def export_torchscript(wrapper: nn.Module, inputs: tuple[Tensor, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
    traced.save(str(path))


def run_exported(path: Path, fmt: str, inputs: tuple[Tensor, ...], names: list[str]) -> list[Tensor]:
    """Outputs of the exported file on ``inputs`` (onnxruntime on CPU, or torch.jit.load)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        out = module(*inputs)
    return list(out) if isinstance(out, tuple | list) else [out]


# --------------------------------------------------------------------------- parity
@dataclass
class OutputCheck:
    """One output compared: its shape, the largest absolute difference and the verdict."""

    name: str
    shape: list[int]
    max_abs_diff: float
    atol: float
    rtol: float
    passed: bool
    note: str = ""
    compared: bool = True  # False: nothing to compare (a detector that found nothing on either side)


def compare_tensors(
    names: Sequence[str],
    ours: Sequence[Tensor],
    theirs: Sequence[Tensor],
    tolerances: Mapping[str, Tolerance],
) -> list[OutputCheck]:
    checks = []
    for name, a, b in zip(names, ours, theirs, strict=True):
        atol, rtol = tolerances[name]
        if tuple(a.shape) != tuple(b.shape):
            checks.append(
                OutputCheck(name, list(a.shape), math.inf, atol, rtol, False, f"shape {list(b.shape)}")
            )
            continue
        a, b = a.double(), b.double()
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        passed = bool(torch.allclose(b, a, atol=atol, rtol=rtol)) if a.numel() else True
        checks.append(OutputCheck(name, list(a.shape), diff, atol, rtol, passed))
    return checks


def compare_detections(
    ours: Sequence[Tensor],
    theirs: Sequence[Tensor],
    tolerances: Mapping[str, Tolerance],
    cap: int | None = None,
) -> list[OutputCheck]:
    """Detections matched by class and IoU (greedy, best IoU first); boxes and scores compared
    on the matched pairs; every detection of either side must find its partner, except a
    near-tie at the detection cap (``cap``: box_detections_per_img): a detection missing on a
    side that kept ``cap`` boxes and scoring no more than that side's lowest (within the score
    tolerance), which rounding may have cut there and not here. Such near-ties are counted in
    the note, not failed."""
    (boxes_a, labels_a, scores_a), (boxes_b, labels_b, scores_b) = ours, theirs
    boxes_a, boxes_b = boxes_a.float(), boxes_b.float()
    iou = (
        box_iou(boxes_a, boxes_b)
        if len(boxes_a) and len(boxes_b)
        else torch.zeros(len(boxes_a), len(boxes_b))
    )
    iou[labels_a[:, None] != labels_b[None, :]] = -1
    pairs: list[tuple[int, int]] = []
    used_a, used_b = set(), set()
    for flat in torch.argsort(iou.flatten(), descending=True).tolist():
        i, j = divmod(flat, max(1, len(boxes_b)))
        if iou[i, j] <= 0.5:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)

    def cut_at_cap(score: Tensor, other_scores: Tensor) -> bool:
        at_cap = cap is not None and len(other_scores) == cap
        return at_cap and float(score) <= float(other_scores.min()) + tolerances["scores"][0]

    tied_a = sum(cut_at_cap(scores_a[i], scores_b) for i in range(len(boxes_a)) if i not in used_a)
    tied_b = sum(cut_at_cap(scores_b[j], scores_a) for j in range(len(boxes_b)) if j not in used_b)
    unmatched = len(boxes_a) + len(boxes_b) - 2 * len(pairs) - tied_a - tied_b
    note = f"{len(boxes_a)} vs {len(boxes_b)} detections, {len(pairs)} matched"
    if tied_a or tied_b:
        note += f", {tied_a} + {tied_b} near-ties at the cap"
    compared = bool(len(boxes_a) or len(boxes_b))
    if not compared:
        note += ": nothing compared, give images=... with defects"
    ia = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    ib = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    checks = compare_tensors(
        ("boxes", "labels", "scores"),
        (boxes_a[ia], labels_a[ia], scores_a[ia]),
        (boxes_b[ib], labels_b[ib], scores_b[ib]),
        tolerances,
    )
    for check in checks:
        check.shape = [len(boxes_a), *check.shape[1:]]
        check.note = note
        check.passed = check.passed and unmatched == 0
        check.compared = compared
    return checks


# ------------------------------------------------------------------------- sidecar
@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and measured."""

    path: Path
    sidecar: Path
    checks: list[OutputCheck] = field(default_factory=list)
    exporter: str = ""

    @property
    def passed(self) -> bool | None:
        """Every output within its tolerance; None where nothing could be compared (a
        detector that finds nothing on the parity input: 0 against 0 boxes proves nothing)."""
        if self.checks and not any(c.compared for c in self.checks):
            return None
        return all(c.passed for c in self.checks)

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT CHECKED"}[self.passed]


def parity_table(result: ExportResult, title: str) -> Table:
    table = Table(title=title)
    for column in ("output", "shape", "max |Δ|", "tolerance", "", "note"):
        table.add_column(column)
    for c in result.checks:
        verdict = "[yellow]—" if not c.compared else "[green]PASS" if c.passed else "[red]FAIL"
        table.add_row(
            c.name,
            str(c.shape),
            f"{c.max_abs_diff:.3g}",
            f"atol {c.atol:g}, rtol {c.rtol:g}",
            verdict,
            c.note,
        )
    return table


def export_checkpoint(
    ckpt_path: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    *,
    opset: int | None = None,
    exporter: str | None = None,
    atol: float | None = None,
    images: str | None = None,
    batch_size: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    console: Console | None = None,
) -> ExportResult:
    """Export, check parity, write the sidecar; raises :class:`ParityError` on a FAIL (the
    files are kept, the sidecar records the differences). A detector that finds nothing on the
    parity input is NOT CHECKED: the files are kept and the sidecar says ``"passed": null``."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if exporter is not None and exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS} or null, got {exporter!r}")
    console = console or Console()
    path = Path(output).expanduser() if output else Path(ckpt_path).expanduser().with_suffix(FORMATS[format])
    sidecar = path.with_name(path.name + ".json")
    for target in (path, sidecar):
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} exists; choose another output=FILE or overwrite=true")
    loaded = load_model(ckpt_path, "cpu")
    family = family_of(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)

    wrapper = export_outputs(loaded, family).eval()
    inputs = make_inputs(loaded, family, batch_size, seed, images)
    names = input_names(family, loaded)
    tolerances = {k: (atol if atol is not None else a, r) for k, (a, r) in family.tolerances.items()}

    started = time.perf_counter()
    if format == "onnx":
        chosen = exporter or family.onnx_exporter
        opset = int(opset or DEFAULT_OPSET[chosen])
        export_onnx(wrapper, inputs.trace, path, family, names, chosen, opset)
        how = f"torch.onnx.export(dynamo={chosen == 'dynamo'}), opset {opset}"
    else:
        export_torchscript(wrapper, inputs.trace, path)
        how = "torch.jit.trace (check_trace=False; parity is checked on other inputs)"
    seconds = time.perf_counter() - started

    with torch.inference_mode():
        ours = list(wrapper(*inputs.check))
    if family.detector and not len(ours[0]):
        log.warning(
            "the detector finds nothing on the parity input: give images=... with defects to compare boxes"
        )
    theirs = run_exported(path, format, inputs.check, names)
    if family.detector:
        cap = getattr(loaded.module.model.roi_heads, "detections_per_img", None)
        checks = compare_detections(ours, theirs, tolerances, cap=cap)
    else:
        checks = compare_tensors(family.outputs, ours, theirs, tolerances)
    result = ExportResult(path, sidecar, checks, how)

    write_sidecar(result, loaded, family, wrapper, format, inputs, names, seconds)
    console.print(
        parity_table(result, f"{format} export of {loaded.name} ({how}): parity on {inputs.source}")
    )
    console.print(f"{result.verdict}: {path} (sidecar {sidecar.name})")
    if result.passed is False:
        raise ParityError(f"the exported {path} differs from PyTorch beyond the tolerance (see {sidecar})")
    return result


def write_sidecar(
    result: ExportResult,
    loaded: LoadedModel,
    family: Family,
    wrapper: ModelOutputs | DetectorOutputs,
    fmt: str,
    inputs: ExportInputs,
    names: list[str],
    seconds: float,
) -> None:
    shape: list[Any] = list(inputs.check[0].shape)
    if family.dynamic_batch:
        shape[0] = "batch"
    data = {
        "file": result.path.name,
        "format": fmt,
        "exporter": result.exporter,
        "export_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "model": loaded.name,
        "model_class": loaded.model_class,
        "family": family.name,
        "checkpoint": str(loaded.ckpt_path),
        "inputs": [{"name": name, "shape": shape, "dtype": "float32", "range": [0.0, 1.0]} for name in names],
        "outputs": list(family.outputs),
        "preprocessing": loaded.preprocessing.describe(),
        "normalisation": wrapper.normalisation(),
        "class_names": loaded.class_names,
        "label_offset": 1 if family.detector else 0,
        "thresholds": wrapper.thresholds(),
        "parity": {
            "inputs": inputs.source,
            "runtime": "onnxruntime (CPUExecutionProvider)" if fmt == "onnx" else "torch.jit.load",
            "passed": result.passed,
            "outputs": {
                c.name: {
                    "max_abs_diff": c.max_abs_diff if math.isfinite(c.max_abs_diff) else None,
                    "atol": c.atol,
                    "rtol": c.rtol,
                    "passed": c.passed if c.compared else None,
                    **({"note": c.note} if c.note else {}),
                }
                for c in result.checks
            },
        },
    }
    result.sidecar.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export(cfg: DictConfig) -> ExportResult:
    """:func:`export_checkpoint` with the options of ``conf/export.yaml``."""
    return export_checkpoint(
        cfg.ckpt_path,
        str(cfg.format),
        cfg.get("output"),
        opset=cfg.get("opset"),
        exporter=cfg.get("exporter"),
        atol=cfg.get("atol"),
        images=cfg.get("images"),
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        overwrite=bool(cfg.overwrite),
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        extras(cfg)
        read_checkpoint(cfg.ckpt_path, mmap=True)  # a missing or unreadable file: reported before the tree
        print_config(cfg)
        export(cfg)


if __name__ == "__main__":
    main()
