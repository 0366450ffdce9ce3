"""Parameter counts of a model, grouped by module path (for comparing necks, e.g. EBBA Table 3's ablation).

The EBBA paper reports 62.74 M parameters for its detector (§4.C); grouping a built
detector's parameters by module shows where they sit (backbone body, neck, RPN, ROI heads).
"""

from __future__ import annotations

from torch import nn


def parameter_table(model: nn.Module, depth: int = 2, trainable_only: bool = False) -> list[tuple[str, int]]:
    """Number of parameters per module path, truncated to ``depth`` dotted components.

    ``backbone.body.layer1.0.conv1.weight`` counts towards ``backbone.body`` at depth 2.
    A parameter whose path is at most ``depth`` components long keeps its full name
    (``neck.balanced_attention.level_logits`` at depth 3). Rows come in module order;
    a shared parameter is counted once, so the rows sum to the model's parameter count.

    Args:
        model: any module.
        depth: number of leading name components to group by (>= 1).
        trainable_only: count only parameters with ``requires_grad``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rows: dict[str, int] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        key = ".".join(name.split(".")[:depth])
        rows[key] = rows.get(key, 0) + param.numel()
    return list(rows.items())


def build_for_profile(overrides: list[str], num_classes: int) -> nn.Module:
    """The model ``python -m elinspect.train <overrides>`` would train, for ``num_classes``
    classes (no dataset needed: class names and counts are placeholders)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class, instantiate

    import elinspect.utils.resolvers  # noqa: F401
    from elinspect.data.info import DatasetInfo
    from elinspect.utils.build import CONFIG_DIR, build_loss, effective_loss_config, model_config

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train.yaml", overrides=overrides)
    info = DatasetInfo(
        task=get_class(cfg.model._target_).task,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        in_channels=3,
        class_counts=(1,) * num_classes,
    )
    loss = build_loss(effective_loss_config(cfg), info)
    return instantiate(model_config(cfg), dataset=info.to_dict(), loss=loss, _convert_="all")


def main(argv: list[str] | None = None) -> None:
    """``python -m elinspect.models.profile model=ebba [--classes 5] [--depth 3] [overrides…]``"""
    import argparse

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description="Parameter counts per module of a configured model.")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m elinspect.train")
    parser.add_argument("--classes", type=int, default=5, help="number of classes (default 5, EBBA's)")
    parser.add_argument("--depth", type=int, default=3, help="module-path depth to group by")
    args = parser.parse_args(argv)
    model = build_for_profile(args.overrides, args.classes)
    rows = parameter_table(model, depth=args.depth)
    total = sum(n for _, n in rows)
    table = Table(
        title=f"parameters of {' '.join(args.overrides) or 'the default model'} ({args.classes} classes)"
    )
    table.add_column("module")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for name, n in rows:
        table.add_row(name, f"{n / 1e6:.3f} M", f"{100 * n / total:.1f} %")
    table.add_row("total", f"{total / 1e6:.2f} M", "100 %", style="bold")
    Console().print(table)


if __name__ == "__main__":
    main()
