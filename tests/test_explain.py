"""Grad-CAM explanations: the map follows the evidence, has the input's size, and the command
rebuilds classifiers and detectors from their checkpoints."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from elinspect.build import stored_config
from elinspect.data.images import read_image
from elinspect.data.info import DatasetInfo
from elinspect.explain import (
    Explainer,
    ExplainError,
    cam_at,
    detection_rows,
    explain_classifier,
    explain_detector,
    roi_head_outputs,
    run,
    tap,
)
from elinspect.inference import CheckpointError, load_model
from elinspect.models.build import build_model, effective_loss_config
from elinspect.utils.errors import ConfigError
from tests.conftest import FAST_DETECTOR_OVERRIDES, REPO


class BrightSpot(nn.Module):
    """Class 1 logit = mean response of a centre-pixel filter (bright pixels); class 0 = its negative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0  # channel 0: brightness
            self.conv.weight[1, 0] = 0.01  # channel 1: unused by the head
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_grad_cam_lights_up_where_the_class_evidence_lies() -> None:
    model = BrightSpot().eval()
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 4:10, 20:26] = 1.0
    cams, classes, logits = explain_classifier(model, model.conv, image, target_class=1, size=(64, 64))
    cam = cams[0]
    assert cam.shape == (64, 64) and torch.isfinite(cam).all()
    peak = divmod(int(cam.argmax()), 64)
    assert 8 <= peak[0] < 20 and 40 <= peak[1] < 52  # inside the bright square (input coordinates x2)
    assert float(cam[40:, :30].max()) == 0.0  # nothing far from it
    assert int(classes[0]) == 1 and logits.shape == (1, 2)
    # the other class counts the square against itself: ReLU leaves no positive evidence
    against, _, _ = explain_classifier(model, model.conv, image, target_class=0)
    assert float(against.max()) == 0.0
    with pytest.raises(ExplainError, match="target_class 5 outside 0..1"):
        explain_classifier(model, model.conv, image, target_class=5)


def save_module(make_cfg, overrides: list[str], info: DatasetInfo, path: Path) -> L.LightningModule:
    """A random-init module of the composed config, saved as a Lightning checkpoint (with the
    stored config and dataset info, as a training run writes it)."""
    cfg = make_cfg("train.yaml", overrides)
    torch.manual_seed(0)
    module = build_model(cfg.model, effective_loss_config(cfg), info)
    module.run_config = stored_config(cfg)
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return module


def write_image(path: Path, height: int, width: int, colour: bool) -> Path:
    rng = np.random.default_rng(1)
    pixels = (rng.random((height, width, 3) if colour else (height, width)) * 255).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 255
    cv2.imwrite(str(path), pixels)
    return path


def classifier_checkpoint(make_cfg, tmp_path: Path, image_size: int) -> Path:
    """A random-init ResNet-18 classifier of ELPV's two classes at ``image_size``, saved."""
    info = DatasetInfo("classification", ("normal", "defective"), 3, (5, 5))
    ckpt = tmp_path / "classifier.ckpt"
    resnet = ["model.net.arch=resnet18", "model.net.weights=null"]
    save_module(
        make_cfg, ["model=classifier", "data=elpv", f"data.image_size={image_size}", *resnet], info, ckpt
    )
    return ckpt


def explain_cfg(make_cfg, overrides: list[str]):
    return make_cfg("explain.yaml", ["device=cpu", *overrides], fast=False)


