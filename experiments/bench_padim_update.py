"""Time PaDiM's streaming Gaussian update (Σx, Σxxᵀ of one batch) of two checkouts, interleaved.

The backbone is left out: every checkout's ``Padim.update`` is fed the same fixed N×P×k
embeddings (P = 64·64 positions, k = 100: EfficientNet-Lite0's grid and embedding in
``conf/model/padim.yaml``; a batch of 16 as ``bench_padim.py``), so the time is the sums' own.
Each measurement runs in a fresh process that imports ``elinspect`` from the given checkout;
A and B alternate, the first update of each process is discarded, and the table gives each
pair's medians and the median of the per-pair ratios B / A.

    .venv/bin/python experiments/bench_padim_update.py --checkouts <old checkout> . --pairs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from elinspect.models.anomaly.padim import Padim
torch.manual_seed(0)
model = Padim(backbone="resnet18", feature_size=64, k=100)
embeddings = (0.3 * torch.randn(16, 4096, 100) + torch.randn(1, 4096, 100)).float()
model.embed = lambda images: embeddings
images = torch.zeros(1, 3, 8, 8)
model.update(images)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    model.update(images)
    times.append(time.perf_counter() - start)
model.sums()
print(json.dumps({"median_s": statistics.median(times), "threads": torch.get_num_threads()}))
"""


def measure(checkout: Path, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(checkout.resolve()), str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", nargs=2, type=Path, required=True, metavar=("A", "B"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=6, help="timed updates per process")
    args = parser.parse_args(argv)
    a, b = args.checkouts
    print(f"A = {a}, B = {b}; batch 16, P = 4096, k = 100; median of {args.repeats} updates per process\n")
    print("| pair | A s per batch | B s per batch | A / B |")
    print("|---|---|---|---|")
    ratios = []
    for pair in range(1, args.pairs + 1):
        first, second = measure(a, args.repeats), measure(b, args.repeats)
        ratios.append(first["median_s"] / second["median_s"])
        print(f"| {pair} | {first['median_s']:.4f} | {second['median_s']:.4f} | {ratios[-1]:.2f} |")
    print(
        f"\nB is {statistics.median(ratios):.2f}× as fast as A (median of {len(ratios)} pairs, "
        f"{min(ratios):.2f} – {max(ratios):.2f}; {first['threads']} threads)"
    )


if __name__ == "__main__":
    main()
