"""RDDN — Reference-based Defect Detection Network (Zeng et al., IEEE TIP 2021; ``rddn.txt``).

Template reference at the image (TR-Pre), feature (TR-Inter) and region (TR-Post) level,
the pseudo template generator (PTG) for data without templates, on torchvision's Faster /
Cascade R-CNN with the context reference of :mod:`elinspect.models.detection.heads`.
"""

from elinspect.models.detection.rddn.detector import (
    TEMPLATE_MODES,
    RddnFasterRCNN,
    build_rddn,
    extra_inputs_of,
)
from elinspect.models.detection.rddn.module import MissingReferenceError, RddnModule
from elinspect.models.detection.rddn.post import (
    TemplatePostScorer,
    template_post_factor,
    template_post_rescore,
)
from elinspect.models.detection.rddn.ptg import PseudoTemplateGenerator, StageGenerator
from elinspect.models.detection.rddn.template_reference import ReferenceTransform, template_difference
from elinspect.models.schedules import warmup_multistep_lr

__all__ = [
    "TEMPLATE_MODES",
    "MissingReferenceError",
    "PseudoTemplateGenerator",
    "RddnFasterRCNN",
    "RddnModule",
    "ReferenceTransform",
    "StageGenerator",
    "TemplatePostScorer",
    "build_rddn",
    "extra_inputs_of",
    "template_difference",
    "template_post_factor",
    "template_post_rescore",
    "warmup_multistep_lr",
]
