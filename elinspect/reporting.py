"""A run's or a multirun's report: one leaderboard table and plots, from the files on disk.

The callable core of ``python -m elinspect.report`` (:mod:`elinspect.report` is the command
line); the W&B dashboard callback calls :func:`report` after a test. A problem with the files
read raises :class:`ReportError`, naming the file.

Each job's final metrics are the last logged value of every column of its
``csv/version_*/metrics.csv``; the job is named by its command-line overrides
(``.hydra/overrides.yaml``). Jobs that differ only in ``seed`` or ``data.fold`` are
aggregated to mean ± std (the n column says over how many jobs; a cell over fewer, because
some logged no value of it, says ``(n=k)``). ``by`` names the overrides that make a
configuration instead; rows that then mix jobs differing in other overrides name those in a
``pooled over`` column. The table is printed, and written beside the runs as ``report.md``
and ``report.csv``.

Plots (issue 8; drawn by :mod:`elinspect.plots`) go to ``<job>/plots/`` for every job:
``training_curves.png`` (losses and validation metrics from the CSV log), and when the job
was tested, from what :class:`~elinspect.callbacks.test_predictions.TestPredictionsCallback`
and the detector wrote under ``<job>/test/``: ``roc.png`` and ``confusion_matrix.png``
(image level, from ``predictions.csv``), ``pr_curves.png`` (one curve per class, IoU 0.5,
from ``detections.jsonl``) and ``confusion_matrix.png`` (from a detector's
``confusion_matrix.csv``). For several jobs, ``DIR/plots/`` also gets comparison figures:
``metrics.png`` (a bar per configuration with ±1 std error bars over its replicates),
``roc.png`` and ``pr.png`` (one curve per job). ``report.md`` embeds or links them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from elinspect import plots as figures
from elinspect.utils.errors import UserError

if TYPE_CHECKING:
    from pandas.api.typing import DataFrameGroupBy

log = logging.getLogger(__name__)

REPLICATE_KEYS = ("seed", "data.fold", "data.split_seed")
DEFAULT_METRIC_PREFIXES = ("test/",)


PLOTS_DIR = "plots"
MAX_BAR_METRICS = 9


class ReportError(UserError):
    """A run directory or one of its files cannot be reported on (the message names it)."""


def find_jobs(root: Path) -> list[Path]:
    """Every run directory at or below ``root`` (one holding ``.hydra/``); ``root`` itself when
    it is a run (``.hydra/``, or CSV logs of a run started without Hydra's output files)."""
    if (root / ".hydra").is_dir() or (root / "csv").is_dir():
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


def metrics_files(job: Path) -> list[Path]:
    """The job's ``csv/version_*/metrics.csv`` in the order they were written (a resumed run
    adds a version): by version number, ``version_10`` after ``version_9``."""

    def version(path: Path) -> tuple[int, str]:
        suffix = path.parent.name.removeprefix("version_")
        return (int(suffix), "") if suffix.isdigit() else (-1, suffix)

    return sorted(job.glob("csv/version_*/metrics.csv"), key=version)


def final_metrics(job: Path) -> dict[str, float]:
    """The last logged value of every metric column of the job's CSV logs. A version that
    trains (a run resumed in its own directory) drops the test numbers of the versions before
    it: they belong to earlier weights, and the job's test is the one logged after its fit."""
    metrics: dict[str, float] = {}
    for csv in metrics_files(job):
        frame = pd.read_csv(csv)
        logged = [c for c in frame.columns if frame[c].notna().any()]
        if any(str(c).startswith(("train/", "val/")) for c in logged):
            metrics = {k: v for k, v in metrics.items() if not k.startswith("test/")}
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
            raise ReportError(f"metrics not logged by any job: {missing}; logged: {sorted(frame.columns)}")
        return metrics
    return sorted(c for c in frame.columns if str(c).startswith(DEFAULT_METRIC_PREFIXES))


def override_keys(frame: pd.DataFrame, metrics: list[str]) -> list[str]:
    """The columns that are jobs' overrides (not metrics, the job's name or its status)."""
    keys = [c for c in frame.columns if c not in metrics and c not in ("job", "status")]
    return [c for c in keys if not str(c).startswith(("train/", "val/", "test/"))]


def configuration_keys(frame: pd.DataFrame, metrics: list[str], by: list[str] | None) -> list[str]:
    """``by``, checked against the overrides; or every override but the replicate keys."""
    overrides = override_keys(frame, metrics)
    if by is None:
        return [c for c in overrides if c not in REPLICATE_KEYS]
    unknown = [b for b in by if b not in overrides]
    if unknown:
        raise ReportError(f"--by: no job overrides {unknown}; the overrides are {sorted(overrides)}")
    return list(by)


def replicate_groups(frame: pd.DataFrame, metrics: list[str], by: list[str] | None) -> DataFrameGroupBy:
    """The jobs that did not fail, grouped by configuration: ``by``, or every override but the
    replicate keys (seeds, folds)."""
    by = configuration_keys(frame, metrics, by)
    ok = frame[frame["status"] == "ok"]
    if not by:
        ok = ok.assign(configuration="all")
        by = ["configuration"]
    return ok.groupby(by, dropna=False, sort=False)


def pooled_overrides(frame: pd.DataFrame, metrics: list[str], by: list[str] | None) -> pd.Series:
    """For each configuration, the overrides other than ``by`` and the replicate keys whose
    values differ among its jobs (``--by loss`` on a loss × model sweep pools ``model``)."""
    by_keys = configuration_keys(frame, metrics, by)
    others = [c for c in override_keys(frame, metrics) if c not in by_keys and c not in REPLICATE_KEYS]
    distinct = replicate_groups(frame, metrics, by)[others].nunique(dropna=False)
    return distinct.apply(lambda counts: ", ".join(c for c in others if counts[c] > 1), axis=1)


def aggregate_numbers(
    frame: pd.DataFrame, metrics: list[str], by: list[str] | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Mean, std (ddof 1) and count of each of ``metrics`` over the replicates (seeds, folds) of
    each configuration of the jobs that did not fail; configurations are the index. The count is
    per metric: a job that logged no value of it (killed before its test) is not one of them."""
    grouped = replicate_groups(frame, metrics, by)[metrics]
    return grouped.mean(), grouped.std(ddof=1), grouped.count()


def aggregate(frame: pd.DataFrame, metrics: list[str], by: list[str] | None) -> pd.DataFrame:
    """Mean ± std of ``metrics`` over replicates (seeds, folds) of each configuration; ``n`` is
    the number of its jobs, and a cell over fewer of them (the others logged no value) says
    how many."""
    mean, std, count = aggregate_numbers(frame, metrics, by)
    jobs = replicate_groups(frame, metrics, by).size()
    out = mean.copy()
    for m in metrics:
        out[m] = [
            metric_cell(mu, sd, k, n) for mu, sd, k, n in zip(mean[m], std[m], count[m], jobs, strict=True)
        ]
    out.insert(0, "n", jobs)
    pooled = pooled_overrides(frame, metrics, by)
    if (pooled != "").any():  # rows that mix settings say so, beside their n
        out.insert(1, "pooled over", list(pooled))
    return out.reset_index()


def metric_cell(mean: float, std: float, count: int, jobs: int) -> str:
    """``mean ± std``; the std left out for one value, ``(n=k)`` added when fewer than the jobs."""
    if count == 0:
        return "—"
    text = f"{mean:.4f}" if count == 1 or pd.isna(std) else f"{mean:.4f} ± {std:.4f}"
    return text if count == jobs else f"{text} (n={count})"


def to_rich(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if column not in ("job",) else "left")
    for _, row in frame.iterrows():
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    return table


# ------------------------------------------------------------------------------ plots
def job_labels(root: Path, jobs: list[Path]) -> dict[Path, str]:
    """Each job's name in legends and tables: its directory and the overrides that differ between
    the jobs (``0: loss=ce seed=1``); all its overrides when it is the only job."""
    overrides = {job: job_overrides(job) for job in jobs}
    keys = list(dict.fromkeys(k for o in overrides.values() for k in o))
    varying = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1] if len(jobs) > 1 else keys
    labels = {}
    for job, chosen in overrides.items():
        name = root.name if job == root else str(job.relative_to(root))
        shown = " ".join(f"{k}={chosen[k]}" for k in varying if k in chosen)
        labels[job] = f"{name}: {shown}" if shown else name
    return labels


def class_names_of(job: Path) -> list[str] | None:
    path = job / "test" / "classes.json"
    if not path.is_file():
        return None
    return list(json.loads(path.read_text()).get("class_names") or []) or None


def read_predictions(job: Path) -> pd.DataFrame | None:
    path = job / "test" / "predictions.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    missing = {"target", "score", "predicted"} - set(frame.columns)
    if missing:
        raise ReportError(f"{path}: columns {sorted(missing)} missing (found {list(frame.columns)})")
    return frame


def read_job_detections(job: Path) -> list[dict] | None:
    path = job / "test" / "detections.jsonl"
    if not path.is_file():
        return None
    try:
        return figures.read_detections(path)
    except ValueError as err:
        raise ReportError(str(err)) from err


def read_history(job: Path) -> dict[str, pd.DataFrame]:
    frames = [pd.read_csv(csv) for csv in metrics_files(job)]
    return figures.training_history(pd.concat(frames, ignore_index=True)) if frames else {}


def tested_since_last_fit(job: Path) -> bool:
    """Whether ``<job>/test/`` belongs to the job's last weights: False where the CSV logs show a
    fit after the last test (a run resumed in its own directory that stopped before testing),
    as :func:`final_metrics` then drops the test numbers; True without CSV logs."""
    if not metrics_files(job):
        return True
    return any(key.startswith("test/") for key in final_metrics(job))


def job_plots(job: Path, title: str = "") -> dict[str, Path]:
    """Draw the job's own figures into ``<job>/plots/`` (see the module docstring); returns
    ``{kind: png path}`` for those it could draw from the files present (the test's files only
    where they belong to the job's last weights: :func:`tested_since_last_fit`)."""
    out: dict[str, Path] = {}
    directory = job / PLOTS_DIR
    figure = figures.training_curves_figure(read_history(job), title)
    if figure is not None:
        out["training_curves"] = figures.save_figure(figure, directory / "training_curves.png")
    if not tested_since_last_fit(job):
        log.warning("%s: its test files predate its last fit (not tested since): not drawn", job)
        return out
    names = class_names_of(job)
    predictions = read_predictions(job)
    if predictions is not None and len(predictions):
        curve = figures.predictions_roc(predictions, "test")
        if curve is not None:
            out["roc"] = figures.save_figure(
                figures.roc_figure([curve], "ROC (image level, test)"), directory / "roc.png"
            )
        counts = figures.classification_confusion(predictions, len(names) if names else None)
        labels = names if names and len(names) == len(counts) else [str(i) for i in range(len(counts))]
        out["confusion_matrix"] = figures.save_figure(
            figures.confusion_figure(counts, labels, "confusion matrix (test, image level)"),
            directory / "confusion_matrix.png",
        )
    records = read_job_detections(job)
    if records is not None:
        if names is None:
            found = sorted(
                {int(v) for r in records for v in (*r["gt"]["labels"], *r["detections"]["labels"])}
            )
            names = [str(i) for i in range(1, max(found, default=0) + 1)]
        curves = figures.detection_pr_curves(records, names)
        if curves:
            out["pr_curves"] = figures.save_figure(
                figures.pr_figure(curves, "precision-recall per class (test, IoU 0.5)"),
                directory / "pr_curves.png",
            )
    confusion_csv = job / "test" / "confusion_matrix.csv"
    if confusion_csv.is_file():
        counts, labels = figures.read_confusion_csv(confusion_csv)
        out["confusion_matrix"] = figures.save_figure(
            figures.confusion_figure(counts, labels, "confusion matrix (test, IoU 0.5)"),
            directory / "confusion_matrix.png",
        )
    return out


def bar_metrics(metrics: list[str]) -> list[str]:
    """The metrics drawn as bars: the headline ones (no per-class ``test/ap_50/<class>``) first."""
    headline = [m for m in metrics if str(m).count("/") <= 1]
    return (headline or metrics)[:MAX_BAR_METRICS]


def comparison_plots(
    root: Path, frame: pd.DataFrame, metrics: list[str], by: list[str] | None, per_job: bool
) -> dict[str, Path]:
    """Figures comparing the jobs below ``root``, in ``root/plots/`` (see the module docstring)."""
    out: dict[str, Path] = {}
    directory = root / PLOTS_DIR
    ok = frame[frame["status"] == "ok"]
    drawn = bar_metrics([m for m in metrics if m in ok.columns and ok[m].notna().any()])
    if drawn and len(ok):
        if per_job:
            mean = ok[drawn].reset_index(drop=True)
            std = mean * float("nan")
            counts = [1] * len(mean)
            labels = list(ok["job"])
        else:
            mean, std, count = aggregate_numbers(frame, drawn, by)
            counts = list(count.min(axis=1))
            keys = mean.index.to_frame(index=False)
            varying = [c for c in keys.columns if keys[c].nunique(dropna=False) > 1]
            labels = [" ".join(f"{c}={row[c]}" for c in varying) or "all" for _, row in keys.iterrows()]
        figure = figures.metric_bars_figure(
            mean, std, counts, labels, f"{root.name}: mean ± std over replicates"
        )
        out["metrics"] = figures.save_figure(figure, directory / "metrics.png")
    jobs = [root / j if j != "." else root for j in ok["job"]]
    labels = job_labels(root, jobs)
    rocs, prs = [], []
    for job in jobs:
        label = labels[job]
        predictions = read_predictions(job)
        if predictions is not None and len(predictions):
            curve = figures.predictions_roc(predictions, label)
            if curve is not None:
                rocs.append(curve)
        records = read_job_detections(job)
        if records is not None:
            curve = figures.detection_pr_curve(records, label=label)
            if curve is not None:
                prs.append(curve)
    if rocs:
        out["roc"] = figures.save_figure(
            figures.roc_figure(rocs, "ROC per job (image level, test)"), directory / "roc.png"
        )
    if prs:
        out["pr"] = figures.save_figure(
            figures.pr_figure(prs, "precision-recall per job (all classes, IoU 0.5)"), directory / "pr.png"
        )
    return out


PLOT_TITLES = {
    "metrics": "metrics per configuration",
    "roc": "ROC",
    "pr": "precision-recall",
    "pr_curves": "precision-recall per class",
    "confusion_matrix": "confusion matrix",
    "training_curves": "training curves",
}


def plots_markdown(root: Path, compared: dict[str, Path], per_job_plots: dict[Path, dict[str, Path]]) -> str:
    """The plots section of ``report.md``: images embedded for one job and for the comparison,
    a table of links for the jobs of a multirun. Paths are relative to ``root``."""

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    lines = ["", "## Plots", ""]
    for kind, path in compared.items():
        lines += [f"![{PLOT_TITLES.get(kind, kind)}]({rel(path)})", ""]
    if len(per_job_plots) == 1 and not compared:
        for kind, path in next(iter(per_job_plots.values())).items():
            lines += [f"![{PLOT_TITLES.get(kind, kind)}]({rel(path)})", ""]
    elif per_job_plots:
        kinds = [k for k in PLOT_TITLES if any(k in p for p in per_job_plots.values())]
        lines += ["### Per job", "", "| job | " + " | ".join(PLOT_TITLES[k] for k in kinds) + " |"]
        lines.append("|---|" + "---|" * len(kinds))
        labels = job_labels(root, list(per_job_plots))
        for job, paths in per_job_plots.items():
            cells = [f"[png]({rel(paths[k])})" if k in paths else "" for k in kinds]
            lines.append(f"| {labels[job]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) if len(lines) > 3 else ""


def make_plots(
    root: Path, frame: pd.DataFrame, metrics: list[str], by: list[str] | None, per_job: bool
) -> tuple[dict[str, Path], dict[Path, dict[str, Path]]]:
    """Every job's figures, then the comparison figures when there are several jobs."""
    jobs = [root / j if j != "." else root for j in frame.loc[frame["status"] == "ok", "job"]]
    per_job_plots = {}
    labels = job_labels(root, jobs)
    for job in jobs:
        drawn = job_plots(job, labels[job])
        if drawn:
            per_job_plots[job] = drawn
    compared = comparison_plots(root, frame, metrics, by, per_job) if len(jobs) > 1 else {}
    return compared, per_job_plots


def report(
    root: Path,
    metrics: list[str] | None = None,
    by: list[str] | None = None,
    per_job: bool = False,
    plots: bool = True,
    console: bool = True,
) -> pd.DataFrame:
    """Write ``report.md`` / ``report.csv`` (and with ``plots`` the figures) for ``root``; print the
    table when ``console``; return it."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory (give a run or multirun directory under logs/)")
    frame = collect(root)
    if frame.empty:
        raise ReportError(f"no runs (directories with .hydra/) below {root}")
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
    markdown = table.to_markdown(index=False) + "\n"
    if plots:
        markdown += plots_markdown(root, *make_plots(root, frame, chosen, by, per_job))
    (root / "report.md").write_text(markdown)
    if console:
        title = f"{root} — {len(frame)} jobs" + (f", {failed} failed" if failed else "")
        Console(width=max(120, 14 * len(table.columns))).print(to_rich(table, title))
    return table
