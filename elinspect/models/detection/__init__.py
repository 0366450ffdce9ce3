"""Supervised defect detectors built on torchvision's Faster R-CNN (DESIGN §1)."""

from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.module import DetectionModule

__all__ = ["DetectionModule", "build_faster_rcnn"]
