"""Every config group option composes, and its ``_target_`` nodes instantiate."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf

from elinspect.models.base import ElinspectModule
from elinspect.models.build import constructor_arguments, effective_loss_config
from elinspect.utils.instantiate import instantiate_callbacks, instantiate_loggers
from elinspect.utils.resolvers import wandb_offline
from tests.conftest import group_options


def test_train_and_eval_configs_compose(make_cfg) -> None:
    train = make_cfg("train.yaml")
    assert train.model._target_ and train.data._target_ and train.trainer._target_
    assert train.optimized_metric == train.model.monitor == "val/f1"
    evaluation = make_cfg("eval.yaml", ["ckpt_path=some.ckpt"])
    assert evaluation.ckpt_path == "some.ckpt"
    resolved = OmegaConf.to_container(train, resolve=True)
    assert resolved["paths"]["output_dir"] == train.paths.output_dir


@pytest.mark.parametrize("option", group_options("trainer"))
def test_trainer_options_compose(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"trainer={option}"], fast=False)
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
    if option == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    if option == "gpu":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("option", group_options("callbacks"))
def test_callback_options_instantiate(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"callbacks={option}"])
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert len(callbacks) == sum(1 for v in (cfg.callbacks or {}).values() if "_target_" in v)


@pytest.mark.parametrize("option", group_options("logger"))
def test_logger_options_instantiate_and_always_write_csv(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"logger={option}"])
    loggers = instantiate_loggers(cfg.logger, cfg.paths.output_dir)
    kinds = {type(lg) for lg in loggers}
    assert CSVLogger in kinds
    if option in ("wandb", "many", "default"):
        assert WandbLogger in kinds
    if option in ("tensorboard", "many"):
        assert TensorBoardLogger in kinds


def test_no_logger_still_writes_csv(make_cfg) -> None:
    cfg = make_cfg("train.yaml", ["~logger"])
    assert [type(lg) for lg in instantiate_loggers(cfg.get("logger"), cfg.paths.output_dir)] == [CSVLogger]


DEBUG_PROMISES = {  # what each debug option's name says, read off the Lightning trainer it builds
    "default": {"max_epochs": 1},
    "fdr": {"fast_dev_run": True},  # one batch of everything
    "overfit": {"overfit_batches": 3, "max_epochs": 20},
    "limit": {
        "limit_train_batches": 0.01,
        "limit_val_batches": 0.05,
        "limit_test_batches": 0.05,
        "max_epochs": 3,
    },
}


def test_every_debug_option_states_its_promise() -> None:
    assert set(DEBUG_PROMISES) == set(group_options("debug"))


@pytest.mark.parametrize("option", group_options("debug"))
def test_debug_options_set_what_their_names_say(make_cfg, option: str) -> None:
    from elinspect.build import build_trainer

    cfg = make_cfg("train.yaml", [f"debug={option}", "logger=csv"])
    assert cfg.data.num_workers == 0 and cfg.task_name == "debug"
    trainer = build_trainer(cfg)
    for name, expected in DEBUG_PROMISES[option].items():
        got = getattr(trainer, name) if name != "max_epochs" else trainer.fit_loop.max_epochs
        if name == "fast_dev_run":
            got = bool(got)
        assert got == expected, (option, name, got)
    assert trainer._detect_anomaly  # every debug option checks autograd for NaN / inf


LOADER_KEYS = {"num_workers", "pin_memory", "on_error"}


@pytest.mark.parametrize("option", group_options("data"))
def test_every_data_config_takes_its_loader_settings_from_the_shared_file(make_cfg, option: str) -> None:
    """The loader settings are written once (conf/data/common/loader.yaml) and reach the
    datamodule's base class through its ``**loader``."""
    from tests.conftest import CONFIG_DIR

    assert not LOADER_KEYS & set(OmegaConf.load(CONFIG_DIR / "data" / f"{option}.yaml"))
    shared = OmegaConf.load(CONFIG_DIR / "data" / "common" / "loader.yaml")
    root = ["data.root=somewhere"] if option == "folder" else []
    cfg = make_cfg("train.yaml", [f"data={option}", *root])
    assert {k: cfg.data[k] for k in LOADER_KEYS} == {k: shared[k] for k in LOADER_KEYS}
    cfg = make_cfg(
        "train.yaml",
        [f"data={option}", *root, "data.num_workers=3", "data.pin_memory=true", "data.on_error=skip"],
    )
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert datamodule.loader_settings() == {"num_workers": 3, "pin_memory": True, "persistent_workers": True}
    assert datamodule.on_error == "skip"


