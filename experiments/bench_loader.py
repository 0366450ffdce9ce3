"""Images/s of a configured run's training loader alone (augmentation on, the config's workers).

    python experiments/bench_loader.py experiment=neu_det            # any train overrides
    python experiments/bench_loader.py experiment=neu_det --batches 120

The datamodule is the one ``python -m elinspect.train <overrides>`` would build; nothing else
runs, so the rate is what the loader can deliver, to set beside the images/s a training step
consumes (the run's progress lines). ``num_workers: auto`` resolves as in a run on this machine
(one training process). Prints one Markdown line.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess

import hydra
from bench_detection import loader_rate
from hydra import compose, initialize_config_dir

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.utils.paths import CONFIG_DIR


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train config overrides (experiment=neu_det ...)")
    parser.add_argument("--batches", type=int, default=60, help="timed batches after the first")
    args = parser.parse_args()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train.yaml", overrides=args.overrides)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    workers = dm.loader_settings()["num_workers"]
    first, rate = loader_rate(dm, args.batches)
    print(
        f"train loader of `{' '.join(args.overrides)}` ({len(dm.dataset('train'))} images, batch "
        f"{cfg.data.batch_size}, {workers} worker(s)): **{rate:.1f} images/s** over {args.batches} batches "
        f"(first batch {first:.1f} s); commit {commit()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
