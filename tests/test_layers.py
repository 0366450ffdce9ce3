"""Imports only point down (issue 17, item 4): entry points → callbacks / models / data →
metrics / losses / plots → utils. A module may import its own layer or a lower one, never a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "elinspect"

# the layer of each top-level part of the package; every other top-level module is an entry
# point or the run builder beside them (train, eval, predict, export, explain, report, info,
# inference, build)
LAYERS = {
    "utils": 0,
    "metrics": 1,
    "losses": 1,
    "plots": 1,
    "drawing": 1,
    "reporting": 1,
    "callbacks": 2,
    "models": 2,
    "data": 2,
}
ENTRY = 3


def layer(module: str) -> int:
    parts = module.split(".")
    return ENTRY if len(parts) < 2 else LAYERS.get(parts[1], ENTRY)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports(root: Path) -> list[str]:
    """``importer → imported (line)`` for every import of a higher layer, lazy imports included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == root.name:
                targets = [f"{root.name}.{alias.name}" for alias in node.names]  # from elinspect import plots
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == root.name and layer(target) > layer(importer):
                    found.append(f"{importer} → {target} (line {node.lineno})")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(PACKAGE) == []


def test_the_check_finds_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    root = tmp_path / "elinspect"
    (root / "utils").mkdir(parents=True)
    (root / "callbacks").mkdir()
    (root / "utils" / "build.py").write_text("from elinspect.models.base import ElinspectModule\n")
    (root / "callbacks" / "dash.py").write_text("def f():\n    from elinspect.report import report\n")
    (root / "callbacks" / "ok.py").write_text("from elinspect import plots\nimport elinspect.utils.errors\n")
    (root / "metrics").mkdir()
    (root / "metrics" / "bad.py").write_text("from elinspect import train\n")
    assert upward_imports(root) == [
        "elinspect.callbacks.dash → elinspect.report (line 2)",
        "elinspect.metrics.bad → elinspect.train (line 1)",
        "elinspect.utils.build → elinspect.models.base (line 1)",
    ]


def test_no_model_rewrites_the_fit_loop() -> None:
    """A model declares its stage epochs (``stage_epochs``); the run builder applies them."""
    writes = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in sorted((PACKAGE / "models").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign | ast.AugAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if "fit_loop" in ast.unparse(target) or ast.unparse(target).endswith("trainer.max_epochs")
    ]
    assert writes == []
