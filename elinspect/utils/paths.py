"""Where the package's Hydra config tree lives (``conf/`` beside the ``elinspect`` package)."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
