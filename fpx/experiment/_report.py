"""Merge run directories (and sweep shards) into one results table and plots."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from ._runner import read_metrics

REPORT_COLUMNS = (
    "eval/accuracy",
    "eval/loss",
    "train/loss",
    "train/forward_steps",
    "train/backward_steps",
    "eval/converged_fraction",
    "ms_per_step",
)


def run_dirs(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """The run directories under `paths`: each path itself, or its `shard-*` children."""
    found = []
    for p in map(pathlib.Path, paths):
        if (p / "summary.json").exists():
            found.append(p)
        shards = sorted(p.glob("shard-*-of-*"))
        found.extend(s for s in shards if (s / "summary.json").exists())
        if not found and not shards:
            raise FileNotFoundError(f"{p} is not an fpx run directory (no summary.json, no shard-*-of-* directories).")
    return found


def collect(paths: Sequence[str | pathlib.Path]) -> tuple[list[dict], list[dict]]:
    """(summary rows, metric records) of all runs; rows keyed and sorted by (run, member)."""
    rows, records = [], []
    for d in run_dirs(paths):
        summary = json.loads((d / "summary.json").read_text())
        name = json.loads((d / "config.json").read_text()).get("name", d.name)
        for row in summary["members"]:
            rows.append({"run": name, **row})
        records.extend({**r, "run": name} for r in read_metrics(d))
    rows.sort(key=lambda r: (r["run"], r["member"]))
    return rows, records


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    hp_keys = sorted({k for r in rows for k in r["hparams"]})
    columns = [c for c in columns if any(c in r for r in rows)]
    header = ["run", "member", *hp_keys, *columns, "status", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], r["member"], *(r["hparams"].get(k) for k in hp_keys), *(r.get(c) for c in columns), r["status"], r["step"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def report(
    paths: Sequence[str | pathlib.Path], out: str | pathlib.Path | None = None, columns: Sequence[str] = REPORT_COLUMNS
) -> str:
    """Write `report.md` and `plots/` for the runs under `paths` into `out`; return the table."""
    rows, records = collect(paths)
    table = markdown_table(rows, columns)
    out = pathlib.Path(out) if out is not None else pathlib.Path(paths[0])
    out.mkdir(parents=True, exist_ok=True)
    # Plots are keyed by member within one run; prefix members by run when merging several.
    runs = sorted({r["run"] for r in records})
    if len(runs) > 1:
        for r in records:
            r["member"] = runs.index(r["run"]) * 100_000 + r["member"]
    from ._plots import plot_records  # matplotlib, only when plotting

    plots = plot_records(records, out / "plots")
    text = "# fpx report\n\n" + table + "\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    (out / "report.md").write_text(text)
    return table
