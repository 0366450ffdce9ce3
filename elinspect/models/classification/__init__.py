"""Supervised image classification (the SeMaCNN paper's CNN baseline)."""

from elinspect.models.classification.classifier import ImageClassifier
from elinspect.models.classification.module import ClassifierModule

__all__ = ["ClassifierModule", "ImageClassifier"]