class StagedModule(ElinspectModule):
    """A model whose stages fix the length of a fit (as SeMaCNN's and GAN-AE's do)."""

    task = "classification"

    def stage_epochs(self) -> dict[str, int]:
        return {"fit": 1, "train": 2}


def test_the_run_builder_sets_max_epochs_to_the_sum_of_a_models_stage_epochs(make_cfg, caplog) -> None:
    from elinspect.build import build_trainer

    cfg = make_cfg("train.yaml", ["trainer.max_epochs=7", "logger=csv"])
    staged = StagedModule(optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    assert build_trainer(cfg).fit_loop.max_epochs == 7
    with caplog.at_level(logging.INFO, logger="elinspect.build"):
        assert build_trainer(cfg, staged).fit_loop.max_epochs == 3
    assert (
        "StagedModule's stages take 1 fit + 2 train = 3 epoch(s); trainer.max_epochs=7 is replaced"
        in caplog.text
    )
    plain = StagedModule(optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    plain.stage_epochs = lambda: None  # a model that leaves the length to the trainer
    assert build_trainer(cfg, plain).fit_loop.max_epochs == 7
    smoke = build_trainer(make_cfg("train.yaml", ["debug=fdr", "logger=csv"]), staged)
    assert smoke.fast_dev_run and smoke.fit_loop.max_epochs == 1  # one batch of each stage instead


TINY_SEMACNN = ["model.padim.weights=null", "model.net.weights=null", "model.padim.k=10"]


@pytest.mark.parametrize(
    ("model", "overrides", "stages"),
    [
        ("semacnn", [*TINY_SEMACNN, "model.classifier_epochs=2"], {"PaDiM fit": 1, "classifier": 2}),
        ("semacnn", [*TINY_SEMACNN, "model.classifier_epochs=null"], None),
        (
            "ganae",
            ["model.generator_epochs=2", "model.encoder_epochs=3"],
            {"generator": 2, "encoder": 3, "calibration": 1},
        ),
        (
            "ganae",
            [
                "model.stages=encoder",
                "model.encoder_epochs=3",
                "model.threshold=f1",
                "model.generator_ckpt=x.ckpt",
            ],
            {"generator": 0, "encoder": 3, "calibration": 0},
        ),
    ],
)
def test_staged_models_declare_their_stage_epochs(make_cfg, model: str, overrides: list[str], stages) -> None:
    from elinspect.data.info import DatasetInfo
    from elinspect.models.build import build_model

    cfg = make_cfg("train.yaml", [f"model={model}", *overrides])
    info = DatasetInfo(task="anomaly", class_names=("normal", "defect"), in_channels=1, image_size=(64, 64))
    assert build_model(cfg.model, effective_loss_config(cfg), info).stage_epochs() == stages


EBBA_TRAINING = {  # ebba-detector.txt §4.B: 600x600, lr 0.001, x0.1 at 15k and 30k iterations, batch 1
    "data.image_size": 600,
    "data.batch_size": 1,
    "model.optimizer.lr": 0.001,
    "model.scheduler.milestones": [15000, 30000],
    "model.detector.rpn_fg_iou_thresh": 0.7,
    "model.detector.backbone.name": "resnet101",
}
EXPERIMENT_PROMISES: dict[str, tuple[set[str], dict]] = {
    # experiment: (the keys its multirun sweeps, values of the paper it promises)
    "ebba_ablation": ({"ebba_variant"}, {**EBBA_TRAINING, "data.classes": "ebba2"}),
    "ebba_table4": ({"model"}, {**EBBA_TRAINING, "data.classes": "ebba2"}),
    "ebba_table5": (
        {"loss"},
        {**EBBA_TRAINING, "data.classes": "ebba5", "model.detector.neck.name": "ebfpn"},
    ),
    "ebba_pvel": (
        set(),
        {**EBBA_TRAINING, "data.classes": "ebba2", "loss._target_": "ScaledDynamicFocalLoss"},
    ),
    "baf_pvel": (set(), {**EBBA_TRAINING, "data.classes": "ebba2"}),
    "faster_rcnn_pvel": (set(), {**EBBA_TRAINING, "data.classes": "ebba2"}),
    "faster_rcnn_synthetic": (set(), {"data.classes": "ebba5"}),
    "neu_det": (
        {"model", "seed"},
        {
            "model.detector.backbone.name": "efficientnet_lite0",
            "model.detector.backbone.weights": "imagenet",
            "model.scheduler._target_": "warmup_multistep_lr",
            "data.image_size": 256,
        },
    ),
    "elpv_classifier": (set(), {"data.num_folds": 4, "data.image_size": 300, "data.threshold": 0.0}),
    "semacnn_elpv": (
        {"data.threshold", "data.fold"},
        {
            "data.num_folds": 4,
            "model.padim.feature_size": 64,
            "model.padim.k": 100,
            "data.expand": 10,
            "model.heatmap_with_image": False,
        },
    ),
    "padim_elpv": ({"data.threshold", "data.fold"}, {"data.num_folds": 4, "model.padim.k": 100}),
    "ganae_ablation": ({"loss", "model.score"}, {"model.score_k1": 1.0, "model.score_k2": 1.0}),
    "rddn_paper": (set(), {"trainer.max_epochs": 24, "model.optimizer.lr": 0.01}),
    "rddn_full": (
        set(),
        {
            "model.template": "pre",
            "model.head": "cascade",
            "model.context.enabled": True,
            "model.detector.backbone.name": "resnet101",
            "model.detector.backbone.deformable_stages": [3, 4, 5],
        },
    ),
    "rddn_table3": ({"data", "rddn.row"}, {"model.template": "none"}),
    "rddn_table4": ({"rddn.row"}, {"model.head": "standard", "model.detector.backbone.name": "resnet50"}),
    "rddn_table5": ({"data", "rddn.row"}, {}),
    "rddn_table6": ({"data", "rddn.row"}, {"model.context.k": 1.5, "model.context.fuse_at": "fc"}),
    "rddn_table7": ({"data", "rddn.row"}, {"model.context.enabled": True}),
    "rddn_references": (
        {"rddn.row", "seed"},
        {
            "model.template": "none",
            "model.context.enabled": False,
            "model.context.k": 1.5,
            "model.detector.backbone.weights": "imagenet",
        },
    ),
}


def test_every_experiment_states_its_promises() -> None:
    assert set(EXPERIMENT_PROMISES) == set(group_options("experiment"))


@pytest.mark.parametrize("option", group_options("experiment"))
def test_experiments_compose_with_the_paper_values_and_sweeps_they_promise(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"experiment={option}"])
    hydra.utils.get_class(cfg.model._target_)
    hydra.utils.get_class(cfg.data._target_)
    sweeps, values = EXPERIMENT_PROMISES[option]
    assert set(cfg.hydra.sweeper.params or {}) == sweeps
    for key, expected in values.items():
        if key.endswith("._target_"):
            node = effective_loss_config(cfg) if key.startswith("loss.") else OmegaConf.select(cfg, key[:-9])
            assert node._target_.endswith(expected), (key, node._target_)
            continue
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == expected, (option, key, got)


@pytest.mark.parametrize("option", group_options("hparams_search"))
def test_hparams_searches_compose(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"hparams_search={option}"])
    assert cfg.optimized_metric


