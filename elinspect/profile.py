"""Parameters, memory and time of a configured model, per module and per module group:

    python -m elinspect.profile model=ebba                       # parameters per module
    python -m elinspect.profile model=rddn --image-size 800 --time   # RDDN Table VIII's columns

The model is the one ``python -m elinspect.train <overrides>`` would train (built by
:func:`~elinspect.models.build.build_model` for ``--classes`` placeholder classes); what is
measured is :mod:`elinspect.models.profile`'s.
"""

from __future__ import annotations

import argparse
import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from rich.console import Console
from rich.table import Table
from torch import nn

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.data.info import DatasetInfo
from elinspect.models.build import build_model, effective_loss_config
from elinspect.models.profile import group_table, parameter_table, profile_groups, profile_inputs
from elinspect.utils.errors import user_errors
from elinspect.utils.paths import CONFIG_DIR


def build_for_profile(overrides: list[str], num_classes: int | None = None) -> nn.Module:
    """The model ``python -m elinspect.train <overrides>`` would train, for ``num_classes``
    classes (no dataset needed: class names and counts are placeholders; None: 2 for an
    anomaly model, normal and defective, 5 for the others, EBBA's)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train.yaml", overrides=overrides)
    task = get_class(cfg.model._target_).task
    if num_classes is None:
        num_classes = 2 if task == "anomaly" else 5
    info = DatasetInfo(
        task=task,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        in_channels=3,
        class_counts=(1,) * num_classes,
    )
    return build_model(cfg.model, effective_loss_config(cfg), info)


def main(argv: list[str] | None = None) -> None:
    """``python -m elinspect.profile model=rddn [--classes 5] [--image-size 800] [--batch 1]
    [--time] [--runs 3] [--device cpu] [--threads N] [--depth 3] [--params-only] [overrides…]``"""
    parser = argparse.ArgumentParser(
        description="Parameters per module, and parameters / memory / time per module group "
        "(RDDN Table VIII), of a configured model."
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m elinspect.train")
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help="number of classes (default: 2 for anomaly models, else 5, EBBA's)",
    )
    parser.add_argument("--depth", type=int, default=3, help="module-path depth of the parameter table")
    parser.add_argument(
        "--params-only", action="store_true", help="only the parameter table (no forward pass)"
    )
    parser.add_argument("--image-size", type=int, default=800, help="side of the square random input images")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--time", action="store_true", help="also time each group's forward")
    parser.add_argument("--runs", type=int, default=3, help="timed passes, after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with user_errors({}):
        model = build_for_profile(args.overrides, args.classes)
    name = " ".join(args.overrides) or "the default model"
    # wide enough for the group table's columns when the output is a file or a pipe (80 by default)
    console = Console(width=None if sys.stdout.isatty() else 140)

    rows = parameter_table(model, depth=args.depth)
    total = sum(n for _, n in rows)
    table = Table(title=f"parameters of {name} ({len(model.class_names)} classes)")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for path, n in rows:
        table.add_row(path, f"{n / 1e6:.3f} M", f"{100 * n / total:.1f} %")
    table.add_row("total", f"{total / 1e6:.2f} M", "100 %", style="bold")
    console.print(table)
    if args.params_only:
        return

    device = torch.device(args.device)
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, args.image_size, args.image_size, generator=generator).to(device)
        for _ in range(args.batch)
    ]
    network, call_args, call_kwargs = profile_inputs(model, images)
    groups = profile_groups(network, call_args, call_kwargs, time_it=args.time, runs=args.runs)
    console.print(
        group_table(
            groups,
            title=f"{name}: per module group, {args.batch} × {args.image_size}² input, eval mode, {device}",
        )
    )
    console.print(
        "Paras: the RDDN paper's Table VIII convention, parameters and their gradients (8 bytes per "
        "parameter; param MiB is the weights alone). "
        "activations: tensors autograd saves for backward during the group's forward; outputs: tensors "
        "the group returns; peak: CUDA allocator peak above the group's start (not measurable on CPU); "
        f"time: mean of {args.runs} no-grad passes after 1 warm-up, exclusive of nested groups. "
        "The model's transform resizes the input (min_size / max_size)."
        if args.time
        else "activations: tensors autograd saves for backward during the group's forward; outputs: tensors "
        "the group returns; peak: CUDA allocator peak above the group's start (not measurable on CPU). "
        "Add --time for forward times."
    )


if __name__ == "__main__":
    main()
