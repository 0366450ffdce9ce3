"""Each image model's torch model owns inference (issue 17): one call gives its named result
(:mod:`elinspect.models.results`), the LightningModule's predict step reads that call, the
decision thresholds live in the torch model, and checkpoints written before they moved still
load. Every image-level model config is built, as a run builds it (the detectors return
torchvision's detections and are covered by their own tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

from elinspect.data.info import DatasetInfo
from elinspect.models.base import ElinspectModule
from elinspect.models.build import build_model, effective_loss_config
from elinspect.models.results import (
    AnomalyResult,
    Classification,
    HeatmapClassification,
    Reconstruction,
    result_type,
)
from tests.conftest import fast_model_overrides, group_options, model_spec
from tests.test_padim import smooth_textures

IMAGE_MODELS = [m for m in group_options("model") if "detector" not in model_spec(m)]
RESULTS = (Classification, AnomalyResult, Reconstruction, HeatmapClassification)
# the predict step's output key of each result field
PREDICT_KEYS = {
    "score": "scores",
    "anomaly_map": "anomaly_maps",
    "probabilities": "probs",
    "reconstruction": "reconstructions",
}
INFO = DatasetInfo("classification", ("normal", "defective"), 3, (6, 2))


def ready_module(make_cfg: Callable[..., DictConfig], model: str) -> ElinspectModule:
    """The model as a run builds it, fitted where it must be before it can score (PaDiM's
    Gaussian on a few textures; SeMaCNN's heatmap unit set to 1), in eval mode."""
    cfg = make_cfg("train.yaml", [f"model={model}", *fast_model_overrides(model)])
    torch.manual_seed(0)
    module = build_model(cfg.model, effective_loss_config(cfg), INFO)
    if hasattr(module, "padim"):
        module.padim.update(smooth_textures(6, 64, seed=3).expand(-1, 3, -1, -1))
        module.padim.finalize(module.eps)
    if hasattr(module, "heatmap_scale"):
        module.heatmap_scale.fill_(1.0)
    return module.eval()


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_one_call_of_the_torch_model_is_the_named_result_the_predict_step_returns(
    make_cfg: Callable[..., DictConfig], model: str
) -> None:
    module = ready_module(make_cfg, model)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        result = module.torch_model(images)
        out = module.predict_step({"image": images}, 0)
    assert type(result) in RESULTS
    assert result_type(module.torch_model) is type(result)  # what export reads off the model
    fields = result._asdict()
    if "anomaly_map" in fields:
        assert fields["anomaly_map"].shape == (2, 1, 64, 64)
    if "score" in fields:
        assert fields["score"].shape == (2,)
    if "probabilities" in fields:
        torch.testing.assert_close(fields["probabilities"], fields["logits"].softmax(dim=1))
    shared = {field: key for field, key in PREDICT_KEYS.items() if field in fields}
    assert shared, "the predict step shares no output with the torch model's result"
    for field, key in shared.items():
        torch.testing.assert_close(out[key], fields[field], msg=f"{model}: predict {key} vs result {field}")


@pytest.mark.parametrize("model", [m for m in IMAGE_MODELS if m != "classifier"])
def test_the_decision_values_are_buffers_of_the_torch_model(
    make_cfg: Callable[..., DictConfig], model: str
) -> None:
    module = ready_module(make_cfg, model)
    torch_model = module.torch_model
    assert torch_model.threshold_names
    state = torch_model.state_dict()
    for name in torch_model.threshold_names:
        assert name in state  # saved with the torch model, so an export carries it
        getattr(module, name).fill_(0.25)  # the module's name for it is the same tensor
        assert float(torch_model.state_dict()[name]) == 0.25


@pytest.mark.parametrize("model", [m for m in IMAGE_MODELS if m != "classifier"])
def test_a_checkpoint_from_before_the_thresholds_moved_still_loads(
    make_cfg: Callable[..., DictConfig], model: str
) -> None:
    module = ready_module(make_cfg, model)
    for name in module.torch_model.threshold_names:
        getattr(module, name).fill_(0.5)
    state = module.state_dict()
    old = {}  # the state dict as the code before the move wrote it
    for key, value in state.items():
        if key in module.added_keys:
            continue
        for before, after in module.legacy_keys.items():
            if key == after or key.startswith(after + "."):
                key = before + key[len(after) :]
                break
        old[key] = value
    assert set(old) != set(state)
    fresh = ready_module(make_cfg, model)
    for name in fresh.torch_model.threshold_names:
        getattr(fresh, name).fill_(float("nan"))
    fresh.load_state_dict(old, strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key], equal_nan=True, msg=key)


@pytest.mark.parametrize("model", ["padim", "semacnn"])
def test_ddp_leaves_every_padim_tensor_alone_by_its_real_name(
    make_cfg: Callable[..., DictConfig], model: str
) -> None:
    module = ready_module(make_cfg, model)
    module.setup("fit")
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    padim_state = {f"{module.padim_key}.{key}" for key in module.padim.state_dict()}
    assert padim_state <= ignored
    sums = {f"{module.padim_key}.{name}" for name in module.padim.running_sum_names}
    assert ignored - sums <= set(module.state_dict()) | {
        f"{module.padim_key}.{name}" for name, _ in module.padim.named_buffers()
    }


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_names_the_torch_model_that_owns_its_inference(
    make_cfg: Callable[..., DictConfig], model: str
) -> None:
    cfg = make_cfg("train.yaml", [f"model={model}", *fast_model_overrides(model)])
    module = build_model(cfg.model, effective_loss_config(cfg), INFO)
    torch_model = module.torch_model
    assert isinstance(torch_model, torch.nn.Module) and torch_model is getattr(module, module.model_attr)
    assert not isinstance(torch_model, ElinspectModule)  # the torch part, not the LightningModule
