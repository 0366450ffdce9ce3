"""A frozen backbone folded for inference (batch norms into convolutions, "same" padding into
the kernel) gives the outputs of the network before; a state dict saved before folding loads."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from elinspect.models.anomaly import padim as padim_module
from elinspect.models.anomaly.padim import Padim
from elinspect.models.backbones import build_body
from elinspect.models.backbones.folding import SamePaddingConv2d, fold_for_inference


def randomise_batch_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm statistics and an affine far from the identity, so that a fold
    that ignored one would show."""
    g = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=g))
            module.running_var.copy_(0.2 + torch.rand(n, generator=g))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            module.bias.data.copy_(torch.randn(n, generator=g))
    return net.eval()


@pytest.mark.parametrize("size", [(64, 64), (65, 65), (57, 70), (31, 30)])
@pytest.mark.parametrize(
    ("kernel", "stride", "groups"), [(3, 2, 1), (5, 2, 8), (3, 2, 8), (5, 1, 1), (1, 2, 1)]
)
def test_same_padding_in_the_kernel_equals_timms_padded_copy(
    size: tuple[int, int], kernel: int, stride: int, groups: int
) -> None:
    torch.manual_seed(0)
    reference = Conv2dSame(8, 16, kernel, stride=stride, groups=groups, bias=True)
    conv = SamePaddingConv2d.from_conv(reference)
    x = torch.randn(2, 8, *size)
    expected = reference(x)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert conv.weight is reference.weight  # shared, not copied


@pytest.mark.parametrize(
    ("name", "stages"), [("efficientnet_lite0", (1, 2, 3)), ("resnet18", (1, 2, 3, 4)), ("resnet50", (2, 4))]
)
def test_a_folded_body_has_no_batch_norm_left_and_gives_the_same_maps(
    name: str, stages: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    body, _ = build_body(name, None, norm_layer="bn", stages=stages)
    randomise_batch_norms(body)
    before = copy.deepcopy(body)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    pairs = fold_for_inference(body, torch.randn(1, 3, 64, 64))
    assert len(pairs) == norms > 0
    assert not any(isinstance(m, (nn.BatchNorm2d, Conv2dSame)) for m in body.modules())
    x = torch.randn(2, 3, 75, 98)  # odd sizes: the paddings differ from the probe's
    with torch.no_grad():
        expected, got = before(x), body(x)
    assert list(got) == list(expected)
    for key in expected:
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4 * scale)
    if name.startswith("efficientnet"):  # its strided convs pad in the kernel
        assert any(isinstance(m, SamePaddingConv2d) for m in body.modules())


class NormFirst(nn.Module):
    """A conv registered before a batch norm that reads the *input*, not the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def test_a_network_whose_batch_norm_does_not_follow_its_conv_is_left_as_it_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    net = randomise_batch_norms(NormFirst())
    conv, norm = net.conv, net.norm
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        expected = net(x)
        assert fold_for_inference(net, x) == []
        torch.testing.assert_close(net(x), expected)
    assert net.conv is conv and net.norm is norm
    assert "not folded" in caplog.text


def test_folding_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_for_inference(NormFirst().train(), torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_a_padim_saved_before_folding_loads_and_scores_as_it_did(
    backbone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"backbone": backbone, "feature_size": 8, "k": 10, "blur_sigma": 0}
    torch.manual_seed(0)
    with monkeypatch.context() as patch:  # the module as it was built before folding existed
        patch.setattr(padim_module, "fold_for_inference", lambda net, probe: [])
        old = Padim(**options)
    randomise_batch_norms(old.extractor, seed=1)
    images = torch.rand(6, 3, 64, 64)
    old.update(images)
    old.finalize()
    state = old.state_dict()
    assert any("running_var" in key for key in state)

    torch.manual_seed(1)  # other random weights: all of them must come from the state dict
    new = Padim(**options)
    assert new.folded_pairs
    new.load_state_dict(state)  # strict: every batch-norm key is taken up by the fold
    assert not any("running_var" in key for key in new.state_dict())
    test = torch.rand(3, 3, 64, 64)
    expected, got = old(test), new(test)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got.score, expected.score, rtol=1e-3, atol=1e-3)
