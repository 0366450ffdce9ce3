"""Turn a run or a multirun directory into one leaderboard table and plots, offline, from files on disk.

    python -m elinspect.report logs/train/multiruns/<timestamp>
    python -m elinspect.report logs/train/multiruns/<timestamp> --metrics test/map_50 test/f1 --by loss model
    python -m elinspect.report DIR --no-aggregate       # one row per job
    python -m elinspect.report DIR --no-plots           # the table only

What the table and the plots hold, and where they are written: :mod:`elinspect.reporting`.
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
