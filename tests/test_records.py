"""The README quotes records, never its own numbers: every block of the README that follows a
``<!-- quoted from experiments/<file> -->`` marker stands verbatim in that record, and every
record the README names exists. A number changed on one side only fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- quoted from (experiments/[\w./-]+\.md) -->\s*\n```[^\n]*\n(.*?)\n```", re.S)


def quotes(readme: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(readme)]


def test_the_readme_quotes_at_least_the_default_jobs_record() -> None:
    cited = [record for record, _ in quotes((REPO / "README.md").read_text(encoding="utf-8"))]
    assert "experiments/real_data.md" in cited


@pytest.mark.parametrize(("record", "block"), quotes((REPO / "README.md").read_text(encoding="utf-8")))
def test_each_quoted_block_stands_verbatim_in_its_record(record: str, block: str) -> None:
    text = (REPO / record).read_text(encoding="utf-8")
    assert block in text, f"the README's block quoted from {record} is not in it (a number differs?)"


def test_a_changed_number_is_caught() -> None:
    readme = "<!-- quoted from experiments/real_data.md -->\n```\n│ test/acc       │ 0.1234 │\n```\n"
    ((record, block),) = quotes(readme)
    assert block not in (REPO / record).read_text(encoding="utf-8")


def test_every_record_the_readme_names_exists() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in set(re.findall(r"experiments/[\w./-]+\.md", readme)):
        assert (REPO / name).is_file(), name
