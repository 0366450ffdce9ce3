"""Lightning callbacks of elinspect (configured in ``conf/callbacks/``)."""

from elinspect.callbacks.detection_visuals import DetectionVisualsCallback

__all__ = ["DetectionVisualsCallback"]
