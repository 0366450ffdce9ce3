"""``python -m elinspect.predict``: a checkpoint alone rebuilds the model and its test-time
preprocessing; odd files are reported and skipped; outputs are overlays, JSON lines and a CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from rich.console import Console

from elinspect.data.detection_dataset import DetectionDataset
from elinspect.data.elpv import ElpvDataset, ElpvTable
from elinspect.data.errors import DatasetError
from elinspect.data.folder import FolderDataset, FolderSample
from elinspect.data.records import DetectionRecord
from elinspect.inference import (
    CheckpointError,
    ImageFiles,
    InputError,
    PreparedImage,
    Skipped,
    TemplateFinder,
    list_inputs,
    load_model,
    preprocessing_from_config,
)
from elinspect.models.base import CHECKPOINT_KEY
from elinspect.predict import predict, predict_images
from elinspect.train import train
from elinspect.utils.outputs import OutputExistsError
from tests.conftest import REPO, compose_config, fast_model_overrides

# One tiny training run per model, shared by every test module of the session that asks.
TRAINED: dict[str, Path] = {}
DATA_OF = {"classifier": "elpv", "faster_rcnn": "pvel", "rddn": "fabric"}  # the others: data=folder
SHORT_FIT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks=none",
    "logger=csv",
    "test=false",
]
MODEL_OVERRIDES = {
    "semacnn": ["model.classifier_epochs=1", "data.train_normal_only=false"],
    "ganae": ["model.generator_epochs=1", "model.encoder_epochs=1", "model.samples_every_n_epochs=0"],
    "rddn": ["model.template=pre"],  # TR-Pre: every image needs its aligned template
}


def trained_checkpoint(
    model: str, tmp_path_factory: pytest.TempPathFactory, fast_data_overrides: Callable[[str], list[str]]
) -> Path:
    """The checkpoint of ``model`` after one training batch (made once per session)."""
    if model not in TRAINED:
        data = DATA_OF.get(model, "folder")
        out = tmp_path_factory.mktemp(f"train-{model}")
        overrides = [
            f"model={model}",
            f"data={data}",
            *SHORT_FIT,
            *fast_data_overrides(data),
            *fast_model_overrides(model),
            *MODEL_OVERRIDES.get(model, []),
        ]
        _, objects = train(compose_config("train.yaml", overrides, out))
        path = out / f"{model}.ckpt"
        objects["trainer"].save_checkpoint(path)
        TRAINED[model] = path
    return TRAINED[model]


@pytest.fixture(scope="module")
def padim_ckpt(tmp_path_factory, fast_data_overrides) -> Path:
    return trained_checkpoint("padim", tmp_path_factory, fast_data_overrides)


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory, fast_data_overrides) -> Path:
    return trained_checkpoint("classifier", tmp_path_factory, fast_data_overrides)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def odd_directory(root: Path, good: list[Path]) -> dict[str, str]:
    """``root`` with the ``good`` images (one of them as a non-square JPEG) and every kind of
    bad entry; returns ``{name: expected skip reason fragment}``."""
    root.mkdir()
    for path in good:
        (root / path.name).write_bytes(path.read_bytes())
    wide = cv2.resize(cv2.imread(str(good[0])), (80, 48))
    cv2.imwrite(str(root / "wide.jpg"), wide)
    jpeg = (root / "wide.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image\n")
    (root / "notes.txt").write_text("a note\n")
    (root / "sub").mkdir()
    return {
        "truncated.jpg": "truncated JPEG",
        "empty.jpg": "empty (0 bytes)",
        "text.png": "not an image",
        "notes.txt": ".txt is not one of",
        "sub": "a directory",
    }


def test_predict_writes_overlays_jsonl_and_summary_and_skips_odd_files(
    padim_ckpt: Path, folder_data_factory, tmp_path: Path
) -> None:
    data = folder_data_factory()
    good = [data / "good" / "000.png", data / "defect" / "bright_spot" / "000.png"]
    inputs = tmp_path / "in"
    bad = odd_directory(inputs, good[:1])
    (inputs / "spot.png").write_bytes(good[1].read_bytes())
    console = quiet()

    summary = predict_images(
        padim_ckpt, inputs, tmp_path / "out", batch_size=2, device="cpu", console=console
    )

    assert (summary.predicted, summary.skipped.total) == (3, 5)
    assert "8 images: 3 predicted, 5 skipped (3 × unreadable image" in console.file.getvalue().replace(
        "\n", " "
    )
    rows = {Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert set(rows) == {"000.png", "spot.png", "wide.jpg", *bad}
    for name, reason in bad.items():
        assert rows[name]["status"] == "skipped" and reason in rows[name]["reason"], rows[name]
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["000.png", "spot.png", "wide.jpg"]

    loaded = load_model(padim_ckpt)
    threshold = float(loaded.module.threshold)
    for record in lines:
        path = Path(record["path"])
        assert rows[path.name]["status"] == "ok"
        assert record["model"] == "padim" and record["threshold"] == pytest.approx(threshold)
        assert record["label"] == int(record["score"] >= threshold)
        # overlays are drawn on the image at its own size
        overlay = cv2.imread(str(tmp_path / "out" / record["overlay"]))
        original = cv2.imread(str(path))
        assert overlay.shape == original.shape and record["size"] == [original.shape[1], original.shape[0]]
        assert not np.array_equal(overlay, original)
    # the score is the model's on the tensor the datamodule's test dataset makes of that file
    sample = FolderSample(inputs / "spot.png", 1, "", "defect")
    tensor = FolderDataset([sample], [0], 64, 3, with_masks=False)[0]["image"]
    with torch.no_grad():
        expected = float(loaded.module.padim(tensor[None]).anomaly_map.max())
    assert lines[1]["score"] == pytest.approx(expected, rel=1e-5)


def test_a_used_output_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text("earlier run\n")
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        predict_images(tmp_path / "missing.ckpt", tmp_path, out, console=quiet())
    assert (out / "predictions.jsonl").read_text() == "earlier run\n"


def test_an_input_without_images_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=f"input {tmp_path} holds no image.*notes.txt"):
        list_inputs(str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="matches no file"):
        list_inputs(str(tmp_path / "*.png"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    files, skipped, _ = list_inputs(str(tmp_path), recursive=True)
    assert files == [tmp_path / "sub" / "a.png"] and [s.path.name for s in skipped] == ["notes.txt"]


class Payload:
    """Pickles as a call of ``os.system("touch <marker>")``: it must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_files_that_are_not_elinspect_checkpoints_are_named(tmp_path: Path) -> None:
    cases = {
        "missing.ckpt": (None, "does not exist"),
        "text.ckpt": (b"hello", "text.ckpt could not be loaded safely .*not a PyTorch file"),
        "weights.pth": ({"conv1.weight": torch.zeros(2)}, "bare state dict of 1 tensors"),
        "other.ckpt": (
            {"state_dict": {"w": torch.zeros(1)}, "pytorch-lightning_version": "2.6.0"},
            "Lightning checkpoint .* of another project",
        ),
        "pickle.ckpt": (
            {"state_dict": {}, "hyper_parameters": Payload(tmp_path / "PWNED")},
            "refused: it holds pickled Python objects",
        ),
        "noconfig.ckpt": (
            {"state_dict": {}, CHECKPOINT_KEY: {"model_class": "x.Padim", "config": None}},
            "x.Padim without the run's stored config",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path)
    assert not (tmp_path / "PWNED").exists(), "the pickled payload ran"


def test_preprocessing_equals_each_datamodules_test_dataset(detection_data, tmp_path: Path) -> None:
    """The tensors predict feeds are exactly the test datasets' for the same files."""
    colour = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    image = tmp_path / "colour.png"
    cv2.imwrite(str(image), colour)
    cell = np.zeros((90, 110), np.uint8)
    cv2.fillPoly(cell, [np.array([[12, 8], [100, 14], [95, 80], [8, 84]])], 180)
    cell_path = tmp_path / "cell.png"
    cv2.imwrite(str(cell_path), cell + np.random.default_rng(1).integers(0, 40, cell.shape, dtype=np.uint8))

    def ours(data_cfg: dict, path: Path) -> torch.Tensor:
        item = ImageFiles([path], preprocessing_from_config(data_cfg))[0]
        assert isinstance(item, PreparedImage), item
        return item.tensor

    elpv = ElpvDataset(
        ElpvTable((image,), np.zeros(1), np.array(["mono"])), np.array([0]), np.zeros(1, int), 40, 3
    )
    cfg = {"_target_": "elinspect.data.elpv.ElpvDataModule", "image_size": 40, "channels": 3}
    assert torch.equal(ours(cfg, image), elpv[0]["image"])
    for channels, crop, path in ((1, None, image), (3, None, image), (1, {"threshold": 50}, cell_path)):
        folder = FolderDataset(
            [FolderSample(path, 0, "", "normal")], [0], 32, channels, False, cell_crop=crop
        )
        cfg = {
            "_target_": "elinspect.data.folder.FolderDataModule",
            "root": ".",
            "image_size": 32,
            "channels": channels,
            "cell_crop": crop,
        }
        assert torch.equal(ours(cfg, path), folder[0]["image"]), (channels, crop)
    jpeg = sorted(detection_data.summary["images"].glob("*.jpg"))[0]
    for size, mode in ((48, "longer"), (40, "square"), (None, "longer")):
        detection = DetectionDataset([DetectionRecord(jpeg)], image_size=size, resize=mode)
        cfg = {
            "_target_": "elinspect.data.pvel.PvelAdDataModule",
            "root": ".",
            "image_size": size,
            "resize": mode,
        }
        assert torch.equal(ours(cfg, jpeg), detection[0][0]), (size, mode)


def test_templates_by_rule_format_and_csv(tmp_path: Path) -> None:
    """Tianchi Fabric's layout (template_*.jpg beside the image), a format rule and a CSV; an
    image without its template is skipped with the reason, templates are not inputs."""
    picture = np.full((16, 16, 3), 90, np.uint8)
    for stem in ("a", "b"):
        (tmp_path / stem).mkdir()
        cv2.imwrite(str(tmp_path / stem / f"{stem}.jpg"), picture)
    cv2.imwrite(str(tmp_path / "a" / "template_a.jpg"), picture)
    fabric = TemplateFinder(rule="template_*.jpg")
    assert fabric.find(tmp_path / "a" / "a.jpg") == tmp_path / "a" / "template_a.jpg"
    assert fabric.is_template(tmp_path / "a" / "template_a.jpg")
    with pytest.raises(DatasetError, match="b.jpg: no template: nothing matches"):
        fabric.find(tmp_path / "b" / "b.jpg")

    cv2.imwrite(str(tmp_path / "b" / "b_ref.jpg"), picture)
    formatted = TemplateFinder(rule="{stem}_ref{suffix}")
    assert formatted.find(tmp_path / "b" / "b.jpg") == tmp_path / "b" / "b_ref.jpg"
    assert formatted.is_template(tmp_path / "b" / "b_ref.jpg", [tmp_path / "b" / "b.jpg"])
    (tmp_path / "pairs.csv").write_text("image,template\na/a.jpg,b/b_ref.jpg\n")
    table = TemplateFinder(csv_path=tmp_path / "pairs.csv")
    assert table.find(tmp_path / "a" / "a.jpg") == tmp_path / "b" / "b_ref.jpg"
    with pytest.raises(ValueError, match="exactly one of template.rule"):
        TemplateFinder()

    prep = preprocessing_from_config(
        {
            "_target_": "elinspect.data.pvel.PvelAdDataModule",
            "root": ".",
            "image_size": 16,
            "resize": "square",
        }
    )
    items = ImageFiles([tmp_path / "a" / "a.jpg", tmp_path / "b" / "b.jpg"], prep, fabric)
    found, missing = items[0], items[1]
    assert isinstance(found, PreparedImage) and torch.equal(found.template, found.tensor)
    assert isinstance(missing, Skipped) and missing.kind == "no usable template"


def elpv_cells(tmp_path: Path, count: int = 3) -> Path:
    """A directory with the first ``count`` ELPV cells (300 px grey PNGs)."""
    from elinspect.data.elpv import package_root

    inputs = tmp_path / "cells"
    inputs.mkdir()
    for cell in sorted((package_root() / "images").glob("*.png"))[:count]:
        (inputs / cell.name).write_bytes(cell.read_bytes())
    return inputs


def check_classifier_predictions(ckpt: Path, out: Path) -> None:
    """Every JSON line holds the model's probabilities for that file, and its overlay is 300 px."""
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    loaded = load_model(ckpt)
    assert len(lines) == 3
    for record in lines:
        probs = list(record["probabilities"].values())
        assert record["class_name"] in ("normal", "defective") and record["score"] == pytest.approx(
            max(probs)
        )
        assert record["threshold"] is None and record["label"] == int(np.argmax(probs))
        tensor = ImageFiles([Path(record["path"])], loaded.preprocessing)[0].tensor
        with torch.no_grad():
            expected = loaded.module(tensor[None]).softmax(dim=1)[0]
        assert probs == pytest.approx(expected.tolist(), abs=1e-5)
        assert cv2.imread(str(out / record["overlay"])).shape[:2] == (300, 300)


def test_predict_config_runs_a_classifier_checkpoint(classifier_ckpt: Path, tmp_path: Path) -> None:
    """conf/predict.yaml as the command line composes it: ELPV cells (grey, 3 channels) → labels."""
    inputs = elpv_cells(tmp_path)
    out = tmp_path / "out"
    cfg = compose_config(
        "predict.yaml",
        [f"ckpt_path={classifier_ckpt}", f"input={inputs}", f"output={out}", "device=cpu", "batch_size=2"],
        tmp_path / "run",
        fast=False,
    )
    summary = predict(cfg)
    assert summary.line() == "3 images: 3 predicted, 0 skipped"
    check_classifier_predictions(classifier_ckpt, out)


@pytest.mark.slow
def test_cli_predicts_with_a_classifier_checkpoint(classifier_ckpt: Path, tmp_path: Path) -> None:
    """``python -m elinspect.predict`` end to end, in its own process."""
    inputs = elpv_cells(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "elinspect.predict",
            f"ckpt_path={classifier_ckpt}",
            f"input={inputs}",
            f"output={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "extras.print_config=false",
            "device=cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 images: 3 predicted, 0 skipped" in result.stdout
    check_classifier_predictions(classifier_ckpt, out)


@pytest.mark.slow
def test_rddn_predicts_each_image_against_its_template(
    tmp_path_factory, fast_data_overrides, tianchi_data_factory, tmp_path: Path
) -> None:
    """Tianchi Fabric's layout: ``<stem>/<stem>.jpg`` beside ``<stem>/template_<id>.jpg``. The
    templates are references, not inputs; an image whose template is gone is skipped."""
    ckpt = trained_checkpoint("rddn", tmp_path_factory, fast_data_overrides)
    images = sorted(
        p for p in tianchi_data_factory("fabric").rglob("*.jpg") if not p.name.startswith("template_")
    )
    inputs = tmp_path / "in"
    for image in images[:3]:
        shutil.copytree(image.parent, inputs / image.parent.name)
    lost = next((inputs / images[2].parent.name).glob("template_*.jpg"))
    lost.unlink()
    out = tmp_path / "out"
    summary = predict_images(
        ckpt, inputs, out, recursive=True, template_rule="template_*.jpg", device="cpu", console=quiet()
    )
    assert summary.line() == "3 images: 2 predicted, 1 skipped (1 × no usable template)"
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(rows) == {image.name for image in images[:3]}
    assert "no template: nothing matches template.rule" in rows[images[2].name]["reason"]
    for line in (out / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["model"] == "rddn" and isinstance(record["detections"], list)
        assert cv2.imread(str(out / record["overlay"])).shape[:2] == tuple(reversed(record["size"]))


class OwnDataModule:
    """A user's datamodule: only its eval_preprocessing tells predict how to read a test image."""

    def __init__(self, root: str = "", size: int = 32) -> None:
        self.root, self.size = root, size

    @classmethod
    def eval_preprocessing(cls, hparams: dict) -> dict:
        return {"grey": True, "channels": 1, "image_size": int(hparams["size"])}


class SilentDataModule:
    def __init__(self, root: str = "") -> None:
        self.root = root


def test_each_datamodule_says_its_own_evaluation_preprocessing() -> None:
    prep = preprocessing_from_config({"_target_": f"{__name__}.OwnDataModule", "size": 48})
    assert (prep.grey, prep.channels, prep.image_size, prep.datamodule) == (
        True,
        1,
        48,
        f"{__name__}.OwnDataModule",
    )
    assert (
        preprocessing_from_config({"_target_": f"{__name__}.OwnDataModule"}).image_size == 32
    )  # its default
    with pytest.raises(CheckpointError, match="does not say how it prepares a test image"):
        preprocessing_from_config({"_target_": f"{__name__}.SilentDataModule"})
