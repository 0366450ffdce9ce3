"""Parameters, memory and time of a model per module path and per module group.

Two views:

- :func:`parameter_table` — parameter counts grouped by module path (for comparing necks,
  e.g. EBBA Table 3's ablation; the EBBA paper reports 62.74 M parameters, §4.C);
- :func:`profile_groups` — RDDN's Table VIII (``rddn.txt`` §V.E, "memory and time cost of
  modules"): per module group of a detector (input transform, backbone body, PTG
  generators, neck, RPN, ROI heads) the parameters, the activation memory and the forward
  time.

Groups are found by module path and class (:data:`MODULE_GROUPS`), so any detector built on
torchvision's ``GeneralizedRCNN`` — Faster R-CNN, EBBA, RDDN's variants with extra parts — is
split the same way: a module belongs to the first group whose rule matches it, else to its
parent's group. The rules, on paths relative to the detector: ``transform``; PTG — any path
component ``ptg*`` / ``pseudo_template*`` or a class named ``*TemplateGenerator*`` / ``PTG*``
(RDDN's pseudo template generators, wherever they sit); ``backbone.body``;
``backbone.neck`` / ``backbone.fpn``; ``rpn``; ``roi_heads``. Everything else (glue code in
``forward`` methods, unmatched modules) is ``other``. Every grouped module is hooked, so a
group is seen even where its outer module's ``forward`` is bypassed (RDDN's
``generators.residual`` calls the stage generators directly).

What is measured, on one forward pass of the detector in eval mode (inference: the RPN keeps
its *test* numbers of proposals):

- **parameters** — count and bytes of the group's parameters (shared ones counted once);
  beside them the RDDN paper's "Paras" convention (Table VIII): parameters *and* their
  gradients, 4 bytes each, i.e. 8 bytes per parameter (ResNet-50's 23.5 M body parameters
  → 179.35 MiB, the paper's number);
- **activations** — bytes of the tensors autograd saves for the backward pass while the
  group runs (forward with gradients enabled; tensor storages counted once, parameters and
  buffers excluded). This is the feature memory training keeps until ``backward``, the
  "Feature" column of Table VIII, as far as the eval-mode forward matches the training one;
- **outputs** — bytes of the tensors the group's modules return (forward hooks);
- **peak** — CUDA only: the peak of ``torch.cuda.memory_allocated`` above its value at the
  group's start (``torch.cuda.max_memory_allocated``). On CPU torch's allocations are not
  visible to ``tracemalloc``, and no peak is reported;
- **time** — wall time of the group's forward (``time.perf_counter`` in forward pre/post
  hooks, the device synchronised on CUDA), averaged over ``runs`` passes under
  ``torch.no_grad`` after ``warmup`` passes. Times are exclusive: a group nested in another
  (a PTG inside the backbone) is subtracted from its parent. A module called several times
  per pass (RDDN's TR-Inter runs the body on image and template) adds up.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

OTHER = "other"


def parameter_table(model: nn.Module, depth: int = 2, trainable_only: bool = False) -> list[tuple[str, int]]:
    """Number of parameters per module path, truncated to ``depth`` dotted components.

    ``backbone.body.layer1.0.conv1.weight`` counts towards ``backbone.body`` at depth 2.
    A parameter whose path is at most ``depth`` components long keeps its full name
    (``neck.balanced_attention.level_logits`` at depth 3). Rows come in module order;
    a shared parameter is counted once, so the rows sum to the model's parameter count.

    Args:
        model: any module.
        depth: number of leading name components to group by (>= 1).
        trainable_only: count only parameters with ``requires_grad``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rows: dict[str, int] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        key = ".".join(name.split(".")[:depth])
        rows[key] = rows.get(key, 0) + param.numel()
    return list(rows.items())


# ----------------------------------------------------------------------------- module groups


