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

Protocol: ``bench_detection.py``'s (its ``interleaved`` and ``pair_ratios``): one warm-up round
discarded, then ``--repeats`` rounds of one call per variant, the order reversed every other
round; per round the ratio variant / §5; the table gives the median of those ratios with their
range, from wall-clock and from this process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import statistics

import hydra
import torch
from bench_detection import Bench, inference, interleaved, pair_ratios, train_step
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.data.detection_dataset import DetectionDataset, detection_collate
from elinspect.models.build import build_model, effective_loss_config
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


Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]  # images, loader targets


def build_variant(name: str, cfg: DictConfig) -> tuple[Bench, Batch]:
    """The variant's module and SGD as a :class:`bench_detection.Bench`, and its training batch."""
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    torch.manual_seed(0)
    module = build_model(cfg.model, effective_loss_config(cfg), dm.info)
    # the module's own SGD over its trainable parameters (its schedule would need a Trainer)
    optimizer = module.optimizer_factory(params=[p for p in module.parameters() if p.requires_grad])
    params_m = sum(p.numel() for p in module.parameters()) / 1e6
    backbone = cfg.model.detector.backbone
    bench = Bench(name, backbone.name, backbone.weights, module, optimizer, params_m)
    hp = dm.hparams
    dataset = DetectionDataset(dm.records["train"][:BATCH], image_size=hp.image_size, resize=hp.resize)
    images, targets = detection_collate([dataset[i] for i in range(BATCH)])
    return bench, (list(images), targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6, help="kept rounds (median of per-round ratios)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    built = [build_variant(name, compose_config(o)) for name, o in VARIANTS.items()]
    group, batches = [b for b, _ in built], {b.name: batch for b, batch in built}
    interleaved(group, "train", lambda b: train_step(b, *batches[b.name]), 1, args.repeats)
    interleaved(group, "infer", lambda b: inference(b, batches[b.name][0]), 1, args.repeats)

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
    for bench in group:
        cells = []
        for phase in ("train", "infer"):
            median = statistics.median(getattr(bench, phase)["s"])
            ratios = pair_ratios(bench, base, phase, "s")
            cpu = pair_ratios(bench, base, phase, "cpu")
            cells += [
                f"{median:.2f}",
                f"{BATCH / median:.1f}",
                f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}); "
                f"{statistics.median(cpu):.2f}",
            ]
        print(f"| {bench.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
