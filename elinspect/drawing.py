"""Drawing on images: what the visual callbacks save during training and what ``predict`` and
``explain`` write. Every function returns a uint8 3×H×W tensor (torchvision's picture layout)."""

from __future__ import annotations

import matplotlib
import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

GT_COLOUR = "lime"
DIFFICULT_COLOUR = "yellow"
PRED_COLOUR = "red"


def draw_detections(
    image: Tensor,
    target: dict[str, Tensor] | None,
    pred: dict[str, Tensor] | None,
    class_names: list[str] | None = None,
    score_threshold: float = 0.3,
) -> Tensor:
    """``image`` (C×H×W float in [0, 1] or uint8) with ground-truth and predicted boxes, as uint8 3×H×W."""
    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)

    def name(label: int) -> str:
        if class_names and 1 <= label <= len(class_names):
            return class_names[label - 1]
        return str(label)

    if target is not None and len(target["boxes"]):
        difficult = target.get("difficult")
        difficult = [False] * len(target["boxes"]) if difficult is None else difficult.tolist()
        image = draw_bounding_boxes(
            image,
            target["boxes"].detach().cpu().float(),
            labels=[name(int(label)) for label in target["labels"]],
            colors=[DIFFICULT_COLOUR if d else GT_COLOUR for d in difficult],
            width=2,
        )
    if pred is not None:
        keep = pred["scores"] >= score_threshold
        if keep.any():
            image = draw_bounding_boxes(
                image,
                pred["boxes"][keep].detach().cpu().float(),
                labels=[
                    f"{name(int(label))} {float(score):.2f}"
                    for label, score in zip(pred["labels"][keep], pred["scores"][keep], strict=True)
                ],
                colors=PRED_COLOUR,
                width=2,
            )
    return image


def heatmap_overlay(
    image: Tensor, heatmap: Tensor, vmax: float, alpha: float = 0.5, cmap: str = "jet"
) -> Tensor:
    """uint8 3×H×(2W): the image (C×H×W in [0, 1]) beside its blend with ``heatmap`` (1×H×W or
    H×W, coloured on the scale 0 … ``vmax``)."""
    grey = image.detach().cpu().float().clamp(0, 1).mean(dim=0)
    level = (heatmap.detach().cpu().float().reshape(grey.shape) / max(vmax, 1e-12)).clamp(0, 1)
    colour = torch.from_numpy(matplotlib.colormaps[cmap](level.numpy())[..., :3]).permute(2, 0, 1).float()
    rgb = grey.expand(3, -1, -1)
    blend = (1 - alpha) * rgb + alpha * colour
    return (torch.cat([rgb, blend], dim=2) * 255).round().to(torch.uint8)
