"""Turn a run or a multirun directory into one leaderboard table and plots, offline, from files on disk.

    python -m elinspect.report logs/train/multiruns/<timestamp>
    python -m elinspect.report logs/train/multiruns/<timestamp> --metrics test/map_50 test/f1 --by loss model
    python -m elinspect.report DIR --no-aggregate       # one row per job
    python -m elinspect.report DIR --no-plots           # the table only

Each job's final metrics are the last logged value of every column of its
``csv/version_*/metrics.csv``; the job is named by its command-line overrides
(``.hydra/overrides.yaml``). Jobs that differ only in ``seed`` or ``data.fold`` are
aggregated to mean ± std (the n column says over how many). The table is printed, and
written beside the runs as ``report.md`` and ``report.csv``.

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

import argparse
from pathlib import Path

from elinspect.reporting import ReportError, report


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
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write the table only")
    args = parser.parse_args(argv)
    try:
        report(args.dir, args.metrics, args.by, args.per_job, args.plots)
    except ReportError as err:
        raise SystemExit(f"error (ReportError): {err}") from None


if __name__ == "__main__":
    main()