@pytest.mark.parametrize("option", group_options("loss"))
def test_losses_instantiate(make_cfg, option: str) -> None:
    cfg = make_cfg("train.yaml", [f"loss={option}"])
    loss = hydra.utils.instantiate(effective_loss_config(cfg))
    assert isinstance(loss, torch.nn.Module)


@pytest.mark.parametrize(
    ("model", "loss"),
    [
        ("classifier", "CrossEntropyLoss"),
        ("faster_rcnn", "CrossEntropyLoss"),
        ("baf", "CrossEntropyLoss"),
        ("ebba", "ScaledDynamicFocalLoss"),
    ],
)
def test_loss_auto_is_each_models_own_default(make_cfg, model: str, loss: str) -> None:
    cfg = make_cfg("train.yaml", [f"model={model}"])
    assert cfg.loss.auto
    assert effective_loss_config(cfg)._target_.endswith(loss)
    assert "default_loss" not in constructor_arguments(cfg.model)  # not a constructor argument
    chosen = make_cfg("train.yaml", [f"model={model}", "loss=focal"])
    assert effective_loss_config(chosen)._target_ == "elinspect.losses.FocalLoss"


def test_misspelt_option_is_refused(make_cfg) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="modle"):
        make_cfg("train.yaml", ["modle=classifier"])
    with pytest.raises(ConfigCompositionException, match="classifer"):
        make_cfg("train.yaml", ["model=classifer"])


def test_run_directories_are_timestamped_to_the_microsecond(make_cfg) -> None:
    first = make_cfg("train.yaml").hydra.run.dir
    second = make_cfg("train.yaml").hydra.run.dir
    assert first != second  # two runs started back to back never share a directory
    assert re.search(r"/train/runs/\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{6}$", first), first


def test_wandb_is_offline_without_an_api_key(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_offline() is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline() is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline() is True
