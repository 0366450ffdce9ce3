"""Per-module-group profile of a detector (RDDN Table VIII): groups, parameters, memory, time, CLI."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from elinspect.models.detection.builder import build_faster_rcnn
from elinspect.models.detection.heads import build_box_heads
from elinspect.models.profile import (
    OTHER,
    group_of,
    group_roots,
    profile_groups,
)
from elinspect.profile import main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PseudoTemplateGenerator(nn.Module):
    """A stand-in for RDDN's PTG: one conv + ReLU per stage; ``residual`` calls them directly,
    bypassing this module's own ``forward`` (as RDDN's does)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU()) for c in channels)

    def forward(self, features):
        return type(features)((k, g(f)) for (k, f), g in zip(features.items(), self.stages, strict=True))

    def residual(self, features):
        return type(features)((k, f - g(f)) for (k, f), g in zip(features.items(), self.stages, strict=True))


class BackboneWithPTG(nn.Module):
    """``neck(C(I) - G(C(I)))``, like RDDN's PTG mode; the generators sit under a neutral name."""

    def __init__(self, backbone: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.body, self.neck, self.out_channels = backbone.body, backbone.neck, backbone.out_channels
        self.generators = PseudoTemplateGenerator(channels)

    def forward(self, x):
        return self.neck(self.generators.residual(self.body(x)))


def tiny_rddn_like() -> nn.Module:
    torch.manual_seed(0)
    model = build_faster_rcnn(
        3,
        {"depth": 18, "norm_layer": "frozen_bn"},
        {"name": "fpn", "out_channels": 8},
        min_size=64,
        max_size=64,
        anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
    )
    model.backbone = BackboneWithPTG(model.backbone, [64, 128, 256, 512])
    model.roi_heads = build_box_heads(model.roi_heads, "cascade", context={"k": 1.5}, representation_size=32)
    return model


def test_groups_are_assigned_by_module_path() -> None:
    assert group_of("backbone.body.layer1.0.conv1") == "backbone body"
    assert group_of("backbone.neck.inner_blocks.0") == "neck"
    assert group_of("backbone.fpn.layer_blocks.1") == "neck"
    assert group_of("backbone.ptg.generators.0") == "PTG"
    assert group_of("generators", module=PseudoTemplateGenerator([1])) == "PTG"
    assert group_of("backbone.body.ptgs.0") == "PTG"  # a PTG anywhere, even inside the body
    assert group_of("rpn.head.conv") == "RPN"
    assert group_of("roi_heads.stages.2.box_head.fc6.weight") == "ROI heads"
    assert group_of("transform") == "transform"
    assert (
        group_of("backbone") is None and group_of("rpnx") is None and group_of("backbone.bodyguard") is None
    )

    roots = group_roots(tiny_rddn_like())
    assert list(roots) == ["transform", "PTG", "backbone body", "neck", "RPN", "ROI heads"]
    assert [p for p, _ in roots["PTG"]] == ["backbone.generators"]  # found by its class
    assert [p for p, _ in roots["ROI heads"]] == ["roi_heads"]


def test_profile_rows_cover_every_group_of_a_detector() -> None:
    model = tiny_rddn_like()
    model.train()
    rows = {r.name: r for r in profile_groups(model, ([torch.rand(3, 64, 64)],), runs=1, warmup=1)}
    assert list(rows) == ["transform", "PTG", "backbone body", "neck", "RPN", "ROI heads", OTHER]
    assert all(m.training for m in model.modules() if not isinstance(m, nn.Identity))  # modes restored
    assert sum(r.parameters for r in rows.values()) == sum(p.numel() for p in model.parameters())
    assert rows["PTG"].parameters == sum(c * c + c for c in (64, 128, 256, 512))
    # PTG's forward is never called (residual() calls its stages): still timed and measured, and
    # its ReLU outputs (C2..C5-sized) are PTG's activations, not the body's
    assert rows["PTG"].activation_bytes == 4 * (64 * 256 + 128 * 64 + 256 * 16 + 512 * 4)
    for name in ("PTG", "backbone body", "neck", "RPN", "ROI heads"):
        row = rows[name]
        assert row.parameters > 0 and row.parameter_bytes == 4 * row.parameters, name
        assert row.time_ms is not None and row.time_ms > 0, name
        assert row.activation_bytes > 0 and row.output_bytes > 0, name
        assert row.peak_bytes is None, name  # CPU: no allocator peak
    # the body returns C2..C5 of a 64 px image: (64·16² + 128·8² + 256·4² + 512·2²) float32 values
    assert rows["backbone body"].output_bytes == 4 * (64 * 256 + 128 * 64 + 256 * 16 + 512 * 4)
    assert rows["backbone body"].activation_bytes > rows["backbone body"].output_bytes


def test_activations_are_the_tensors_saved_for_backward_and_times_are_exclusive() -> None:
    class Sleep(nn.Module):
        def __init__(self, seconds: float, inner: nn.Module | None = None) -> None:
            super().__init__()
            self.seconds, self.inner = seconds, inner

        def forward(self, x):
            time.sleep(self.seconds)
            return x if self.inner is None else self.inner(x)

    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = Sleep(0.01, inner=nn.Module())
    model.backbone.body.inner.ptg = Sleep(0.05)
    model.backbone.body.inner.forward = lambda x: model.backbone.body.inner.ptg(x)
    model.roi_heads = nn.Sequential(nn.Linear(100, 50), nn.ReLU())
    model.forward = lambda x: model.roi_heads(model.backbone.body(x))
    rows = {r.name: r for r in profile_groups(model, (torch.rand(6, 100),), runs=2, warmup=0)}
    # Linear saves its input (6×100), ReLU its output (6×50); the weight is a parameter, not counted
    assert rows["ROI heads"].activation_bytes == 4 * 6 * (100 + 50)
    assert rows["ROI heads"].output_bytes == 4 * 6 * 50
    assert rows["PTG"].time_ms >= 50
    assert 10 <= rows["backbone body"].time_ms < 45  # the nested PTG's 50 ms are not counted twice


def test_command_line_prints_the_parameter_and_group_tables(capsys) -> None:
    main(
        [
            "model=faster_rcnn",
            "model.detector.backbone.name=resnet18",
            "model.detector.neck.out_channels=16",
            "model.detector.min_size=64",
            "model.detector.max_size=64",
            "model.detector.rpn_post_nms_top_n_test=20",
            "--image-size",
            "64",
            "--time",
            "--runs",
            "1",
            "--classes",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "parameters of model=faster_rcnn" in out and "model.backbone" in out
    assert "Paras" in out and "parameters and their gradients" in " ".join(out.split())
    for group in ("backbone body", "neck", "RPN", "ROI heads", "activ. MiB", "time ms"):
        assert group in out, group


def test_an_anomaly_model_is_profiled_with_its_two_classes(capsys) -> None:
    """Anomaly models score normal against defective and refuse other class counts; the
    command's default class count (5, EBBA's) is for the detectors."""
    main(["model=padim", "model.padim.weights=null", "--params-only"])
    assert "(2 classes)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["model=padim", "model.padim.weights=null", "--params-only", "--classes", "5"])
    assert stopped.value.code == 2
    assert "PadimModule scores images as normal or defective" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_reports_the_allocator_peak_of_each_group() -> None:
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = nn.Sequential(nn.Linear(256, 1024), nn.ReLU())
    model.roi_heads = nn.Sequential(nn.Linear(1024, 64), nn.ReLU())
    model.forward = lambda x: model.roi_heads(model.backbone.body(x))
    model.cuda()
    rows = {r.name: r for r in profile_groups(model, (torch.rand(512, 256, device="cuda"),), runs=2)}
    # the body allocates at least its 512×1024 float32 output while it runs
    assert rows["backbone body"].peak_bytes >= 4 * 512 * 1024
    assert rows["ROI heads"].peak_bytes >= 4 * 512 * 64
    assert rows[OTHER].peak_bytes is None
    assert rows["backbone body"].time_ms > 0


def test_paper_parameter_memory_counts_weights_and_gradients() -> None:
    """RDDN Table VIII's "Paras": ResNet-50's body (23.5 M parameters) is 179.35 MiB, i.e.
    8 bytes per parameter (weight + gradient in float32), twice what the weights take."""
    from elinspect.models.backbones import build_body
    from elinspect.models.profile import mebibytes, paper_parameter_bytes

    body, _ = build_body("resnet50")
    n = sum(p.numel() for p in body.parameters())
    assert round(n / 1e6, 1) == 23.5
    assert mebibytes(paper_parameter_bytes(n)) == "179.35"
