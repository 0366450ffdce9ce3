"""Benchmark the detectors (Faster R-CNN, EBBA, BAF) and the PVEL-AD data pipeline, side by side in one run.

Every model is built exactly as ``python -m elinspect.train model=<name> data=pvel`` builds
it: the config is composed from ``conf/`` with Hydra's compose API (``model=<name>``,
``model.detector.backbone.name=resnet<depth>``, ``model.detector.backbone.weights=null``,
``model.detector.fixed_size=[600,600]``, ``data.classes=ebba5``), the loss comes from
``effective_loss_config`` + ``build_loss`` (``loss=auto``: cross-entropy for faster_rcnn
and baf, SDFL for ebba) and the model from ``model_config`` with the datamodule's
:class:`~elinspect.data.info.DatasetInfo` (the 5 EBBA classes and their box counts).

Data: a synthetic PVEL-AD of ``--images`` 1024×1024 images (``write_pvel_dataset``, seed 0)
in a temporary directory, read by ``PvelAdDataModule`` from ``conf/data/pvel.yaml`` (its
``num_workers``, ``augment``, ``image_size`` 600) with ``batch_size=1``.

    .venv/bin/python experiments/bench_detection.py --out experiments/results/bench_detection.md
    .venv/bin/python experiments/bench_detection.py --quick --models faster_rcnn:50 ebba:50

What is timed (honestly, and no more):

- **training step**: ``model(images, targets)`` → the summed losses → ``zero_grad`` →
  ``backward`` → ``optimizer.step()`` with the model's own SGD (``configure_optimizers``),
  batch 1, train mode. Not timed: the data loader, Lightning's loop and logging, the LR
  scheduler. The input is one training image (the first with boxes), as the loader
  delivers it un-augmented (600×600, [0, 1]), and its boxes; the same image every step.
- **inference**: ``model([image])`` in eval mode under ``no_grad``, batch 1: torchvision's
  transform, backbone, neck, RPN (1000 proposals), ROI head on every proposal and
  post-processing. The weights are random (``weights: null``) and have taken the timed
  SGD steps on one image, after which the box head scores every class below
  ``box_score_thresh`` (the ``detections`` column, usually 0): the final per-class NMS has
  almost nothing to do, which a trained model's would. Everything before it is the same
  work for any weights.
- Each number is the median of ``--repeats`` after ``--warmup`` untimed calls, with the
  range. Models are timed round-robin (one training step of every model, then the next
  round; the same for inference), so slow drifts of a shared machine's load hit all
  models alike. Ratios are given from wall-clock time and from this process's CPU time
  (``time.process_time``, all its threads), which other processes on the machine disturb
  less (they still share caches and memory bandwidth, and an OpenMP thread spinning while
  its partner waits for a core counts as CPU time). The absolute seconds depend on the
  machine and its load; compare them only within one run.
- **loader**: images/s of ``train_dataloader()`` (augmentation on) over ``--loader-batches``
  batches, timed from after the first batch (the workers have started), cycling epochs
  (persistent workers). Measured alone: in training, the workers share the CPU cores with
  the training step, which this number does not include. It is compared with the training
  step's images/s of faster_rcnn ResNet-50 (batch 1: 1 / step seconds); the goal is a
  loader delivering at least 3× what a step consumes.
- **params**: every parameter of the LightningModule (all are trainable here).

CPU only, float32, torch's default thread count (printed in the header).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import elinspect.utils.resolvers  # noqa: E402, F401  (registers the config resolvers)
from elinspect.data.detection import DetectionDataset  # noqa: E402
from elinspect.data.info import DatasetInfo  # noqa: E402
from elinspect.data.pvel import PvelAdDataModule  # noqa: E402
from elinspect.data.synthetic.pvel import write_pvel_dataset  # noqa: E402
from elinspect.models.detection.module import DetectionModule, model_targets  # noqa: E402
from elinspect.utils.build import CONFIG_DIR, build_loss, effective_loss_config, model_config  # noqa: E402

MODELS = ("faster_rcnn:50", "faster_rcnn:101", "ebba:50", "ebba:101", "baf:50", "baf:101")
BASELINE = "faster_rcnn"
INPUT_SIZE = 600


@dataclass
class Bench:
    """One model under test and its timings."""

    name: str
    depth: int
    module: DetectionModule
    optimizer: torch.optim.Optimizer
    train_s: list[float] = field(default_factory=list)  # wall-clock seconds
    train_cpu: list[float] = field(default_factory=list)  # this process's CPU seconds (all threads)
    infer_s: list[float] = field(default_factory=list)
    infer_cpu: list[float] = field(default_factory=list)
    detections: list[int] = field(default_factory=list)
    finite: bool = True

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.module.parameters()) / 1e6


# ------------------------------------------------------------------------------- building
def compose_config(model: str, depth: int, root: Path) -> DictConfig:
    """The train config for ``model=<model>`` on the synthetic PVEL-AD, as the command line composes it."""
    overrides = [
        f"model={model}",
        "data=pvel",
        "data.classes=ebba5",
        f"data.root='{root}'",
        "data.batch_size=1",
        f"data.image_size={INPUT_SIZE}",
        f"model.detector.backbone.name=resnet{depth}",
        "model.detector.backbone.weights=null",
        f"model.detector.fixed_size=[{INPUT_SIZE},{INPUT_SIZE}]",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train.yaml", overrides=overrides)


def build_bench(cfg: DictConfig, name: str, depth: int, info: DatasetInfo) -> Bench:
    """Loss → model → optimiser, as ``elinspect.utils.build`` and Lightning do them."""
    torch.manual_seed(0)
    loss = build_loss(effective_loss_config(cfg), info)
    module = hydra.utils.instantiate(model_config(cfg), dataset=info.to_dict(), loss=loss, _convert_="all")
    optimizer = module.configure_optimizers()["optimizer"]
    return Bench(name, depth, module, optimizer)


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


def train_step(bench: Bench, image: torch.Tensor, target: dict[str, torch.Tensor]) -> Clock:
    bench.module.train()
    with Clock() as clock:
        losses = bench.module.model([image], model_targets([target]))
        loss = sum(losses.values())
        bench.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bench.optimizer.step()
    bench.finite = bench.finite and bool(torch.isfinite(loss))
    return clock


def inference(bench: Bench, image: torch.Tensor) -> tuple[Clock, int]:
    bench.module.eval()
    with Clock() as clock, torch.no_grad():
        detections = bench.module.model([image])
    return clock, len(detections[0]["boxes"])


def time_round_robin(
    benches: list[Bench], image: torch.Tensor, target: dict[str, torch.Tensor], warmup: int, repeats: int
) -> None:
    """Training steps, then inference calls: one of every model per round; warm-up rounds untimed."""
    rounds = warmup + repeats
    for r in range(rounds):
        for b in benches:
            clock = train_step(b, image, target)
            if r >= warmup:
                b.train_s.append(clock.wall)
                b.train_cpu.append(clock.cpu)
        print(f"  training round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    for r in range(rounds):
        for b in benches:
            clock, found = inference(b, image)
            if r >= warmup:
                b.infer_s.append(clock.wall)
                b.infer_cpu.append(clock.cpu)
                b.detections.append(found)
        print(f"  inference round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


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
def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def spread(values: list[float]) -> str:
    """``median [min–max]``."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def ratios(bench: Bench, reference: Bench | None, phase: str) -> str:
    """``wall / CPU`` ratio of the medians of ``bench`` to ``reference`` for ``phase`` (train | infer)."""
    if reference is None:
        return "– / –"
    median = statistics.median
    cells = [
        median(getattr(bench, f"{phase}_{kind}")) / median(getattr(reference, f"{phase}_{kind}"))
        for kind in ("s", "cpu")
    ]
    return " / ".join(fmt(c) for c in cells)


