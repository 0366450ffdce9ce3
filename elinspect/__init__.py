"""elinspect: Lightning + Hydra experiment suite for defect detection in industrial images."""

import os

# albumentations looks for a newer release over the network at import; runs stay offline
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
