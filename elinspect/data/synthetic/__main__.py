"""Command-line dispatcher: ``python -m elinspect.data.synthetic <generator> [options]``.

Each generator module registers one subcommand through its ``add_cli(subparsers)``;
a new generator is one more entry in ``GENERATORS`` (``pvel``, ``folder``, ``fabric``,
``aluminum``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from elinspect.data.synthetic import aluminum, fabric, folder, pvel

GENERATORS = (pvel, folder, fabric, aluminum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m elinspect.data.synthetic",
        description="Write a small synthetic dataset in its publisher's on-disk layout.",
    )
    subparsers = parser.add_subparsers(dest="generator", required=True, metavar="GENERATOR")
    for module in GENERATORS:
        module.add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
