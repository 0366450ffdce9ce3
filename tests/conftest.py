"""Shared fixtures: a network guard, offline W&B, and composed configs with temporary
output directories."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"

# Overrides that make each dataset small and quick in tests. A dataset config missing
# here still runs in the model × data grid, with its own defaults. Datasets that need
# files on disk get them from the session fixtures in ``fast_data_overrides``.
FAST_DATA_OVERRIDES: dict[str, list[str]] = {
    # 8 cells per batch: one fast_dev_run batch must hold at least two normal cells for PaDiM
    "elpv": ["data.image_size=64", "data.batch_size=8", "data.num_workers=0"],
    **{
        name: ["data.image_size=64", "data.batch_size=2", "data.num_workers=0"]
        for name in ("pvel", "voc", "coco")
    },
    # one batch holds the whole val split, so its normal and defective images (and masks) meet
    "folder": ["data.image_size=64", "data.batch_size=8", "data.num_workers=0", "data.mask_dir=masks"],
    # the synthetic Tianchi sets hold 24 images: a 4-image test split instead of the paper's 500
    **{
        name: ["data.image_size=64", "data.batch_size=2", "data.num_workers=0", "data.test_size=4"]
        for name in ("fabric", "aluminum")
    },
}

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_DATA_DIR", str(REPO / ".pytest_cache" / "wandb-data"))
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)
os.environ["TORCH_HOME"] = str(REPO / ".pytest_cache" / "torch-home-empty")


class NetworkAccessError(RuntimeError):
    """A test tried to reach a host other than this machine."""


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths, abstract sockets
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network() -> Iterator[None]:
    """Every connection to a non-loopback address fails loudly during the suite."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def guarded_connect(self: socket.socket, address: object) -> None:
        if not _is_local(address):
            raise NetworkAccessError(f"tests must not touch the network (tried to connect to {address!r})")
        return original_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object) -> int:
        if not _is_local(address):
            raise NetworkAccessError(f"tests must not touch the network (tried to connect to {address!r})")
        return original_connect_ex(self, address)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = original_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = original_connect_ex  # type: ignore[method-assign]


def compose_config(config_name: str, overrides: list[str], output_dir: Path, fast: bool = True) -> DictConfig:
    """Compose ``conf/<config_name>`` as the command line would, writing below ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.extras.print_config = False
        if fast:
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 1
            cfg.trainer.enable_model_summary = False
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``make_cfg("train.yaml", [overrides])`` → a composed config writing into tmp_path."""
    counter = iter(range(1000))

    def make(
        config_name: str = "train.yaml", overrides: list[str] | None = None, fast: bool = True
    ) -> DictConfig:
        out = tmp_path / f"run{next(counter)}"
        out.mkdir()
        return compose_config(config_name, overrides or [], out, fast)

    yield make
    GlobalHydra.instance().clear()


def experiment_script(name: str) -> Iterator[ModuleType]:
    """``experiments/<name>.py`` imported as the module ``name`` (the scripts import each other
    by that name), removed again afterwards; for a fixture to ``yield from``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def data_config(name: str) -> dict:
    """``conf/data/<name>.yaml`` as a run composes it (with the shared loader settings it
    extends, ``conf/data/common/loader.yaml``), interpolations left unresolved."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train.yaml", overrides=[f"data={name}"])
    return OmegaConf.to_container(cfg.data, resolve=False)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@dataclass(frozen=True)
class DetectionData:
    """A small synthetic PVEL-AD and its copies in the other detection formats."""

    pvel_root: Path  # holds VOCdevkit/VOC2007; the same tree is the data=voc dataset
    coco_root: Path  # annotations/train.json (PVEL-AD trainval) and annotations/test.json
    image_root: Path  # the JPEGImages directory the COCO file names are relative to
    summary: dict  # what write_pvel_dataset returned


def write_detection_data(out: Path) -> DetectionData:
    """24 PVEL-AD-like images of 128 px (VOC layout) and COCO files of the same boxes."""
    from elinspect.data.errors import ErrorTally
    from elinspect.data.pvel import PVEL_CLASSES
    from elinspect.data.readers import read_voc_split, write_coco
    from elinspect.data.synthetic.pvel import write_pvel_dataset

    summary = write_pvel_dataset(out / "PVEL-AD", num_images=24, seed=0, image_size=128, normal_fraction=0.25)
    coco_root = out / "COCO"
    for split, name in (("trainval", "train"), ("test", "test")):
        records, _ = read_voc_split(summary["root"], split, PVEL_CLASSES, PVEL_CLASSES, ErrorTally("raise"))
        write_coco(records, PVEL_CLASSES, summary["images"], coco_root / "annotations" / f"{name}.json")
    return DetectionData(out / "PVEL-AD", coco_root, summary["images"], summary)


@pytest.fixture(scope="session")
def detection_data_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], DetectionData]:
    """A function that writes the synthetic detection datasets on its first call only."""
    made: list[DetectionData] = []

    def get() -> DetectionData:
        if not made:
            made.append(write_detection_data(tmp_path_factory.mktemp("detection-data")))
        return made[0]

    return get


@pytest.fixture(scope="session")
def detection_data(detection_data_factory: Callable[[], DetectionData]) -> DetectionData:
    return detection_data_factory()