@dataclass(frozen=True)
class ModuleGroup:
    """A named set of modules, matched by path (relative to the detector) or by class.

    A module matches when its path is one of ``prefixes`` or lies under one (whole
    components: ``rpn`` matches ``rpn.head`` but not ``rpnx``), when one of its path
    components matches a ``components`` pattern, or when its class name matches a
    ``classes`` pattern (``fnmatch`` patterns, case-sensitive).
    """

    name: str
    prefixes: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()

    def matches(self, path: str, module: nn.Module | None = None) -> bool:
        if any(path == p or path.startswith(p + ".") for p in self.prefixes):
            return True
        if any(fnmatch.fnmatchcase(part, pattern) for part in path.split(".") for pattern in self.components):
            return True
        name = type(module).__name__ if module is not None else ""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.classes)


MODULE_GROUPS: tuple[ModuleGroup, ...] = (
    ModuleGroup("transform", prefixes=("transform",)),
    ModuleGroup(
        "PTG",
        components=("ptg*", "pseudo_template*"),
        classes=("*TemplateGenerator*", "PTG*"),
    ),
    ModuleGroup("backbone body", prefixes=("backbone.body",)),
    ModuleGroup("neck", prefixes=("backbone.neck", "backbone.fpn")),
    ModuleGroup("RPN", prefixes=("rpn",)),
    ModuleGroup("ROI heads", prefixes=("roi_heads",)),
)
"""The groups of a torchvision ``GeneralizedRCNN``-style detector, first match wins."""


def group_of(
    path: str, groups: Sequence[ModuleGroup] = MODULE_GROUPS, module: nn.Module | None = None
) -> str | None:
    """The name of the first group matching the module ``path`` (and class), else ``None``."""
    return next((g.name for g in groups if g.matches(path, module)), None)


def module_groups(model: nn.Module, groups: Sequence[ModuleGroup] = MODULE_GROUPS) -> dict[str, str]:
    """The group of every grouped module, by path: its own match, else its parent's group (so the
    submodules of a module matched by class belong to that module's group)."""
    assigned: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        group = group_of(path, groups, module) or assigned.get(path.rpartition(".")[0])
        if group is not None:
            assigned[path] = group
    return assigned


def group_roots(
    model: nn.Module, groups: Sequence[ModuleGroup] = MODULE_GROUPS
) -> dict[str, list[tuple[str, nn.Module]]]:
    """The outermost modules of each group (a module whose parent is not in the same group),
    in module order; groups without modules are left out."""
    assigned = module_groups(model, groups)
    roots: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        group = assigned.get(path)
        if group is not None and assigned.get(path.rpartition(".")[0]) != group:
            roots.setdefault(group, []).append((path, module))
    return {g.name: roots[g.name] for g in groups if g.name in roots}


# ----------------------------------------------------------------------------- measurement