def table(benches: list[Bench]) -> list[str]:
    median = statistics.median
    base = {b.depth: b for b in benches if b.name == BASELINE}
    lines = [
        "| model | backbone | params (M) | train step s, median [min–max] | train img/s "
        "| train ratio vs faster_rcnn, wall / CPU | inference s, median [min–max] | inference img/s "
        "| inference ratio vs faster_rcnn, wall / CPU | detections |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in benches:
        ref = base.get(b.depth)
        train, infer = ratios(b, ref, "train"), ratios(b, ref, "infer")
        name = b.name if b.finite else f"{b.name} (non-finite loss!)"
        lines.append(
            f"| {name} | ResNet-{b.depth} | {b.params_m:.1f} "
            f"| {spread(b.train_s)} | {1 / median(b.train_s):.3f} | {train} "
            f"| {spread(b.infer_s)} | {1 / median(b.infer_s):.2f} | {infer} "
            f"| {median(b.detections):g} |"
        )
    return lines


def loader_lines(
    benches: list[Bench], dm: PvelAdDataModule, first: float, rate: float, batches: int
) -> list[str]:
    hp = dm.hparams
    lines = [
        f"PVEL-AD train loader ({len(dm.records['train'])} training images of 1024 px → {hp.image_size} px "
        f"{hp.resize}, augment {dict(hp.augment) if hp.augment else None}, num_workers {hp.num_workers}, "
        f"batch_size {hp.batch_size}): {rate:.1f} images/s over {batches} batches "
        f"(after {first:.2f} s to the first batch)."
    ]
    ref = next((b for b in benches if b.name == BASELINE and b.depth == 50), None)
    if ref is None:
        return [*lines, "(faster_rcnn:50 not benchmarked: no loader/step comparison)"]
    step_rate = 1 / statistics.median(ref.train_s)
    times = rate / step_rate
    verdict = "met" if times >= 3 else "NOT met"
    lines.append(
        f"faster_rcnn ResNet-50 training step consumes {step_rate:.2f} images/s: the loader delivers "
        f"{times:.1f}× that; goal (≥ 3×): **{verdict}**."
    )
    return lines


def command_line() -> str:
    exe = Path(sys.executable)
    shown = os.path.relpath(exe, Path.cwd()) if exe.is_relative_to(Path.cwd()) else exe.name
    return " ".join([str(shown), "experiments/bench_detection.py", *sys.argv[1:]])


# ----------------------------------------------------------------------------------- main
def parse_models(specs: list[str]) -> list[tuple[str, int]]:
    models = []
    for spec in specs:
        name, _, depth = spec.partition(":")
        if not (CONFIG_DIR / "model" / f"{name}.yaml").is_file() or depth not in ("18", "34", "50", "101"):
            raise SystemExit(f"--models takes <conf/model name>:<depth 18|34|50|101>, got {spec!r}")
        models.append((name, int(depth)))
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per model (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model first")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="name:depth, e.g. ebba:101")
    parser.add_argument("--images", type=int, default=48, help="synthetic 1024-px PVEL-AD images to write")
    parser.add_argument("--loader-batches", type=int, default=96, help="timed loader batches")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 16 loader batches")
    parser.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.loader_batches = 1, 16
    models = parse_models(args.models)

    start = time.perf_counter()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-detection-") as tmp:
        root = Path(tmp) / "PVEL-AD"
        print(f"writing {args.images} synthetic PVEL-AD images to {root}", file=sys.stderr, flush=True)
        write_pvel_dataset(root, num_images=args.images, seed=0, image_size=1024)
        configs = [compose_config(name, depth, root) for name, depth in models]
        torch.manual_seed(0)
        dm: PvelAdDataModule = hydra.utils.instantiate(configs[0].data, _convert_="all")
        info = dm.info
        image, target = sample_input(dm)
        print("timing the loader", file=sys.stderr, flush=True)
        first, rate = loader_rate(dm, args.loader_batches)
        print(f"building {len(models)} models", file=sys.stderr, flush=True)
        benches = [
            build_bench(cfg, name, depth, info) for cfg, (name, depth) in zip(configs, models, strict=True)
        ]
        time_round_robin(benches, image, target, args.warmup, args.repeats)

    report = [
        f"command: `{command_line()}`",
        "",
        f"date: {dt.datetime.now():%Y-%m-%d %H:%M}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} at the start (shared machine); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32",
        f"input {INPUT_SIZE}×{INPUT_SIZE} (model.detector.fixed_size), batch 1, "
        f"{len(target['boxes'])} boxes; {info.num_classes} classes ({', '.join(info.class_names)}), "
        f"train box counts {list(info.class_counts)}; "
        f"weights null; loss=auto; median of {args.repeats} after {args.warmup} warm-up, round-robin; "
        f"total wall time {time.perf_counter() - start:.0f} s",
        "",
        *table(benches),
        "",
        *loader_lines(benches, dm, first, rate, args.loader_batches),
        "",
        "Ratios: this model's median seconds / faster_rcnn's with the same backbone (> 1: slower), from "
        "wall-clock time and from this process's CPU time (less sensitive to other processes on the "
        "machine). detections: median boxes returned by the timed inference calls. See the script's "
        "docstring for what is and is not timed.",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# detection benchmark\n\n{text}\n")


if __name__ == "__main__":
    main()
