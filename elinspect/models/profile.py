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