@pytest.fixture(scope="session")
def folder_data_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A function that writes a small synthetic ``data=folder`` dataset (20 normal, 8 defect
    images of 64 px with masks below ``masks/``) on its first call only; returns its root."""
    made: list[Path] = []

    def get() -> Path:
        if not made:
            from elinspect.data.synthetic.folder import write_folder_dataset

            out = tmp_path_factory.mktemp("folder-data")
            made.append(write_folder_dataset(out, num_normal=20, num_defect=8, seed=0, image_size=64)["root"])
        return made[0]

    return get


@pytest.fixture(scope="session")
def tianchi_data_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``get("fabric")`` / ``get("aluminum")`` → the root of a small synthetic dataset in that
    Tianchi layout (24 images; written on first use only)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(f"{name}-data") / name
            if name == "fabric":
                from elinspect.data.synthetic.fabric import write_fabric_dataset

                write_fabric_dataset(out, num_images=24, seed=0, width=128, height=53, normal_fraction=0.25)
            else:
                from elinspect.data.synthetic.aluminum import write_aluminum_dataset

                write_aluminum_dataset(out, num_images=24, seed=0, width=96, height=72, normal_fraction=0.25)
            made[name] = out
        return made[name]

    return get


@pytest.fixture(scope="session")
def fast_data_overrides(
    detection_data_factory: Callable[[], DetectionData],
    folder_data_factory: Callable[[], Path],
    tianchi_data_factory: Callable[[str], Path],
) -> Callable[[str], list[str]]:
    """``fast_data_overrides("elpv")`` → the overrides that make that dataset small and quick
    (generating a synthetic dataset on first use where the dataset needs files)."""

    def overrides(data: str) -> list[str]:
        fast = list(FAST_DATA_OVERRIDES.get(data, []))
        if data in ("pvel", "voc"):
            fast.append(f"data.root='{detection_data_factory().pvel_root}'")
        elif data == "coco":
            made = detection_data_factory()
            fast += [f"data.root='{made.coco_root}'", f"data.image_root='{made.image_root}'"]
        elif data == "folder":
            fast.append(f"data.root='{folder_data_factory()}'")
        elif data in ("fabric", "aluminum"):
            fast.append(f"data.root='{tianchi_data_factory(data)}'")
        return fast

    return overrides


# What makes any detector small enough for a CPU test: ResNet-18, 64-px inputs, few proposals.
FAST_DETECTOR_OVERRIDES = [
    "model.detector.backbone.name=resnet18",
    "model.detector.min_size=64",
    "model.detector.max_size=64",
    "model.detector.fixed_size=null",
    "model.detector.rpn_pre_nms_top_n_train=100",
    "model.detector.rpn_post_nms_top_n_train=50",
    "model.detector.rpn_pre_nms_top_n_test=100",
    "model.detector.rpn_post_nms_top_n_test=50",
    "model.detector.box_batch_size_per_image=64",
]


def model_spec(model: str):
    """``conf/model/<model>.yaml`` merged over the model configs its defaults list extends
    (``semacnn`` extends ``padim``, ``ebba`` and ``rddn`` extend ``faster_rcnn``)."""
    from omegaconf import OmegaConf

    spec = OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml")
    bases = [entry for entry in spec.get("defaults", []) if isinstance(entry, str) and entry != "_self_"]
    return OmegaConf.merge(*(model_spec(base) for base in bases), spec) if bases else spec


def fast_model_overrides(model: str) -> list[str]:
    """Overrides that make ``conf/model/<model>.yaml`` quick; any config with a ``detector``
    node (every detection model, present and future) gets the small-detector settings, any
    with a ``padim`` node (PaDiM, SeMaCNN) a small feature grid and embedding."""
    spec = model_spec(model)
    fast = list(FAST_DETECTOR_OVERRIDES) if "detector" in spec else []
    if "test_min_size" in spec.get("detector", {}):  # RDDN tests at its own size (800 in the paper)
        fast.append("model.detector.test_min_size=64")
    if "padim" in spec:
        fast += ["model.padim.feature_size=16", "model.padim.k=20"]
    if "base_channels" in spec:  # the reconstruction models (ganae, autoencoder): tiny networks
        fast += ["model.image_size=32", "model.base_channels=4"]
    return fast


def backbone_overrides(model: str, name: str, weights: str | None) -> list[str]:
    """Overrides that give every CNN of ``conf/model/<model>.yaml`` the registry backbone
    ``name`` with ``weights`` (the classifier's ``net``, PaDiM's, a detector's body)."""
    spec = model_spec(model)
    value = "null" if weights is None else weights
    out = []
    if "net" in spec:
        out += [f"model.net.arch={name}", f"model.net.weights={value}"]
    if "padim" in spec:
        out += [f"model.padim.backbone={name}", f"model.padim.weights={value}"]
    if "detector" in spec:
        out += [f"model.detector.backbone.name={name}", f"model.detector.backbone.weights={value}"]
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def f1_threshold_by_hand(scores, labels) -> float:
    """The F1-optimal "defective if score >= t" threshold, by brute force over the scores
    (ties to the highest t): an independent check of the modules' threshold choice."""
    best, best_t = -1.0, None
    positive = [int(v) > 0 for v in labels]
    for t in sorted({float(s) for s in scores}, reverse=True):
        predicted = [float(s) >= t for s in scores]
        tp = sum(p and y for p, y in zip(predicted, positive, strict=True))
        fp = sum(p and not y for p, y in zip(predicted, positive, strict=True))
        fn = sum(y and not p for p, y in zip(predicted, positive, strict=True))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best + 1e-12:
            best, best_t = f1, t
    return best_t


def f1_at(scores, labels, threshold: float) -> float:
    """F1 of "defective if score >= threshold", by hand."""
    predicted = [float(s) >= threshold for s in scores]
    positive = [int(v) > 0 for v in labels]
    tp = sum(p and y for p, y in zip(predicted, positive, strict=True))
    wrong = sum(p != y for p, y in zip(predicted, positive, strict=True))
    return 2 * tp / (2 * tp + wrong) if tp else 0.0
