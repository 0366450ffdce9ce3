"""Benchmark Hydra launchers: the wall time of one sweep of small jobs run one after the other
(Hydra's basic launcher) and two at a time (``hydra/launcher=joblib``, loky worker processes).

The basic launcher runs once with torch's default threads (one per core) and once with one
thread per job, because loky gives each joblib worker cores / n_jobs threads: the second row
separates what the parallel jobs gain from what fewer threads per job gain on a busy machine.

Each job is ``python -m elinspect.train`` with ``model=classifier`` (ResNet-18, random init) on a
small synthetic ``data=folder`` dataset the script writes first (``--num-normal`` normal and
``--num-defect`` defective images, ``--image-size`` px), trained for ``--epochs`` epochs and
tested; the sweep is over ``seed``. The three sweeps run in one invocation, in the table's
order, each as its own ``python -m elinspect.train -m`` process, timed from start to exit
(imports included: the basic launcher imports once and runs the jobs in its process; joblib
imports once per worker).
Every job must finish (a metrics.csv, no FAILED file), or the script stops.

    .venv/bin/python experiments/bench_launchers.py
    .venv/bin/python experiments/bench_launchers.py --jobs 8 --workers 4 --out experiments/results/bench_launchers.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from elinspect.data.synthetic.folder import write_folder_dataset  # noqa: E402
from elinspect.utils.task import FAILED_MARKER  # noqa: E402


def sweep_command(args: argparse.Namespace, data_root: Path, out: Path, launcher: str) -> list[str]:
    seeds = ",".join(str(s) for s in range(1, args.jobs + 1))
    command = [
        sys.executable, "-m", "elinspect.train", "-m", f"seed={seeds}",
        "model=classifier", "data=folder", f"data.root={data_root}", "data.train_normal_only=false",
        f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
        f"trainer.max_epochs={args.epochs}", "logger=csv", "extras.print_config=false",
        "callbacks=none", f"paths.log_dir={out / 'logs'}", f"hydra.sweep.dir={out / 'sweep'}",
    ]  # fmt: skip
    if launcher == "joblib":
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.workers}"]
    return command


def run_sweep(
    args: argparse.Namespace, data_root: Path, out: Path, launcher: str, threads: int | None
) -> float:
    """Seconds from the sweep's start to its exit; every job checked. ``threads`` sets the jobs'
    torch threads (OMP_NUM_THREADS); None leaves torch's default (all cores)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run(
        sweep_command(args, data_root, out, launcher), cwd=REPO, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the {launcher} sweep failed:\n{done.stderr[-3000:]}")
    for job in range(args.jobs):
        job_dir = out / "sweep" / str(job)
        if (job_dir / FAILED_MARKER).exists() or not (
            job_dir / "csv" / "version_0" / "metrics.csv"
        ).is_file():
            raise SystemExit(f"job {job_dir} of the {launcher} sweep did not finish")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="joblib's n_jobs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-normal", type=int, default=48)
    parser.add_argument("--num-defect", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the printed table to this Markdown file")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-launchers-") as tmp:
        root = Path(tmp)
        data = write_folder_dataset(
            root / "data", args.num_normal, args.num_defect, seed=0, image_size=args.image_size
        )["root"]
        cores = os.cpu_count() or 1
        # (row label, launcher, jobs at a time, OMP_NUM_THREADS, torch threads per job)
        runs = [
            ("basic (sequential)", "basic", 1, None, cores),
            ("basic (sequential), 1 thread per job", "basic", 1, 1, 1),
            ("joblib", "joblib", args.workers, None, max(1, cores // args.workers)),  # loky's split
        ]
        seconds = [
            run_sweep(args, data, root / f"run{i}", launcher, threads)
            for i, (_, launcher, _, threads, _) in enumerate(runs)
        ]
    load_end = os.getloadavg()
    rows = [
        {
            "launcher": label,
            "jobs at a time": at_once,
            "torch threads per job": threads,
            "jobs": args.jobs,
            "wall s": f"{wall:.1f}",
            "s per job": f"{wall / args.jobs:.1f}",
            "time ratio to basic": f"{wall / seconds[0]:.2f}",
        }
        for (label, _, at_once, _, threads), wall in zip(runs, seconds, strict=True)
    ]
    command = " ".join([Path(sys.executable).name, "experiments/bench_launchers.py", *sys.argv[1:]])
    text = "\n".join(
        [
            f"command: `{command}`",
            "",
            f"date: {dt.date.today()}; machine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} "
            f"at the end (1-minute); jobs: model=classifier (ResNet-18) on data=folder, "
            f"{args.num_normal}+{args.num_defect} synthetic {args.image_size}-px images, batch {args.batch_size}, "
            f"{args.epochs} epochs + test, num_workers 0, CSV logger only; sweep over seed",
            "",
            tabulate(rows, headers="keys", tablefmt="github"),
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Hydra launchers: a {args.jobs}-job sweep (`make bench`)\n\n{text}\n")


if __name__ == "__main__":
    main()
