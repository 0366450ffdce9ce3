"""Benchmark: cosine non-local attention through SDPA vs the explicit HW×HW formulation.

EBBA §3.B.2 / DESIGN §2: the B-A module applies cosine non-local attention to the fused
map at B3's size, 76×76×256 for a 600×600 input. The paper's formulation (its Fig 6)
builds the HW×HW similarity matrix; :class:`~elinspect.models.detection.attention.CosineNonLocalAttention`
computes the same output with ``F.scaled_dot_product_attention`` (fused kernels, O(HW)
memory). This script times both and measures their peak memory at several map sizes, in
one run, and prints a Markdown table with the explicit/SDPA ratios.

Usage::

    .venv/bin/python experiments/bench_attention.py                      # CPU, 19² 38² 76² 152²
    .venv/bin/python experiments/bench_attention.py --device cuda --backward

What is measured (honestly, and no more):

- **time**: median wall-clock time of ``--repeats`` calls after one warm-up call
  (``torch.cuda.synchronize`` around each call on CUDA), forward only under ``no_grad``,
  or forward + backward with ``--backward``.
- **peak memory**: the largest amount of tensor memory allocated *during one call* above
  what was allocated before it (the inputs and the module are not counted).
  On CUDA this is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus ``memory_allocated()`` before the call. On CPU there is no such counter, so the
  call runs once under ``torch.profiler.profile(profile_memory=True)``: every allocation
  and free of PyTorch's CPU allocator is recorded with its time, and the peak is the
  maximum of their running sum in time order — the CPU analogue of
  ``max_memory_allocated``. It counts tensors only: scratch memory that a BLAS / oneDNN
  library allocates on its own, and allocator caching, are not included (the process's
  resident set can be larger). Memory events are recorded from all threads.
- **HW² matrix**: the size of one float32 HW×HW matrix per head and image, the object the
  explicit formulation materialises (it keeps the cosines and their softmax, so about
  twice this, plus the gradient buffers with ``--backward``).

Both formulations are checked to agree (max abs difference printed) at every size.
Results are machine- and thread-count-dependent; the header prints the device, torch
version and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elinspect.models.detection.attention import (  # noqa: E402
    CosineNonLocalAttention,
    explicit_cosine_attention,
)

MiB = 2**20


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop log lines (written to fd 2) while profiling."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of PyTorch's CPU tensor allocations during ``fn()`` above the level before it."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_call(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, backward: bool
) -> Callable[[], object]:
    if not backward:

        def call() -> object:
            with torch.no_grad():
                return f(x)

        return call

    def call_backward() -> object:
        x.grad = None
        f(x).sum().backward()
        return None

    return call_backward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[19, 38, 76, 152], help="H = W of the map")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time / measure forward + backward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    attention = CosineNonLocalAttention(args.channels, heads=args.heads).to(device)
    peak_bytes = cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes
    mode = "forward + backward" if args.backward else "forward (no_grad)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"cosine non-local attention, N={args.batch} C={args.channels} heads={args.heads}, float32, {mode}; "
        f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print()
    print(
        "| H×W | HW | HW² matrix (MiB) | SDPA time (ms) | explicit time (ms) | time ratio "
        "| SDPA peak (MiB) | explicit peak (MiB) | memory ratio | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        x = torch.randn(args.batch, args.channels, size, size, generator=g).to(device)
        x.requires_grad_(args.backward)
        with torch.no_grad():
            diff = (attention(x) - explicit_cosine_attention(x, args.heads)).abs().max().item()
        sdpa = make_call(attention, x, args.backward)
        explicit = make_call(lambda t: explicit_cosine_attention(t, args.heads), x, args.backward)
        t_sdpa = median_seconds(sdpa, args.repeats, device)
        t_explicit = median_seconds(explicit, args.repeats, device)
        m_sdpa = peak_bytes(sdpa)
        m_explicit = peak_bytes(explicit)
        matrix = (size * size) ** 2 * 4 / MiB
        print(
            f"| {size}×{size} | {size * size} | {matrix:.1f} | {t_sdpa * 1e3:.1f} | {t_explicit * 1e3:.1f} "
            f"| {t_explicit / t_sdpa:.2f} | {m_sdpa / MiB:.1f} | {m_explicit / MiB:.1f} "
            f"| {m_explicit / max(m_sdpa, 1):.1f} | {diff:.1e} |"
        )
        del x


if __name__ == "__main__":
    main()
