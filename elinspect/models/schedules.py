"""Linear warm-up, then step decay: the detection schedule of mmdetection and torchvision's
references, which RDDN's paper uses (``rddn.txt`` §III.C.5) and any model may take.

RDDN: "We train models for 24 epochs, and decay the learning rate by 10 times at 16th and 22th
epochs. We adopt a linear warmup strategy at the first 500 training iterations" — the
mmdetection schedule the paper borrows its values from. Built from torch's own schedulers:
a :class:`~torch.optim.lr_scheduler.ChainedScheduler` of
:class:`~torch.optim.lr_scheduler.LinearLR` (factor ``warmup_factor`` → 1 over
``warmup_iters`` steps) and :class:`~torch.optim.lr_scheduler.MultiStepLR`, both stepped
every iteration (``scheduler_interval: step``), so the learning rate is
``lr · warmup(t) · gamma^(number of milestones ≤ t)`` at iteration ``t``. (A
``SequentialLR`` would restart the step decay's count after the warm-up and shift every
milestone by ``warmup_iters``.)

Milestones in epochs become iterations through ``steps_per_epoch``, which every
:class:`~elinspect.models.base.ElinspectModule` reads off the trainer when training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR


def warmup_multistep_lr(
    optimizer: torch.optim.Optimizer,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_factor: float = 1.0 / 3.0,
    milestone_unit: Literal["epoch", "step"] = "epoch",
    steps_per_epoch: int | None = None,
) -> ChainedScheduler:
    """Linear warm-up over ``warmup_iters`` iterations chained with a step decay at ``milestones``.

    Args:
        optimizer: the optimiser whose learning rates are scheduled.
        milestones: when to multiply the learning rate by ``gamma``.
        gamma: the decay factor (RDDN: 0.1).
        warmup_iters: length of the linear warm-up in iterations (RDDN: 500; 0 = none).
        warmup_factor: learning-rate factor at iteration 0 (the paper does not give it;
            1/3 is mmdetection's ``warmup_ratio`` of that time).
        milestone_unit: ``"epoch"`` (milestones × ``steps_per_epoch``) or ``"step"``.
        steps_per_epoch: optimiser steps per epoch; needed for ``milestone_unit="epoch"``.
    """
    if milestone_unit not in ("epoch", "step"):
        raise ValueError(f"milestone_unit must be 'epoch' or 'step', got {milestone_unit!r}")
    if milestone_unit == "epoch":
        if steps_per_epoch is None or steps_per_epoch < 1:
            raise ValueError(
                "milestone_unit='epoch' needs steps_per_epoch >= 1 (every ElinspectModule passes it when training "
                f"starts), got {steps_per_epoch}"
            )
        steps = [int(m) * int(steps_per_epoch) for m in milestones]
    else:
        steps = [int(m) for m in milestones]
    if warmup_iters < 0 or not 0.0 < warmup_factor <= 1.0:
        raise ValueError(
            f"need warmup_iters >= 0 and 0 < warmup_factor <= 1, got {warmup_iters}, {warmup_factor}"
        )
    warmup = LinearLR(
        optimizer,
        start_factor=warmup_factor if warmup_iters > 0 else 1.0,
        end_factor=1.0,
        total_iters=max(int(warmup_iters), 1),
    )
    decay = MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    return ChainedScheduler([warmup, decay], optimizer=optimizer)
