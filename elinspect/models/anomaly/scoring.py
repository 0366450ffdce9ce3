"""Anomaly scores must be finite: :func:`check_finite_scores` names the images whose are not.

Used by :class:`~elinspect.models.anomaly.base.AnomalyModule` on every val/test batch and by
GAN-AE's calibration epoch.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteScoreError(RuntimeError):
    """An anomaly score is NaN or infinite: every metric and threshold built on it would be wrong."""


def check_finite_scores(
    scores: Tensor, batch: dict[str, Tensor], what: str, selected: Tensor | None = None
) -> None:
    """Raise :class:`NonFiniteScoreError` naming the batch's images whose ``scores`` are not finite.

    ``selected``: a boolean mask over the batch when ``scores`` belong to those items only.

    A NaN dropped silently (``CatMetric``'s default) would leave its label behind and shift
    every later pair; a NaN skipped by a percentile would set a threshold on fewer images.
    """
    bad = ~torch.isfinite(scores.detach())
    if not bool(bad.any()):
        return
    values = [float(v) for v in scores.detach()[bad][:5]]
    items = torch.arange(len(batch["image"])) if selected is None else selected.cpu().nonzero().flatten()
    rows = items[bad.cpu()].tolist()
    if "path" in batch:
        names = [str(batch["path"][i]) for i in rows]
    elif "index" in batch:
        names = [f"dataset row {int(batch['index'][i])}" for i in rows]
    else:
        names = [f"batch item {i}" for i in rows]
    raise NonFiniteScoreError(
        f"{what}: non-finite anomaly score ({', '.join(map(str, values))}) for "
        f"{len(rows)} image(s): {', '.join(names[:10])}{' …' if len(names) > 10 else ''}. Check these "
        "images (constant or corrupt ones can give a zero SSIM or variance) and the model's losses"
    )
