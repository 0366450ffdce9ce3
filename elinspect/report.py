"""Turn a run or a multirun directory into one leaderboard table, offline, from CSV logs.

    python -m elinspect.report logs/train/multiruns/<timestamp>
    python -m elinspect.report logs/train/multiruns/<timestamp> --metrics test/map_50 test/f1 --by loss model
    python -m elinspect.report DIR --no-aggregate       # one row per job

Each job's final metrics are the last logged value of every column of its
``csv/version_*/metrics.csv``; the job is named by its command-line overrides
(``.hydra/overrides.yaml``). Jobs that differ only in ``seed`` or ``data.fold`` are
aggregated to mean ± std (the n column says over how many). The table is printed, and
written beside the runs as ``report.md`` and ``report.csv``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

REPLICATE_KEYS = ("seed", "data.fold", "data.split_seed")
DEFAULT_METRIC_PREFIXES = ("test/",)


def find_jobs(root: Path) -> list[Path]:
    """Every run directory at or below ``root`` (one holding ``.hydra/``)."""
    if (root / ".hydra").is_dir():
        return [root]
    return sorted((p.parent for p in root.rglob(".hydra")), key=lambda p: (len(p.parts), str(p)))


def job_overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) if path.is_file() else []
    out: dict[str, str] = {}
    for item in overrides or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def final_metrics(job: Path) -> dict[str, float]:
    """The last logged value of every metric column of the job's CSV logs."""
    metrics: dict[str, float] = {}
    for csv in sorted(job.glob("csv/version_*/metrics.csv")):
        frame = pd.read_csv(csv)
        for column in frame.columns:
            values = frame[column].dropna()
            if column not in ("epoch", "step") and len(values):
                metrics[column] = float(values.iloc[-1])
    return metrics


def collect(root: Path) -> pd.DataFrame:
    """One row per job: its overrides as columns, ``status``, and its final metrics."""
    rows = []
    for job in find_jobs(root):
        row: dict[str, object] = {"job": str(job.relative_to(root)) if job != root else "."}
        row.update(job_overrides(job))
        row["status"] = "failed" if (job / "FAILED").exists() else "ok"
        row.update(final_metrics(job))
        rows.append(row)
    return pd.DataFrame(rows)


def pick_metrics(frame: pd.DataFrame, metrics: list[str] | None) -> list[str]:
    if metrics:
        missing = [m for m in metrics if m not in frame.columns]
        if missing:
            raise SystemExit(f"metrics not logged by any job: {missing}; logged: {sorted(frame.columns)}")
        return metrics
    return sorted(c for c in frame.columns if str(c).startswith(DEFAULT_METRIC_PREFIXES))


def aggregate(frame: pd.DataFrame, metrics: list[str], by: list[str] | None) -> pd.DataFrame:
    """Mean ± std of ``metrics`` over replicates (seeds, folds) of each configuration."""
    if by is None:
        by = [c for c in frame.columns if c not in metrics and c not in ("job", "status", *REPLICATE_KEYS)]
        by = [c for c in by if not str(c).startswith(("train/", "val/", "test/"))]
    ok = frame[frame["status"] == "ok"]
    if not by:
        ok = ok.assign(configuration="all")
        by = ["configuration"]
    grouped = ok.groupby(by, dropna=False, sort=False)[metrics]
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    out = mean.copy()
    for m in metrics:
        out[m] = [
            f"{mu:.4f}" if n == 1 or pd.isna(sd) else f"{mu:.4f} ± {sd:.4f}"
            for mu, sd, n in zip(mean[m], std[m], count, strict=True)
        ]
    out.insert(0, "n", count)
    return out.reset_index()


def to_rich(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if column not in ("job",) else "left")
    for _, row in frame.iterrows():
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    return table


def report(
    root: Path, metrics: list[str] | None = None, by: list[str] | None = None, per_job: bool = False
) -> pd.DataFrame:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"{root} is not a directory (give a run or multirun directory under logs/)")
    frame = collect(root)
    if frame.empty:
        raise SystemExit(f"no runs (directories with .hydra/) below {root}")
    chosen = pick_metrics(frame, metrics)
    failed = int((frame["status"] == "failed").sum())
    if per_job:
        columns = [
            c for c in frame.columns if c not in chosen and not str(c).startswith(("train/", "val/", "test/"))
        ]
        table = frame[columns + chosen]
    else:
        table = aggregate(frame, chosen, by)
    table.to_csv(root / "report.csv", index=False)
    (root / "report.md").write_text(table.to_markdown(index=False) + "\n")
    title = f"{root} — {len(frame)} jobs" + (f", {failed} failed" if failed else "")
    Console(width=max(120, 14 * len(table.columns))).print(to_rich(table, title))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", type=Path, help="a run directory or a multirun directory")
    parser.add_argument("--metrics", nargs="+", help="metric columns (default: every test/ metric)")
    parser.add_argument(
        "--by", nargs="+", help="override keys that define a configuration (default: all but seed/fold)"
    )
    parser.add_argument("--no-aggregate", dest="per_job", action="store_true", help="one row per job")
    args = parser.parse_args(argv)
    report(args.dir, args.metrics, args.by, args.per_job)


if __name__ == "__main__":
    main()
