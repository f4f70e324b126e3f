"""The projective results tables in BENCHMARKS.md and experiments/projective/README.md are what
the committed results files regenerate (`benchmarks/bench_projective.py --update-committed`)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_projective", ROOT / "benchmarks/bench_projective.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(text, begin, end):
    assert begin in text and end in text, f"markers {begin} / {end} missing"
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


@pytest.mark.parametrize("page", ["BENCHMARKS.md", "experiments/projective/README.md"])
def test_tables_are_what_the_results_files_regenerate(page):
    tables = _bench().committed_tables()
    text = (ROOT / page).read_text()
    for (begin, end), table in tables.items():
        assert _section(text, begin, end) == table.strip("\n"), f"{page}: the {begin} table is stale or hand-edited"
