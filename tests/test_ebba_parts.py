"""The torch parts of the EBBA- and BAF-Detectors: cosine non-local attention, the B-A module,
the ``ebfpn`` / ``bafpn`` necks, SDFL, and the parameter table (EBBA §3.B–C, DESIGN §2).

Everything runs on CPU with random weights and tiny maps.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from elinspect.data.info import DatasetInfo
from elinspect.losses import ScaledDynamicFocalLoss, alpha_from_counts
from elinspect.models.backbones.resnet import build_resnet_body
from elinspect.models.build import build_loss
from elinspect.models.detection.attention import CosineNonLocalAttention, explicit_cosine_attention
from elinspect.models.detection.balanced_attention import BalancedAttention, resize_to
from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.necks import build_neck
from elinspect.models.detection.roi_heads import LOSS_KEYS
from elinspect.models.profile import parameter_table

R18_CHANNELS = [64, 128, 256, 512]
REPO_CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pyramid(sizes, channels=R18_CHANNELS, batch: int = 1, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (str(i), torch.randn(batch, c, h, w, generator=g))
        for i, (c, (h, w)) in enumerate(zip(channels, sizes, strict=True))
    )


EVEN = [(16, 24), (8, 12), (4, 6), (2, 3)]  # every level halves the one below exactly
ODD_97x131 = [(25, 33), (13, 17), (7, 9), (4, 5)]  # ResNet C2..C5 of a 97×131 image


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("temperature", ["fixed", "learnable"])
def test_sdpa_attention_equals_the_explicit_hw_by_hw_formulation(heads: int, temperature: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 7)  # non-square
    att = CosineNonLocalAttention(16, heads=heads, temperature=temperature)
    tau = 1.0
    if temperature == "learnable":
        with torch.no_grad():
            att.log_temperature.fill_(-1.5)  # a sharp softmax, so a wrong τ shows
        tau = torch.exp(torch.tensor(-1.5))
    torch.testing.assert_close(att(x), explicit_cosine_attention(x, heads, tau), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(att(x), x + x.mean(dim=(2, 3), keepdim=True), atol=1e-3)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_runs_on_the_fused_o_hw_memory_kernel(heads: int) -> None:
    """Only the flash kernel allowed: fails if the inputs fall back to the math kernel (HW×HW matrix)."""
    x = torch.randn(1, 16, 6, 9, requires_grad=True)
    att = CosineNonLocalAttention(16, heads=heads, temperature="learnable")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        att(x).sum().backward()
    assert x.grad is not None and att.log_temperature.grad is not None


def test_explicit_formulation_is_a_cosine_softmax_weighted_sum_plus_the_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 2, 3)
    rows = x[0].flatten(1).T  # HW × C
    expected = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        w = torch.softmax(F.cosine_similarity(rows[i : i + 1], rows, dim=1), dim=0)
        expected[i] = rows[i] + (w[:, None] * rows).sum(0)
    torch.testing.assert_close(explicit_cosine_attention(x, 1, 1.0)[0].flatten(1).T, expected)
    # two heads = attention on each half of the channels separately
    halves = torch.cat([explicit_cosine_attention(x[:, :3]), explicit_cosine_attention(x[:, 3:])], dim=1)
    torch.testing.assert_close(explicit_cosine_attention(x, 2), halves)


def test_learnable_temperature_gets_a_gradient_and_fixed_has_no_parameters() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 6)
    att = CosineNonLocalAttention(8, heads=2, temperature="learnable")
    assert att.log_temperature.detach().item() == 0.0 and float(att.tau.detach()) == 1.0
    att(x).square().sum().backward()
    assert att.log_temperature.grad is not None and att.log_temperature.grad.abs() > 0
    assert list(CosineNonLocalAttention(8, heads=2).parameters()) == []
    with pytest.raises(ValueError, match="heads"):
        CosineNonLocalAttention(10, heads=4)
    with pytest.raises(ValueError, match="temperature"):
        CosineNonLocalAttention(8, temperature="warm")


# ----------------------------------------------------------------------------- B-A module


def test_balanced_attention_weights_are_softmax_normalised_and_follow_the_formula() -> None:
    torch.manual_seed(0)
    ba = BalancedAttention(8, heads=2)
    with torch.no_grad():
        ba.level_logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    w = ba.level_weights()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, torch.softmax(ba.level_logits.detach(), 0))
    assert (w > 0).all()

    b = list(pyramid(ODD_97x131, [8] * 4).values())
    h = ba(b)
    size = b[1].shape[-2:]  # B3
    gathered = (
        w[0] * F.adaptive_max_pool2d(b[0], size)
        + w[1] * b[1]
        + w[2] * F.interpolate(b[2], size=size, mode="bilinear")
        + w[3] * F.interpolate(b[3], size=size, mode="bilinear")
    )
    f2 = explicit_cosine_attention(ba.refine(gathered), heads=2)
    for i in range(4):
        assert h[i].shape == b[i].shape
        torch.testing.assert_close(h[i], w[i] * resize_to(f2, b[i].shape[-2:]) + (1 - w[i]) * b[i])
    # the learnt weights get gradients through the fused map and the scatter
    sum(x.sum() for x in h).backward()
    assert ba.level_logits.grad is not None and ba.level_logits.grad.abs().sum() > 0


def test_resize_max_pools_down_and_interpolates_up_to_exact_sizes() -> None:
    x = torch.randn(1, 2, 8, 10)
    torch.testing.assert_close(resize_to(x, (4, 5)), F.max_pool2d(x, 2))  # exact halving = maxpool2
    assert resize_to(x, (3, 7)).shape[-2:] == (3, 7)
    torch.testing.assert_close(resize_to(x, (13, 17)), F.interpolate(x, (13, 17), mode="bilinear"))


# ----------------------------------------------------------------------------- necks


@pytest.mark.parametrize(
    "name, options",
    [
        ("ebfpn", {}),
        ("ebfpn", {"balanced_attention": False, "cross_layer": False}),
        ("ebfpn", {"bottom_up": False}),
        ("ebfpn", {"heads": 4, "temperature": "learnable"}),
        ("bafpn", {}),
        ("bafpn", {"placement": "in_path", "temperature": "learnable"}),
    ],
)
def test_necks_follow_the_contract_on_a_97x131_image(name: str, options: dict) -> None:
    torch.manual_seed(0)
    body, channels = build_resnet_body(18)
    with torch.no_grad():
        features = body(torch.rand(1, 3, 97, 131))
    assert [tuple(f.shape[-2:]) for f in features.values()] == ODD_97x131
    neck = build_neck(name, channels, out_channels=16, **options)
    out = neck(features)
    assert neck.out_channels == 16
    assert isinstance(out, OrderedDict) and list(out) == ["0", "1", "2", "3", "pool"]
    for key in ["0", "1", "2", "3"]:
        assert out[key].shape == (1, 16, *features[key].shape[-2:]), key
    assert out["pool"].shape == (1, 16, 2, 3)
    torch.testing.assert_close(out["pool"], F.max_pool2d(out["3"], 1, 2))
    assert all(torch.isfinite(f).all() for f in out.values())


@pytest.mark.parametrize("lateral", ["shared", "separate"])
def test_ebfpn_top_down_and_bottom_up_paths_follow_the_equations(lateral: str) -> None:
    torch.manual_seed(0)
    neck = build_neck("ebfpn", R18_CHANNELS, out_channels=8, balanced_attention=False, lateral=lateral)
    c = list(pyramid(EVEN).values())
    out = list(neck(OrderedDict((str(i), x) for i, x in enumerate(c))).values())
    td, bu = neck.top_down, neck.bottom_up
    lat = [td.inner[i](c[i]) for i in range(4)]
    l5 = lat[3]
    l4 = lat[2] + F.interpolate(l5, size=c[2].shape[-2:], mode="bilinear")
    l3 = lat[1] + F.interpolate(l4, size=c[1].shape[-2:], mode="bilinear")
    l2 = lat[0] + F.interpolate(l3, size=c[0].shape[-2:], mode="bilinear")
    p = [td.smooth[i](li) for i, li in enumerate([l2, l3, l4, l5])]
    skip = lat if lateral == "shared" else [None] + [bu.lateral[i - 1](c[i]) for i in range(1, 4)]
    b = [p[0]]
    for i in range(1, 4):
        b.append(bu.fuse[i - 1](p[i] + skip[i] + F.max_pool2d(b[-1], 2)))
    for i in range(4):
        torch.testing.assert_close(out[i], b[i])


def test_ebfpn_options_remove_their_parameters() -> None:
    full = build_neck("ebfpn", R18_CHANNELS, out_channels=8, lateral="separate")
    shared = build_neck("ebfpn", R18_CHANNELS, out_channels=8)
    no_cross = build_neck("ebfpn", R18_CHANNELS, out_channels=8, cross_layer=False)
    no_ba = build_neck("ebfpn", R18_CHANNELS, out_channels=8, balanced_attention=False)

    def names(m):
        return {n for n, _ in m.named_parameters()}

    assert any(n.startswith("bottom_up.lateral.") for n in names(full))
    assert not any("lateral" in n for n in names(no_cross))
    # the shared skip reuses the top-down 1×1 maps: no parameters, but a different output
    assert names(shared) == names(no_cross)
    features = pyramid(EVEN)
    shared.load_state_dict(no_cross.state_dict())
    assert not torch.allclose(shared(features)["1"], no_cross(features)["1"])
    lateral_params = sum((c * 8 + 8) for c in R18_CHANNELS[1:])  # 1×1 convs C3..C5 → 8 channels
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in no_cross.parameters()) == (
        lateral_params
    )

    assert any(n.startswith("balanced_attention.") for n in names(full))
    assert any(isinstance(m, CosineNonLocalAttention) for m in full.modules())
    assert not any(n.startswith("balanced_attention") for n in names(no_ba))
    assert not any(isinstance(m, CosineNonLocalAttention | BalancedAttention) for m in no_ba.modules())
    features = pyramid(EVEN)
    p, lateral = no_ba.top_down(list(features.values()))
    b = no_ba.bottom_up(p, list(features.values()), lateral)
    for i, fmap in enumerate(b):
        torch.testing.assert_close(no_ba(features)[str(i)], fmap)  # outputs are B2..B5 as they are


def test_ebfpn_without_bottom_up_puts_balanced_attention_on_plain_fpn_levels() -> None:
    torch.manual_seed(0)
    neck = build_neck("ebfpn", R18_CHANNELS, out_channels=8, bottom_up=False)
    assert neck.bottom_up is None
    assert not any(n.startswith("bottom_up") for n, _ in neck.named_parameters())
    features = pyramid(EVEN)
    p, _ = neck.top_down(list(features.values()))
    h = neck.balanced_attention(p)
    out = neck(features)
    for i in range(4):
        torch.testing.assert_close(out[str(i)], h[i])


def test_ebfpn_cross_layer_skip_carries_the_backbone_level_to_the_bottom_up_path() -> None:
    torch.manual_seed(0)
    neck = build_neck("ebfpn", R18_CHANNELS, out_channels=8, balanced_attention=False, lateral="separate")
    features = pyramid(EVEN)
    out = neck(features)
    with torch.no_grad():
        for conv in neck.bottom_up.lateral:
            conv.weight.zero_()
            conv.bias.zero_()
    zeroed = neck(features)
    torch.testing.assert_close(zeroed["0"], out["0"])  # B2 = P2: no skip there
    assert all(not torch.allclose(zeroed[k], out[k]) for k in ["1", "2", "3"])


def test_bafpn_refines_the_two_middle_bottom_up_levels() -> None:
    torch.manual_seed(0)
    output = build_neck("bafpn", R18_CHANNELS, out_channels=16)
    torch.manual_seed(0)
    in_path = build_neck("bafpn", R18_CHANNELS, out_channels=16, placement="in_path")
    assert output.attention["1"].heads == 4 and set(output.attention) == {"1", "2"}
    features = pyramid(ODD_97x131)
    plain = output.paths(features)  # the PAFPN neck underneath, without attention
    out, inline = output(features), in_path(features)

    torch.testing.assert_close(out["0"], plain["0"])
    torch.testing.assert_close(out["3"], plain["3"])
    torch.testing.assert_close(out["pool"], plain["pool"])
    for key in ["1", "2"]:
        torch.testing.assert_close(out[key], explicit_cosine_attention(plain[key], heads=4))
        assert not torch.allclose(out[key], plain[key])

    # in_path: same weights (fixed τ has none), but the refined N3 / N4 feed the next level
    torch.testing.assert_close(inline["1"], out["1"])
    assert not torch.allclose(inline["2"], out["2"])
    assert not torch.allclose(inline["3"], out["3"])
    assert sum(isinstance(m, CosineNonLocalAttention) for m in in_path.modules()) == 2


SMALL = {
    "min_size": 128,
    "max_size": 128,
    "anchor_sizes": ((16,), (32,), (64,), (128,), (256,)),
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 16,
}


@pytest.mark.parametrize("neck", [{"name": "ebfpn"}, {"name": "bafpn", "heads": 2}])
def test_faster_rcnn_with_ebba_and_baf_necks_trains(neck: dict) -> None:
    torch.manual_seed(0)
    sdfl = ScaledDynamicFocalLoss()
    sdfl.set_class_counts([40, 3])
    model = build_faster_rcnn(
        3, {"depth": 18}, {**neck, "out_channels": 16}, classification_loss=sdfl, **SMALL
    )
    assert model.roi_heads.classification_loss is sdfl
    model.train()
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 60.0, 80.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert set(losses) == set(LOSS_KEYS)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    attention_grads = [
        p.grad for n, p in model.backbone.neck.named_parameters() if "attention" in n or "refine" in n
    ]
    if neck["name"] == "ebfpn":  # the B-A module's level weights and 3×3 conv learn
        assert attention_grads and all(g is not None and g.abs().sum() > 0 for g in attention_grads)
    else:
        assert sum(isinstance(m, CosineNonLocalAttention) for m in model.backbone.neck.modules()) == 2


# ----------------------------------------------------------------------------- SDFL


def test_sdfl_alpha_matches_the_papers_worked_example() -> None:
    alpha = alpha_from_counts([101, 7747 - 101], m=4.0, gamma=2.0)
    assert round(alpha[0].item(), 3) == 3.896
    assert ScaledDynamicFocalLoss.alpha_from_counts is alpha_from_counts


def test_sdfl_rarer_classes_get_larger_weights_and_background_its_own() -> None:
    loss = ScaledDynamicFocalLoss(m=4.0, gamma=2.0, background_alpha=0.5)
    loss.set_class_counts([1000, 10, 100])
    a = loss.alpha
    assert a[1] > a[2] > a[0] and (a <= 4.0).all()
    torch.testing.assert_close(loss.class_weights(4), torch.cat([torch.tensor([0.5]), a]))
    torch.testing.assert_close(loss.class_weights(3), a)


def test_sdfl_with_gamma_zero_and_m_one_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(32, 4), torch.randint(0, 4, (32,))
    target[5] = -100
    loss = ScaledDynamicFocalLoss(m=1.0, gamma=0.0)
    loss.set_class_counts([7, 2, 30])
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))
    loss.reduction = "sum"
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, reduction="sum"))


@pytest.mark.parametrize("background", [True, False], ids=["detector", "classifier"])
def test_sdfl_matches_the_formula_and_passes_gradients(background: bool) -> None:
    torch.manual_seed(0)
    counts = [50, 5, 20]
    columns = len(counts) + int(background)
    logits = torch.randn(16, columns, requires_grad=True)
    target = torch.arange(16) % columns
    loss = ScaledDynamicFocalLoss(m=4.0, gamma=2.0, background_alpha=0.7)
    loss.set_class_counts(counts)
    value = loss(logits, target)

    n = torch.tensor(counts, dtype=torch.float32)
    alpha = 4.0 * (1 - n / n.sum()) ** 2
    if background:
        alpha = torch.cat([torch.tensor([0.7]), alpha])  # label 0 = background, label i ↔ counts[i - 1]
    p = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    expected = (-alpha[target] * (1 - p) ** 2 * torch.log(p)).mean()
    torch.testing.assert_close(value, expected)

    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_sdfl_without_counts_or_with_wrong_columns_fails_clearly() -> None:
    loss = ScaledDynamicFocalLoss()
    with pytest.raises(RuntimeError, match="set_class_counts.*datamodule"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))
    loss.set_class_counts([3, 4])
    with pytest.raises(ValueError, match="5 columns"):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sum to 0"):
        alpha_from_counts([0, 0])


def test_sdfl_config_gets_counts_from_the_dataset_info_and_survives_a_checkpoint() -> None:
    cfg = OmegaConf.load(REPO_CONF / "loss" / "sdfl.yaml")
    info = DatasetInfo(
        task="detection", class_names=("crack", "star_crack"), in_channels=3, class_counts=(7646, 101)
    )
    loss = build_loss(cfg, info)
    assert isinstance(loss, ScaledDynamicFocalLoss) and (loss.m, loss.gamma, loss.background_alpha) == (
        4,
        2,
        1,
    )
    assert round(loss.alpha[1].item(), 3) == 3.896

    restored = ScaledDynamicFocalLoss()
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored.alpha, loss.alpha)


# ----------------------------------------------------------------------------- parameter table


def test_parameter_table_groups_by_module_path_and_sums_to_the_total() -> None:
    model = torch.nn.ModuleDict({"neck": build_neck("ebfpn", R18_CHANNELS, out_channels=8)})
    total = sum(p.numel() for p in model.parameters())
    for depth in (1, 2, 3, 6):
        table = parameter_table(model, depth)
        assert sum(n for _, n in table) == total
        assert len({name for name, _ in table}) == len(table)
    assert parameter_table(model, 1) == [("neck", total)]
    by_name = dict(parameter_table(model, 2))
    assert list(by_name) == ["neck.top_down", "neck.bottom_up", "neck.balanced_attention"]
    assert by_name["neck.balanced_attention"] == 4 + 8 * 8 * 9 + 8  # level weights + 3×3 conv
    assert dict(parameter_table(model, 3))["neck.balanced_attention.level_logits"] == 4
    model.neck.top_down.requires_grad_(False)
    assert "neck.top_down" not in dict(parameter_table(model, 2, trainable_only=True))


def test_max_pool_to_equals_adaptive_pooling_and_uses_a_plain_max_pool_when_sizes_divide() -> None:
    from elinspect.models.detection.balanced_attention import max_pool_to

    x = torch.randn(2, 3, 12, 20)
    for size in [(6, 10), (3, 5), (12, 20), (5, 7)]:
        torch.testing.assert_close(max_pool_to(x, size), F.adaptive_max_pool2d(x, size))
    traced = torch.jit.trace(lambda t: max_pool_to(t, (6, 10)), x)
    assert "adaptive_max_pool2d" not in str(traced.graph)  # what the ONNX exporter cannot translate