def test_explain_a_classifier_checkpoint(make_cfg, tmp_path: Path) -> None:
    ckpt = classifier_checkpoint(make_cfg, tmp_path, 64)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_image(inputs / "cell_a.png", 90, 70, colour=False)
    write_image(inputs / "cell_b.jpg", 50, 120, colour=True)
    out = tmp_path / "explained"
    cfg = explain_cfg(
        make_cfg, [f"ckpt_path={ckpt}", f"input={inputs}", f"output={out}", "target_class=defective"]
    )
    summaries = run(cfg)
    assert [s["class"] for s in summaries] == ["defective", "defective"]
    for stem, shape in (("cell_a", (90, 70)), ("cell_b", (50, 120))):
        cam = np.load(out / f"{stem}_gradcam.npy")
        assert cam.shape == shape and cam.dtype == np.float32
        assert np.isfinite(cam).all() and cam.std() > 0  # gradients reached layer4 (2×2 at 64 px)
        picture = cv2.imread(str(out / f"{stem}_gradcam.png"))
        assert picture.shape == (*shape, 3)
    lines = (out / "explanations.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["layer"] == "net.net.layer4"

    module = load_model(ckpt).module
    with pytest.raises(
        ExplainError, match=r"target_class 'crack' is not a class of the model: \['normal', 'defective'\]"
    ):
        Explainer(module, target_class="crack")
    with pytest.raises(ExplainError, match="layer 'net.nope' not found"):
        Explainer(module, layer="net.nope")
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        load_model(tmp_path / "missing.ckpt")


def test_explain_prepares_an_image_as_the_checkpoints_datamodule_does(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ELPV decodes its cells as grey (repeated to 3 channels): a colour file given to explain
    must reach the model as predict and the test set prepare it, not as RGB. And two files of
    one stem (a.png, a.jpg) get an explanation each, not one written over the other."""
    ckpt = classifier_checkpoint(make_cfg, tmp_path, 32)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    red = np.zeros((40, 30, 3), np.uint8)
    red[..., 2] = 255  # BGR: pure red
    cv2.imwrite(str(inputs / "a.png"), red)
    write_image(inputs / "a.jpg", 50, 20, colour=True)
    seen = []

    def spy(module, layer, tensor, *args, **kwargs):
        seen.append(tensor.detach().cpu())
        return explain_classifier(module, layer, tensor, *args, **kwargs)

    monkeypatch.setattr("elinspect.explain.explain_classifier", spy)
    out = tmp_path / "explained"
    summaries = run(explain_cfg(make_cfg, [f"ckpt_path={ckpt}", f"input={inputs}", f"output={out}"]))
    expected, _ = load_model(ckpt).preprocessing(inputs / "a.png", read_image(inputs / "a.png", grey=False))
    red_input = seen[[s["input"] for s in summaries].index(str(inputs / "a.png"))][0]
    torch.testing.assert_close(red_input, torch.from_numpy(expected))
    assert torch.allclose(
        red_input, torch.full_like(red_input, 76 / 255), atol=1 / 255
    )  # grey, not (1, 0, 0)
    maps = [s["map"] for s in summaries]
    assert len(set(maps)) == 2 and len({s["overlay"] for s in summaries}) == 2
    assert {np.load(out / m).shape for m in maps} == {(40, 30), (50, 20)}


def test_an_unreadable_input_is_skipped_and_counted_not_the_end_of_the_run(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As predict does: a file that cannot be read is named with the reason, counted, and
    listed in explanations.jsonl as skipped; the other inputs are explained."""
    ckpt = classifier_checkpoint(make_cfg, tmp_path, 32)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_image(inputs / "good.png", 40, 30, colour=False)
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "explained"
    with caplog.at_level("WARNING", logger="elinspect.explain"):
        summaries = run(explain_cfg(make_cfg, [f"ckpt_path={ckpt}", f"input={inputs}", f"output={out}"]))
    assert [Path(s["input"]).name for s in summaries] == ["good.png"]
    lines = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    skipped = [line for line in lines if line.get("status") == "skipped"]
    assert len(lines) == 2 and [Path(line["input"]).name for line in skipped] == ["broken.png"]
    assert "not an image" in skipped[0]["reason"] and not (out / "broken_gradcam.npy").exists()
    assert "1 of 2 inputs skipped" in caplog.text


def test_the_default_layer_of_an_efficientnet_classifier_is_its_last_conv() -> None:
    from elinspect.explain import default_layer
    from elinspect.models.classification import ClassifierModule, ImageClassifier

    info = DatasetInfo("classification", ("normal", "defective"), 3, (5, 5))
    net = functools.partial(ImageClassifier, arch="efficientnet_lite0", weights=None)
    module = ClassifierModule(net, info, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    assert default_layer(module) == "net.net.bn2"  # conv_head, its norm and activation
    assert module.get_submodule("net.net.bn2").num_features == 1280


def test_explain_a_detector_checkpoint(make_cfg, tmp_path: Path) -> None:
    info = DatasetInfo("detection", ("crack", "finger"), 3, (3, 4))
    ckpt = tmp_path / "detector.ckpt"
    module = save_module(
        make_cfg,
        [
            "model=faster_rcnn",
            "data=pvel",
            "model.detector.neck.out_channels=32",  # a small box head: a small checkpoint
            *FAST_DETECTOR_OVERRIDES,
            "data.image_size=48",  # the detector sees 48 px (its own resize does nothing more)
            "model.detector.min_size=48",
            "model.detector.max_size=48",
        ],
        info,
        ckpt,
    )
    # each explained detection is traced to the proposal row whose class probability it reports
    image = torch.rand(3, 48, 48)
    rcnn = module.model.eval()
    with roi_head_outputs(rcnn) as heads, torch.no_grad():
        detections = rcnn([image])[0]
    rows = detection_rows(rcnn, heads)
    assert rows is not None and len(rows) == len(detections["scores"]) > 0
    probabilities = heads["class_logits"][rows].softmax(dim=1)[torch.arange(len(rows)), detections["labels"]]
    torch.testing.assert_close(probabilities, detections["scores"])

    with tap(rcnn.backbone) as store:
        result = explain_detector(rcnn, rcnn.backbone, image, detections=2, score_threshold=0.0)
    assert result.target == "logit" and len(result.explained) == 2
    torch.testing.assert_close(result.values, heads["class_logits"][rows[:2], detections["labels"][:2]])
    assert result.cam.shape == (48, 48) and torch.isfinite(result.cam).all() and float(result.cam.std()) > 0
    # RoIAlign pools the boxes from P2..P5: the RPN-only "pool" level gets no gradient (proposals are detached)
    assert store["output"]["pool"].grad is None and store["output"]["0"].grad is not None
    assert float(cam_at(store, (48, 48), level="pool").abs().max()) == 0.0

    source = write_image(tmp_path / "module.png", 80, 100, colour=True)
    out = tmp_path / "explained"
    summary = run(
        explain_cfg(make_cfg, [f"ckpt_path={ckpt}", f"input={source}", f"output={out}", "score_threshold=0"])
    )[0]
    assert summary["layer"] == "model.backbone" and summary["target"].startswith("sum of the logits of")
    assert 1 <= len(summary["detections"]) <= 3
    for detection in summary["detections"]:
        x1, y1, x2, y2 = detection["box"]
        assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 80  # in the input file's coordinates
    cam = np.load(out / "module_gradcam.npy")
    assert cam.shape == (80, 100) and np.isfinite(cam).all() and cam.std() > 0
    assert cv2.imread(str(out / "module_gradcam.png")).shape == (80, 100, 3)


@pytest.mark.parametrize("template", ["pre", "inter"])
def test_explain_refuses_a_detector_that_reads_a_template(make_cfg, tmp_path: Path, template: str) -> None:
    """TR-Pre and TR-Inter read every image beside its aligned template; explain has no input
    for one, so it says so instead of the detector's traceback."""
    info = DatasetInfo("detection", ("crack", "finger"), 3, (3, 4))
    ckpt = tmp_path / "rddn.ckpt"
    overrides = ["model=rddn", "data=fabric", f"model.template={template}", *FAST_DETECTOR_OVERRIDES]
    save_module(make_cfg, [*overrides, "model.detector.test_min_size=48"], info, ckpt)
    source = write_image(tmp_path / "fabric.png", 48, 48, colour=True)
    cfg = explain_cfg(make_cfg, [f"ckpt_path={ckpt}", f"input={source}", f"output={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=rf"template={template}.*aligned template.*predict"):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_explain_command_line(make_cfg, tmp_path: Path) -> None:
    ckpt = classifier_checkpoint(make_cfg, tmp_path, 64)
    source = write_image(tmp_path / "cell.png", 90, 70, colour=False)
    out = tmp_path / "explained"
    command = [
        sys.executable, "-m", "elinspect.explain", f"ckpt_path={ckpt}", f"input={source}", f"output={out}",
        "target_class=1", "extras.print_config=false", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.load(out / "cell_gradcam.npy").shape == (90, 70)
    assert json.loads((out / "explanations.jsonl").read_text())["class"] == "defective"
