"""Rich output: the config tree at start, the metrics table at the end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

FIRST = ("data", "model", "loss", "callbacks", "logger", "trainer", "paths", "extras")


def print_config_tree(
    cfg: DictConfig, save_to: str | Path | None = None, order: Sequence[str] = FIRST
) -> None:
    """Print the composed config as a tree (and save its text to ``save_to``)."""
    style = "dim"
    tree = rich.tree.Tree("CONFIG", style=style, guide_style=style)
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    for field in fields:
        branch = tree.add(field, style=style, guide_style=style)
        node = cfg[field]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        with open(save_to, "w") as f:
            rich.print(tree, file=f)


def metrics_table(metrics: Mapping[str, float], title: str, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption)
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right", style="bold")
    for name in sorted(metrics):
        table.add_row(name, f"{float(metrics[name]):.4f}")
    return table
