"""What each speed setting of experiments/real_data.md §5.3 saves: faster_rcnn under
``experiment=neu_det``, timed against §5's settings, interleaved in one process.

    .venv/bin/python experiments/bench_neu_det_settings.py [--repeats 6]

Variants (each is ``experiment=neu_det`` plus its overrides, composed from ``conf/`` and built
as ``python -m elinspect.train`` builds them, with the NEU-DET datamodule's classes):

- §5: 256 px (the 200-px images upsampled), 128 RoIs per image, no backbone stage frozen;
- 200 px: the images at their own size (``data.image_size`` and the detector's min/max size);
- 64 RoIs: ``model.detector.box_batch_size_per_image=64``;
- frozen stem and stage 1: ``model.detector.backbone.frozen_stages=2`` (torchvision's default
  for pretrained detectors: ``trainable_backbone_layers=3``);
- §5.3: all three.

Timed: one training step on the first 8 training images (the batch size of the runs), resized
as the loader resizes them, without augmentation — the model's losses, ``zero_grad``,
``backward`` and the module's own SGD step — and one inference call on the same 8 images in eval
mode (the validation and test work). Not timed: the loader, Lightning's loop, logging.

Protocol: one warm-up round discarded, then ``--repeats`` rounds of one call per variant, the
order reversed every other round; per round the ratio variant / §5; the table gives the median
of those ratios with their range, from wall-clock and from this process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import hydra
import torch
from bench_detection import Clock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.data.detection_dataset import DetectionDataset, detection_collate
from elinspect.models.build import build_model, effective_loss_config
from elinspect.models.detection.module import model_targets
from elinspect.utils.paths import CONFIG_DIR

PX200 = ["data.image_size=200", "model.detector.min_size=200", "model.detector.max_size=200"]
ROIS64 = ["model.detector.box_batch_size_per_image=64"]
FROZEN2 = ["model.detector.backbone.frozen_stages=2"]
VARIANTS = {
    "§5: 256 px, 128 RoIs, nothing frozen": [],
    "200 px": PX200,
    "64 RoIs": ROIS64,
    "stem and stage 1 frozen": FROZEN2,
    "§5.3: all three": PX200 + ROIS64 + FROZEN2,
}
BATCH = 8


def compose_config(overrides: list[str]) -> DictConfig:
    """The train config of ``experiment=neu_det`` plus ``overrides``, as the command line composes it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train.yaml", overrides=["experiment=neu_det", *overrides])


class Variant:
    """One configuration: its module, optimiser, batch and timings."""

    def __init__(self, cfg: DictConfig) -> None:
        dm = hydra.utils.instantiate(cfg.data, _convert_="all")
        torch.manual_seed(0)
        self.module = build_model(cfg.model, effective_loss_config(cfg), dm.info)
        # the module's own SGD over its trainable parameters (the schedule needs a Trainer)
        self.optimizer = self.module.optimizer_factory(
            params=[p for p in self.module.parameters() if p.requires_grad]
        )
        hp = dm.hparams
        dataset = DetectionDataset(dm.records["train"][:BATCH], image_size=hp.image_size, resize=hp.resize)
        self.images, targets = detection_collate([dataset[i] for i in range(BATCH)])
        self.targets = model_targets(targets)
        self.times: dict[str, dict[str, list[float]]] = {
            p: {"wall": [], "cpu": []} for p in ("train", "infer")
        }

    def train_step(self) -> Clock:
        self.module.train()
        with Clock() as clock:
            loss = sum(self.module.model(list(self.images), self.targets).values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return clock

    def infer(self) -> Clock:
        self.module.eval()
        with Clock() as clock, torch.no_grad():
            self.module.model(list(self.images))
        return clock

    def call(self, phase: str) -> Clock:
        return self.train_step() if phase == "train" else self.infer()


def interleave(group: list[Variant], phase: str, repeats: int) -> None:
    """One warm-up round, then ``repeats`` kept rounds of one ``phase`` call per variant, the
    order reversed every other round."""
    for r in range(1 + repeats):
        for v in group if r % 2 == 0 else group[::-1]:
            clock = v.call(phase)
            if r:
                v.times[phase]["wall"].append(clock.wall)
                v.times[phase]["cpu"].append(clock.cpu)
        print(f"{phase} round {r + 1}/{1 + repeats}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6, help="kept rounds (median of per-round ratios)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    variants = {name: Variant(compose_config(o)) for name, o in VARIANTS.items()}
    group = list(variants.values())
    for phase in ("train", "infer"):
        interleave(group, phase, args.repeats)

    base = group[0]
    print(
        f"command: `python experiments/bench_neu_det_settings.py --repeats {args.repeats}`; "
        f"load average {load:.1f} at the start; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU float32; batch {BATCH}; 1 warm-up round, "
        f"{args.repeats} interleaved rounds\n"
    )
    print(
        "| settings | train step s (median) | train images/s | ratio to §5, wall (range); CPU "
        "| inference s (median) | inference images/s | ratio to §5, wall (range); CPU |"
    )
    print("|---|---:|---:|---|---:|---:|---|")
    for name, v in variants.items():
        cells = []
        for phase in ("train", "infer"):
            wall = v.times[phase]["wall"]
            ratios = [a / b for a, b in zip(wall, base.times[phase]["wall"], strict=True)]
            cpu = [a / b for a, b in zip(v.times[phase]["cpu"], base.times[phase]["cpu"], strict=True)]
            median = statistics.median(wall)
            cells += [
                f"{median:.2f}",
                f"{BATCH / median:.1f}",
                f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}); "
                f"{statistics.median(cpu):.2f}",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
