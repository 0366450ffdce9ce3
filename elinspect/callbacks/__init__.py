"""Lightning callbacks of elinspect (configured in ``conf/callbacks/``)."""

from elinspect.callbacks.detection_visuals import DetectionVisualsCallback, draw_detections

__all__ = ["DetectionVisualsCallback", "draw_detections"]