def tensors_in(value: Any) -> Iterator[Tensor]:
    """Every tensor in a (nested) module output: tensors, mappings, sequences, ``ImageList``."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(getattr(value, "tensors", None), Tensor):  # torchvision's ImageList
        yield value.tensors


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class GroupProfile:
    """One row of :func:`profile_groups`; bytes are per forward pass, ``time_ms`` its mean."""

    name: str
    parameters: int = 0
    parameter_bytes: int = 0
    activation_bytes: int = 0
    output_bytes: int = 0
    peak_bytes: int | None = None
    time_ms: float | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class _Frame:
    group: str
    start: float = 0.0
    nested: int = 0  # open calls of modules of the same group inside this one
    children: float = 0.0
    base_memory: int = 0
    peak: int = 0


class _GroupRecorder:
    """Forward hooks on every module of every group: exclusive time, outputs and CUDA peak per group.

    Every grouped module is hooked, not only the group roots, so that a group whose outer
    module is bypassed (a method calling its submodules directly, as RDDN's PTG ``residual``)
    is still seen. The stack holds one frame per entry into a group; calls of the same
    group's modules inside it are only counted (``nested``).
    """

    def __init__(self, model: nn.Module, assigned: Mapping[str, str], cuda: bool) -> None:
        self.cuda = cuda
        self.stack: list[_Frame] = []
        self.reset()
        modules = dict(model.named_modules())
        self.handles = [
            handle
            for path, group in assigned.items()
            for handle in (
                modules[path].register_forward_pre_hook(self._pre(group)),
                modules[path].register_forward_hook(self._post(group)),
            )
        ]

    def reset(self) -> None:
        self.stack.clear()
        self.seconds: dict[str, float] = {}
        self.outputs: dict[str, int] = {}
        self.peaks: dict[str, int] = {}

    @property
    def current(self) -> str:
        return self.stack[-1].group if self.stack else OTHER

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, group: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self.stack and self.stack[-1].group == group:
                self.stack[-1].nested += 1
                return
            frame = _Frame(group)
            if self.cuda:
                if self.stack:  # keep the parent's peak so far before resetting the counter
                    parent = self.stack[-1]
                    parent.peak = max(parent.peak, torch.cuda.max_memory_allocated() - parent.base_memory)
                torch.cuda.reset_peak_memory_stats()
                frame.base_memory = torch.cuda.memory_allocated()
            self.stack.append(frame)
            frame.start = self.now()

        return hook

    def _post(self, group: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack[-1].nested:
                self.stack[-1].nested -= 1
                return
            frame = self.stack.pop()
            elapsed = self.now() - frame.start
            self.seconds[group] = self.seconds.get(group, 0.0) + elapsed - frame.children
            self.outputs[group] = self.outputs.get(group, 0) + storage_bytes(tensors_in(output))
            parent = self.stack[-1] if self.stack else None
            if parent is not None:
                parent.children += elapsed
            if self.cuda:
                peak = max(frame.peak, torch.cuda.max_memory_allocated() - frame.base_memory)
                self.peaks[group] = max(self.peaks.get(group, 0), peak)
                if parent is not None:
                    parent.peak = max(parent.peak, frame.base_memory + peak - parent.base_memory)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def _saved_tensor_bytes(recorder: _GroupRecorder, exclude: set[int], into: dict[str, int]) -> Iterator[None]:
    """Count the storages autograd saves for backward, per group running at the time."""
    seen = set(exclude)

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return t
        ptr = storage.data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            into[recorder.current] = into.get(recorder.current, 0) + storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def profile_groups(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    time_it: bool = True,
    runs: int = 3,
    warmup: int = 1,
    groups: Sequence[ModuleGroup] = MODULE_GROUPS,
) -> list[GroupProfile]:
    """Parameters, activation / output / peak memory and forward time of each module group.

    ``model(*args, **kwargs)`` is run in eval mode (the mode of every module is restored
    afterwards): once with gradients enabled to measure memory, then, with ``time_it``,
    ``warmup + runs`` times under ``torch.no_grad`` for the times. See the module docstring
    for what each number means. Rows follow ``groups`` (those with modules), then ``other``:
    the parameters outside every group and the time and saved tensors of code outside every
    group's modules.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    kwargs = dict(kwargs or {})
    assigned = module_groups(model, groups)
    roots = group_roots(model, groups)
    rows = {name: GroupProfile(name, modules=[p for p, _ in mods]) for name, mods in roots.items()}
    rows[OTHER] = GroupProfile(OTHER)
    for name, param in model.named_parameters():
        row = rows[assigned.get(name.rpartition(".")[0], OTHER)]
        row.parameters += param.numel()
        row.parameter_bytes += param.numel() * param.element_size()
    state = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    cuda = any(t.is_cuda for t in tensors_in((list(args), kwargs))) or any(
        p.is_cuda for p in model.parameters()
    )
    modes = {m: m.training for m in model.modules()}
    recorder = _GroupRecorder(model, assigned, cuda)
    try:
        model.eval()
        recorder.reset()
        saved: dict[str, int] = {}
        with torch.enable_grad(), _saved_tensor_bytes(recorder, state, saved):
            model(*args, **kwargs)
        for name, row in rows.items():
            row.activation_bytes = saved.get(name, 0)
            row.output_bytes = recorder.outputs.get(name, 0)
            row.peak_bytes = recorder.peaks.get(name, 0) if cuda and name != OTHER else None
        if time_it:
            with torch.no_grad():
                for _ in range(warmup):
                    model(*args, **kwargs)
                recorder.reset()
                total = 0.0
                for _ in range(runs):
                    start = recorder.now()
                    model(*args, **kwargs)
                    total += recorder.now() - start
            for name, row in rows.items():
                row.time_ms = 1000 * recorder.seconds.get(name, 0.0) / runs
            rows[OTHER].time_ms = 1000 * (total - sum(recorder.seconds.values())) / runs
    finally:
        recorder.remove()
        for m, mode in modes.items():
            m.training = mode
    return list(rows.values())


def mebibytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def paper_parameter_bytes(parameters: int) -> int:
    """RDDN Table VIII's "Paras" memory: each parameter and its gradient in float32 (8 bytes)."""
    return 8 * parameters


def count(n: int) -> str:
    """``11.177 M``; small counts in full (a 12-parameter stub is not ``0.000 M``)."""
    return f"{n / 1e6:.3f} M" if n >= 1000 else str(n)


def group_table(rows: Sequence[GroupProfile], title: str = "") -> Any:
    """A :class:`rich.table.Table` of :func:`profile_groups` rows with a total row (memory in MiB)."""
    from rich.table import Table

    timed = any(r.time_ms is not None for r in rows)
    peaks = any(r.peak_bytes is not None for r in rows)
    table = Table(title=title or None)
    table.add_column("group", no_wrap=True)
    for header in ("parameters", "param MiB", "Paras MiB", "activ. MiB", "output MiB"):
        table.add_column(header, justify="right", no_wrap=True)
    if peaks:
        table.add_column("peak MiB", justify="right", no_wrap=True)
    if timed:
        table.add_column("time ms", justify="right", no_wrap=True)

    def add(
        name: str, params: int, pbytes: int, act: int, out: int, peak: int | None, ms: float | None, **style
    ):
        row = [name, count(params), mebibytes(pbytes), mebibytes(paper_parameter_bytes(params))]
        row += [mebibytes(act), mebibytes(out)]
        if peaks:
            row.append(mebibytes(peak))
        if timed:
            row.append("-" if ms is None else f"{ms:.1f}")
        table.add_row(*row, **style)

    for r in rows:
        add(
            r.name,
            r.parameters,
            r.parameter_bytes,
            r.activation_bytes,
            r.output_bytes,
            r.peak_bytes,
            r.time_ms,
        )
    add(
        "total",
        sum(r.parameters for r in rows),
        sum(r.parameter_bytes for r in rows),
        sum(r.activation_bytes for r in rows),
        sum(r.output_bytes for r in rows),
        None,
        sum(r.time_ms for r in rows if r.time_ms is not None) if timed else None,
        style="bold",
    )
    return table


def profile_inputs(module: nn.Module, images: list[Tensor]) -> tuple[nn.Module, tuple, dict]:
    """The network to profile and its call arguments for a batch of ``images``.

    A LightningModule's network is its ``model`` attribute (module paths then read
    ``backbone.body…`` as :data:`MODULE_GROUPS` expects), called as ``model(images)``. A
    module whose ``extra_inputs`` include ``"template"`` (RDDN's TR-Pre / Inter / Post) also
    gets ``templates=``: random images of the same sizes. A module may instead provide
    ``profile_inputs(images) -> (args, kwargs)``.
    """
    network = getattr(module, "model", module)
    custom = getattr(module, "profile_inputs", None)
    if callable(custom):
        args, kwargs = custom(images)
        return network, tuple(args), dict(kwargs)
    kwargs: dict[str, Any] = {}
    if "template" in set(getattr(module, "extra_inputs", ()) or ()):
        generator = torch.Generator().manual_seed(1)
        kwargs["templates"] = [torch.rand(img.shape, generator=generator).to(img.device) for img in images]
    return network, (images,), kwargs
