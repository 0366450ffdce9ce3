"""Every model feeds a pretrained backbone the input normalisation its weights were trained with.

The EfficientNet-Lite weights come from TensorFlow's Lite checkpoints, which take pixels mapped
to [-1, 1] ((x - 0.5) / 0.5: timm's ``tf_efficientnet_lite*`` pretrained config, TF's
``(x - 127) / 128``); torchvision's ResNet weights take ImageNet's mean and std. A model that
normalises a Lite's input with ImageNet's statistics still classifies the check photos, so
nothing fails loudly: the first layers just see inputs about 2.2× too large. These tests hold
each model family (classifier, SeMaCNN's heatmap classifier, PaDiM, the detectors, RDDN's
TR-Pre) to the publisher's numbers.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models import get_model_weights

from elinspect.models.anomaly.padim import Padim
from elinspect.models.backbones import EFFICIENTNET_LITES, RESNETS, input_normalisation
from elinspect.models.backbones import efficientnet_lite as lite
from elinspect.models.classification import ImageClassifier
from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.rddn.detector import build_rddn


def published(name: str) -> tuple[list[float], list[float]]:
    """The mean and std the weights' publisher states: timm's pretrained config for the TF
    Lite checkpoints, torchvision's weights' own transforms for the ResNets."""
    if name in EFFICIENTNET_LITES:
        cfg = timm.models.get_pretrained_cfg(lite.timm_name(name))
        return list(cfg.mean), list(cfg.std)
    transforms = get_model_weights(name).IMAGENET1K_V1.transforms()
    return list(transforms.mean), list(transforms.std)


def flat(t: torch.Tensor | list[float]) -> list[float]:
    return [round(float(v), 6) for v in torch.as_tensor(t).flatten()]


@pytest.mark.parametrize("name", RESNETS + EFFICIENTNET_LITES)
def test_each_backbone_names_its_weights_normalisation(name: str) -> None:
    mean, std = input_normalisation(name)
    assert (flat(mean), flat(std)) == tuple(flat(v) for v in published(name))


def test_the_lite_weights_take_inputs_in_minus_one_to_one() -> None:
    mean, std = input_normalisation("efficientnet_lite0")
    zero_one = torch.tensor([0.0, 1.0])
    assert flat((zero_one - mean[0]) / std[0]) == [-1.0, 1.0]


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_the_classifier_normalises_as_its_backbone_weights(arch: str) -> None:
    net = ImageClassifier(num_classes=2, arch=arch, weights=None)
    assert (flat(net.mean), flat(net.std)) == tuple(flat(v) for v in published(arch))


def test_a_grey_cell_classifies_alike_through_the_one_channel_stem_and_as_rgb() -> None:
    """The one-channel stem sums the RGB filters (timm's ``adapt_input_conv``); with the Lite's
    equal per-channel statistics that is exactly the RGB network on the grey image repeated,
    provided the one channel is normalised as the three were."""
    torch.manual_seed(0)
    rgb = ImageClassifier(num_classes=1000, arch="efficientnet_lite0", weights="imagenet").eval()
    grey = ImageClassifier(
        num_classes=1000, arch="efficientnet_lite0", weights="imagenet", in_channels=1
    ).eval()
    grey.net.classifier.load_state_dict(rgb.net.classifier.state_dict())
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = rgb(image.expand(-1, 3, -1, -1)).logits
        got = grey(image).logits
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_padim_normalises_as_its_backbone_weights(backbone: str) -> None:
    padim = Padim(backbone=backbone, layers=(1, 2), weights=None, feature_size=8, k=8)
    assert (flat(padim.norm_mean), flat(padim.norm_std)) == tuple(flat(v) for v in published(backbone))


DETECTOR = {
    "neck": {"name": "fpn", "out_channels": 16},
    "anchor_sizes": [[16], [32], [64], [128], [256]],
    "min_size": 64,
    "max_size": 64,
}


@pytest.mark.parametrize(
    ("backbone", "arch"),
    [({"name": "efficientnet_lite0"}, "efficientnet_lite0"), ({"depth": 18}, "resnet18")],
)
def test_the_detectors_normalise_as_their_backbone_weights(backbone: dict, arch: str) -> None:
    model = build_faster_rcnn(3, {**backbone, "weights": None}, **DETECTOR)
    assert (flat(model.transform.image_mean), flat(model.transform.image_std)) == tuple(
        flat(v) for v in published(arch)
    )


def test_a_given_detector_normalisation_is_kept() -> None:
    model = build_faster_rcnn(
        3,
        {"name": "efficientnet_lite0", "weights": None},
        image_mean=[0.1] * 3,
        image_std=[0.2] * 3,
        **DETECTOR,
    )
    assert flat(model.transform.image_mean) == [0.1] * 3 and flat(model.transform.image_std) == [0.2] * 3


def test_rddn_tr_pre_scales_the_difference_by_the_lite_weights_std() -> None:
    """TR-Pre: (I − T) / (2 · std) with the standard pre-processing's std (RDDN eq. 7), which
    for a Lite body maps a full-range difference onto the [-1, 1] its first layer expects."""
    model = build_rddn(3, {"name": "efficientnet_lite0", "weights": None}, template="pre", **DETECTOR)
    image, template = torch.ones(3, 64, 64), torch.zeros(3, 64, 64)
    out = model.transform.normalize(torch.cat([image, template]))
    assert flat(out.unique()) == [1.0]


# --- checkpoints written before the fix keep the normalisation they were trained with ---------
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_a_padim_state_dict_carries_its_normalisation() -> None:
    padim = Padim(backbone="efficientnet_lite0", layers=(1, 2), weights=None, feature_size=8, k=8)
    state = padim.state_dict()
    assert flat(state["norm_mean"]) == [0.5] * 3 and flat(state["norm_std"]) == [0.5] * 3


def test_a_padim_fitted_before_the_fix_keeps_imagenet_normalisation_when_loaded() -> None:
    """Its Gaussians were fitted on features of ImageNet-normalised inputs; scoring it with
    the Lite's own normalisation would be silently wrong."""
    old = Padim(backbone="efficientnet_lite0", layers=(1, 2), weights=None, feature_size=8, k=8)
    state = {k: v for k, v in old.state_dict().items() if k not in ("norm_mean", "norm_std")}
    new = Padim(backbone="efficientnet_lite0", layers=(1, 2), weights=None, feature_size=8, k=8)
    new.load_state_dict(state)
    assert (flat(new.norm_mean), flat(new.norm_std)) == (IMAGENET[0], IMAGENET[1])


def tiny_detection_module():
    from functools import partial

    from elinspect.data.info import DatasetInfo
    from elinspect.models.detection.module import DetectionModule

    detector = partial(
        build_faster_rcnn, backbone={"name": "efficientnet_lite0", "weights": None}, **DETECTOR
    )
    info = DatasetInfo(task="detection", class_names=("a", "b"), in_channels=3)
    return DetectionModule(detector, info, optimizer=partial(torch.optim.SGD, lr=0.01))


def test_a_detector_checkpoint_restores_its_normalisation() -> None:
    module = tiny_detection_module()
    module.model.transform.image_mean, module.model.transform.image_std = [0.1] * 3, [0.2] * 3
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh = tiny_detection_module()
    fresh.on_load_checkpoint(checkpoint)
    assert flat(fresh.model.transform.image_mean) == [0.1] * 3
    assert flat(fresh.model.transform.image_std) == [0.2] * 3


def test_a_detector_trained_before_the_fix_keeps_imagenet_normalisation_when_loaded() -> None:
    module = tiny_detection_module()
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    checkpoint["elinspect"].pop("image_normalisation", None)  # as written before the fix
    module.on_load_checkpoint(checkpoint)
    assert (flat(module.model.transform.image_mean), flat(module.model.transform.image_std)) == IMAGENET


def test_a_detector_saved_before_the_fix_with_its_own_normalisation_in_its_config_keeps_it() -> None:
    """Its config's ``image_mean`` / ``image_std`` built the transform it was trained with, as
    they build the one being loaded: nothing is replaced."""
    module = tiny_detection_module()
    module.model.transform.image_mean, module.model.transform.image_std = [0.1] * 3, [0.2] * 3
    module.run_config = {"model": {"detector": {"image_mean": [0.1] * 3, "image_std": [0.2] * 3}}}
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    checkpoint["elinspect"].pop("image_normalisation")  # as written before the fix
    module.on_load_checkpoint(checkpoint)
    assert flat(module.model.transform.image_mean) == [0.1] * 3
    assert flat(module.model.transform.image_std) == [0.2] * 3
