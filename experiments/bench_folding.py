"""Time PaDiM's frozen backbone before and after folding (batch norms into the convolutions,
TF "same" padding into the kernels; ``elinspect.models.backbones.folding``), interleaved.

One process builds the body PaDiM uses (``build_body(..., norm_layer="bn")``, the stages of
``conf/model/padim.yaml``, eval mode, channels-last) twice, folds one copy and runs the two
forwards alternately on the same batch, A (as built) then B (folded); the first ``--warmup``
pairs are discarded. The table gives each side's median seconds per batch, the median of the
per-pair ratios A / B with its range, and the largest difference of the two outputs relative
to their largest value.

    .venv/bin/python experiments/bench_folding.py
    .venv/bin/python experiments/bench_folding.py --backbone resnet18 --weights none --pairs 15
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from elinspect.models.backbones import build_body, input_normalisation
from elinspect.models.backbones.folding import fold_for_inference

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="'none' for random weights")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of each side, the per-pair ratios' median and range, the outputs' difference."""
    torch.manual_seed(0)
    weights = None if args.weights == "none" else args.weights
    built, _ = build_body(args.backbone, weights, norm_layer="bn", stages=args.stages)
    built.eval().requires_grad_(False)
    folded = copy.deepcopy(built)
    fold_for_inference(folded, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    built.to(memory_format=torch.channels_last)
    folded.to(memory_format=torch.channels_last)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_normalisation(args.backbone))
    images = torch.rand(
        args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1)
    )
    images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"built": [], "folded": []}
    with torch.no_grad():
        expected, got = built(images), folded(images)
        difference = max(
            float((got[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected
        )
        for _ in range(args.warmup + args.pairs):
            for name, net in (("built", built), ("folded", folded)):
                start = time.perf_counter()
                net(images)
                times[name].append(time.perf_counter() - start)
    a, b = times["built"][args.warmup :], times["folded"][args.warmup :]
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "built_s": statistics.median(a),
        "folded_s": statistics.median(b),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "relative_difference": difference,
    }


def table(args: argparse.Namespace, result: dict[str, float]) -> str:
    head = "| backbone | input | threads | pairs | as built, s/batch | folded, s/batch | as built / folded (range) | max output difference / max output |"
    row = (
        f"| {args.backbone} ({args.weights}), stages {args.stages} | {args.batch_size}×3×{args.image_size}² | "
        f"{torch.get_num_threads()} | {args.pairs} | {result['built_s']:.4f} | {result['folded_s']:.4f} | "
        f"**{result['ratio']:.2f}×** ({result['ratio_min']:.2f} – {result['ratio_max']:.2f}) | "
        f"{result['relative_difference']:.1e} |"
    )
    return "\n".join([head, "|" + "---|" * 8, row])


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    out = table(args, measure(args))
    print(
        f"commit {commit or 'unknown'}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
